//! A client that reads the API the way users do, throughout a storm: random users' top songs,
//! each answer recorded with when it was asked and answered, for the checks afterwards.

use std::time::Duration;

use rand::Rng;
use rand::rngs::StdRng;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::Instant;

/// One request of the poller and what came of it.
#[derive(Debug, Clone)]
pub struct Sample {
    pub started: Instant,
    pub ended: Instant,
    pub user: u64,
    /// 0 when no HTTP answer came (connection refused or reset, or no answer in 30 s).
    pub status: u16,
    pub retry_after: Option<String>,
    pub body: String,
}

/// One `GET` over a fresh connection (HTTP/1.1, `Connection: close`): status, `Retry-After`,
/// body. The API's answers carry a `Content-Length`, so the body is what follows the headers.
pub async fn http_get(port: u16, path: &str) -> Result<(u16, Option<String>, String), String> {
    let exchange = async {
        let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .map_err(|e| format!("connect: {e}"))?;
        let request =
            format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n");
        stream
            .write_all(request.as_bytes())
            .await
            .map_err(|e| format!("write: {e}"))?;
        let mut raw = Vec::new();
        stream
            .read_to_end(&mut raw)
            .await
            .map_err(|e| format!("read: {e}"))?;
        let text = String::from_utf8_lossy(&raw).into_owned();
        let (head, body) = text
            .split_once("\r\n\r\n")
            .ok_or_else(|| format!("no header end in {text:?}"))?;
        let mut lines = head.lines();
        let status = lines
            .next()
            .and_then(|line| line.split_whitespace().nth(1))
            .and_then(|code| code.parse().ok())
            .ok_or_else(|| format!("bad status line in {head:?}"))?;
        let retry_after = lines.find_map(|line| {
            let (name, value) = line.split_once(':')?;
            name.eq_ignore_ascii_case("retry-after")
                .then(|| value.trim().to_owned())
        });
        Ok((status, retry_after, body.to_owned()))
    };
    tokio::time::timeout(Duration::from_secs(30), exchange)
        .await
        .unwrap_or_else(|_| Err("no answer within 30 s".to_owned()))
}

/// Requests random users' top songs until `stop`, two at a time.
pub async fn poll_api(
    port: u16,
    users: u64,
    seed: u64,
    stop: tokio_util::sync::CancellationToken,
) -> Vec<Sample> {
    let lanes = (0..2u64).map(|lane| {
        let stop = stop.clone();
        async move {
            let mut rng: StdRng = rand::SeedableRng::seed_from_u64(seed ^ lane);
            let mut samples = Vec::new();
            while !stop.is_cancelled() {
                // A few ids past the last user: users without plays take the ClickHouse path.
                let user = rng.random_range(1..=users + users / 20);
                let started = Instant::now();
                let result = http_get(port, &format!("/v1/users/{user}/top-songs?limit=10")).await;
                let ended = Instant::now();
                let (status, retry_after, body) = result.unwrap_or_else(|e| (0, None, e));
                samples.push(Sample {
                    started,
                    ended,
                    user,
                    status,
                    retry_after,
                    body,
                });
                tokio::time::sleep(Duration::from_millis(rng.random_range(20..80))).await;
            }
            samples
        }
    });
    futures::future::join_all(lanes)
        .await
        .into_iter()
        .flatten()
        .collect()
}
