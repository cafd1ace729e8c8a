//! Bounds against abusive clients: the ones checked per request (URI length, requests in
//! flight), and the count of connections per client ([`ClientConnections`], which
//! [`crate::serve`] consults on each accepted connection; the other per-connection bounds, header
//! read timeout, head size and the global connection count, are in [`crate::serve`] itself).

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use axum::BoxError;
use axum::error_handling::HandleErrorLayer;
use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;
use tokio::sync::Semaphore;
use tower::ServiceBuilder;
use tower::limit::GlobalConcurrencyLimitLayer;
use tower::load_shed::LoadShedLayer;

use crate::{AppError, AppState, observe};

/// At most `max` requests in flight through the layered routes, shared by all of them (one
/// semaphore, not one per route); one more is shed at once with `503`, `Retry-After` and a JSON
/// reason: queueing it would only hold its connection and memory for an answer that comes late.
pub fn in_flight_bound(
    max: u32,
    retry_after_secs: u32,
) -> impl tower::Layer<
    axum::routing::Route,
    Service: tower::Service<
        Request,
        Response: IntoResponse + 'static,
        Error: Into<std::convert::Infallible> + 'static,
        Future: Send + 'static,
    > + Clone
                 + Send
                 + Sync
                 + 'static,
> + Clone
+ Send
+ Sync
+ 'static {
    ServiceBuilder::new()
        .layer(HandleErrorLayer::new(move |error: BoxError| async move {
            shed(&error, retry_after_secs)
        }))
        .layer(LoadShedLayer::new())
        .layer(GlobalConcurrencyLimitLayer::new(
            usize::try_from(max).unwrap_or(usize::MAX),
        ))
}

fn shed(error: &BoxError, retry_after_secs: u32) -> AppError {
    if error.is::<tower::load_shed::error::Overloaded>() {
        metrics::counter!("topk_api_shed_total").increment(1);
        AppError::Unavailable {
            reason: "too many requests in flight; retry later".to_owned(),
            retry_after_secs,
        }
    } else {
        // The routes' errors are `Infallible`: only the shedder can fail.
        tracing::error!(error = %topk::telemetry::Chain(&**error), "unexpected middleware error");
        AppError::Unavailable {
            reason: "internal error".to_owned(),
            retry_after_secs,
        }
    }
}

/// `400` with a JSON reason for a path and query longer than `--max-uri-bytes` (hyper's own
/// limits are far higher and answer without a body).
pub async fn uri_length(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let uri = request.uri();
    let length = uri.path().len() + uri.query().map_or(0, |q| q.len() + 1);
    let max = usize::try_from(state.0.settings.max_uri_bytes).unwrap_or(usize::MAX);
    if length > max {
        return AppError::BadRequest(format!(
            "the request URI is {length} bytes long, more than the {max} allowed"
        ))
        .into_response();
    }
    next.run(request).await
}

/// Refused connections being answered at once at most. Past it a refused connection is closed
/// with no answer: answering costs a task and a small buffer for up to [`REFUSAL_LINGER`], and a
/// client flooding past its share must not turn that into unbounded memory.
pub const MAX_REFUSALS_IN_FLIGHT: usize = 64;

/// How long a refused connection is kept at most: its `429` is written at once, then what the
/// client sent is read and dropped until it closes, so the server's close does not reset the
/// connection (a close with unread input sends a RST, which can destroy the answer before the
/// client reads it).
pub const REFUSAL_LINGER: Duration = Duration::from_secs(1);

/// Input read and dropped from a refused connection at most (a few request heads).
const REFUSAL_DRAIN_BYTES: usize = 64 * 1024;

type OpenCounts = Arc<Mutex<HashMap<IpAddr, u32>>>;

/// Open connections per client (`--max-connections-per-client`), keyed by the peer's IP address.
///
/// An IPv6 client counts per address (not per prefix): one holding a whole `/64` can open that
/// many connections from each address, and is then held by the global `--max-connections`
/// alone. Behind a proxy every client has the proxy's address, so they all share one count.
///
/// Only addresses with an open connection have an entry (removed when its count falls to zero),
/// so the map holds at most as many entries as there are open connections, itself at most
/// `--max-connections`.
#[derive(Debug, Clone)]
pub struct ClientConnections {
    max: u32,
    retry_after_secs: u32,
    open: OpenCounts,
    refusals: Arc<Semaphore>,
}

/// One open connection of one client, counted until it is dropped (when its connection closes).
#[derive(Debug)]
pub struct ClientSlot {
    open: OpenCounts,
    ip: IpAddr,
}

impl Drop for ClientSlot {
    fn drop(&mut self) {
        let mut open = self.open.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(count) = open.get_mut(&self.ip) {
            *count -= 1;
            if *count == 0 {
                open.remove(&self.ip);
            }
        }
    }
}

impl ClientConnections {
    /// At most `max` connections per client; a refusal's `429` says to retry after
    /// `retry_after_secs`.
    pub fn new(max: u32, retry_after_secs: u32) -> Self {
        ClientConnections {
            max,
            retry_after_secs,
            open: Arc::default(),
            refusals: Arc::new(Semaphore::new(MAX_REFUSALS_IN_FLIGHT)),
        }
    }

    /// A slot for one more connection from `peer`, or `None` when it already holds `max`.
    pub fn open(&self, peer: IpAddr) -> Option<ClientSlot> {
        // An IPv4 client reaching a dual-stack socket shows as `::ffff:a.b.c.d`: one client, one
        // key, whichever way it came in.
        let ip = peer.to_canonical();
        let mut open = self.open.lock().unwrap_or_else(PoisonError::into_inner);
        let count = open.entry(ip).or_insert(0);
        if *count >= self.max {
            return None;
        }
        *count += 1;
        Some(ClientSlot {
            open: Arc::clone(&self.open),
            ip,
        })
    }

    /// Open connections of `peer` now.
    pub fn open_count(&self, peer: IpAddr) -> u32 {
        let open = self.open.lock().unwrap_or_else(PoisonError::into_inner);
        open.get(&peer.to_canonical()).copied().unwrap_or(0)
    }

    /// Clients (addresses) with an open connection now: the size of the map.
    pub fn clients(&self) -> usize {
        self.open
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }

    /// Refuses `stream`, a connection from `peer` over its share: answers `429 Too Many
    /// Requests` with `Retry-After` and the JSON reason, then closes, in a task of its own that
    /// holds no connection slot and lives at most [`REFUSAL_LINGER`]. Over
    /// [`MAX_REFUSALS_IN_FLIGHT`] such answers at once, the connection is closed unanswered.
    pub fn refuse(&self, stream: TcpStream, peer: IpAddr) {
        observe::connection_refused(peer, self.max);
        let Ok(permit) = Arc::clone(&self.refusals).try_acquire_owned() else {
            return; // dropped: closed without an answer
        };
        let error = AppError::TooManyRequests {
            reason: format!(
                "this client already has {} connections open, the most one client may; close \
                 one or retry later",
                self.max
            ),
            retry_after_secs: self.retry_after_secs,
        };
        tokio::spawn(async move {
            let _ = tokio::time::timeout(REFUSAL_LINGER, answer_and_close(stream, error)).await;
            drop(permit);
        });
    }
}

/// Writes `error` as a whole HTTP/1.1 response (before reading the request: the answer is the
/// same whatever was asked) with `Connection: close`, ends the write side, and drains the input
/// until the client closes (see [`REFUSAL_LINGER`]).
async fn answer_and_close(mut stream: TcpStream, error: AppError) -> std::io::Result<()> {
    let (parts, body) = error.into_response().into_parts();
    let body = axum::body::to_bytes(body, 64 * 1024)
        .await
        .map_err(std::io::Error::other)?;
    let mut head = format!(
        "HTTP/1.1 {} {}\r\n",
        parts.status.as_u16(),
        parts.status.canonical_reason().unwrap_or("")
    )
    .into_bytes();
    for (name, value) in &parts.headers {
        head.extend_from_slice(name.as_str().as_bytes());
        head.extend_from_slice(b": ");
        head.extend_from_slice(value.as_bytes());
        head.extend_from_slice(b"\r\n");
    }
    head.extend_from_slice(
        format!(
            "content-length: {}\r\nconnection: close\r\n\r\n",
            body.len()
        )
        .as_bytes(),
    );
    head.extend_from_slice(&body);
    stream.write_all(&head).await?;
    stream.shutdown().await?;
    let mut buf = [0u8; 4096];
    let mut drained = 0;
    while drained < REFUSAL_DRAIN_BYTES {
        match stream.read(&mut buf).await? {
            0 => break,
            n => drained += n,
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_per_address_and_releases_on_drop() {
        let clients = ClientConnections::new(2, 5);
        let a: IpAddr = "127.0.0.1".parse().expect("ip");
        let b: IpAddr = "127.0.0.2".parse().expect("ip");
        let first = clients.open(a).expect("first");
        let second = clients.open(a).expect("second");
        assert!(clients.open(a).is_none(), "a third from the same address");
        let other = clients.open(b).expect("another address has its own count");
        assert_eq!((clients.open_count(a), clients.open_count(b)), (2, 1));
        assert_eq!(clients.clients(), 2);
        drop(first);
        assert_eq!(clients.open_count(a), 1);
        let again = clients.open(a).expect("a slot was given back");
        drop((second, again, other));
        // Entries are removed at zero: the map holds only clients with open connections.
        assert_eq!(clients.clients(), 0);
    }

    #[test]
    fn a_refused_attempt_leaves_no_entry() {
        let clients = ClientConnections::new(1, 5);
        let a: IpAddr = "10.0.0.1".parse().expect("ip");
        let held = clients.open(a).expect("first");
        assert!(clients.open(a).is_none());
        assert_eq!(clients.open_count(a), 1);
        drop(held);
        assert_eq!(clients.clients(), 0);
    }

    #[test]
    fn an_ipv4_mapped_address_is_the_ipv4_client() {
        let clients = ClientConnections::new(1, 5);
        let v4: IpAddr = "192.0.2.7".parse().expect("ip");
        let mapped: IpAddr = "::ffff:192.0.2.7".parse().expect("ip");
        let _held = clients.open(v4).expect("first");
        assert!(clients.open(mapped).is_none());
        assert_eq!(clients.open_count(mapped), 1);
    }

    #[tokio::test]
    async fn a_refusal_is_a_429_with_retry_after_and_the_json_reason() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let client = tokio::spawn(async move {
            let mut stream = TcpStream::connect(addr).await.expect("connect");
            stream
                .write_all(b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n")
                .await
                .expect("write");
            let mut answer = String::new();
            stream.read_to_string(&mut answer).await.expect("read");
            answer
        });
        let (stream, peer) = listener.accept().await.expect("accept");
        ClientConnections::new(3, 7).refuse(stream, peer.ip());
        let answer = tokio::time::timeout(Duration::from_secs(10), client)
            .await
            .expect("answered and closed in time")
            .expect("joined");
        let (head, body) = answer.split_once("\r\n\r\n").expect("head and body");
        let mut lines = head.split("\r\n");
        assert_eq!(lines.next(), Some("HTTP/1.1 429 Too Many Requests"));
        let headers: Vec<&str> = lines.collect();
        assert!(headers.contains(&"retry-after: 7"), "{headers:?}");
        assert!(
            headers.contains(&"content-type: application/json"),
            "{headers:?}"
        );
        assert!(headers.contains(&"connection: close"), "{headers:?}");
        assert!(
            headers.contains(&format!("content-length: {}", body.len()).as_str()),
            "{headers:?}"
        );
        let body: crate::error::ErrorBody = serde_json::from_str(body).expect("JSON body");
        assert_eq!(body.error, "too_many_requests");
        assert_eq!(
            body.reason,
            "this client already has 3 connections open, the most one client may; close one or \
             retry later"
        );
    }
}
