//! The REST API and the widget (`topk serve`): each user's top songs from Redis in one round
//! trip, computed from ClickHouse on a miss (and written back), degraded but never hanging when
//! a dependency fails.
//!
//! # Layout
//!
//! - [`top`]: the answer of one request: cache, fallback, write-back, staleness (the degradation
//!   table is in ARCHITECTURE.md, "The API");
//! - [`error`]: [`AppError`], the one error type, mapped to a status and a JSON reason;
//! - [`conn`]: the one shared Redis connection (a cache hit is one round trip);
//! - [`auth`]: HS256 JWT bearer tokens (off unless a key is configured), their claims policy, key
//!   rotation by `kid` and minting (`topk token`);
//! - [`openapi`]: the OpenAPI document served at `/openapi.json`, generated from the handlers;
//! - [`widget`]: the embeddable HTML page;
//! - [`observe`]: per-request tracing, the latency histogram and the counters;
//! - [`guard`]: the bounds against abusive clients (URI length, requests in flight, connections
//!   per client);
//! - [`router`], [`serve`] and [`run`]: the routes, the request deadline, the accept loop with
//!   its bounds (connections in all and per client, header read timeout, head size), graceful
//!   shutdown with a drain timeout.

pub mod auth;
pub mod conn;
pub mod error;
pub mod guard;
pub mod observe;
pub mod openapi;
pub mod top;
pub mod widget;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::routing::get;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use topk::cache::Redis;
use topk::clock::SharedClock;
use topk::config::{CachePolicyArgs, ClickHouseArgs, RedisArgs, TelemetryArgs};
use topk::olap::Olap;
use topk::query::TopQuery;
use topk::telemetry::Chain;

pub use auth::{MIN_SECRET_BYTES, configured_secret};
pub use error::AppError;

/// Deadlines and cache policy of the API.
#[derive(Debug, Clone, clap::Args)]
pub struct ApiSettings {
    /// Deadline of a whole request; past it the answer is `503` with `Retry-After`.
    #[arg(long, env = "TOPK_API_REQUEST_TIMEOUT", default_value = "2s", value_parser = topk::config::duration)]
    pub request_timeout: Duration,
    /// Deadline of one Redis call (read, write-back, ping).
    #[arg(long, env = "TOPK_API_REDIS_TIMEOUT", default_value = "250ms", value_parser = topk::config::duration)]
    pub redis_timeout: Duration,
    /// Deadline of one ClickHouse computation (a miss, a recheck, a ping).
    #[arg(long, env = "TOPK_API_OLAP_TIMEOUT", default_value = "1s", value_parser = topk::config::duration)]
    pub olap_timeout: Duration,
    /// A cached answer computed longer ago than this is recomputed from ClickHouse (and written
    /// back); if ClickHouse cannot answer, the cached one is served with `stale: true`. The
    /// refresher rewrites only users whose answer changed, so this bounds how long a stopped
    /// refresher goes unnoticed, at one ClickHouse query per read user per max age.
    #[arg(long, env = "TOPK_API_MAX_AGE", default_value = "1h", value_parser = topk::config::duration)]
    pub max_age: Duration,
    /// `Cache-Control: private, max-age=…` of an answer: how long a browser may reuse it before
    /// it revalidates with its `ETag` (`304` while the answer is unchanged). Set it to the
    /// refresher's `--refresh-interval`: an answer changes at most that often.
    #[arg(long, env = "TOPK_API_ANSWER_MAX_AGE", default_value = "60s", value_parser = topk::config::duration_in_seconds)]
    pub answer_max_age: Duration,
    /// How long an answer written back is kept (`--key-ttl`, `--tombstone-ttl`: the refresher's
    /// policy, the same flags and variables).
    #[command(flatten)]
    pub cache: CachePolicyArgs,
    /// `Retry-After` (seconds) of a `503`.
    #[arg(long, env = "TOPK_API_RETRY_AFTER", default_value_t = 5)]
    pub retry_after_secs: u32,
    /// A connection must deliver a request's whole head (request line and headers) within this
    /// long after it opens or after its previous response, or it is closed (slowloris, idle
    /// connections).
    #[arg(long, env = "TOPK_API_HEADER_READ_TIMEOUT", default_value = "10s", value_parser = topk::config::duration)]
    pub header_read_timeout: Duration,
    /// Open connections at most; past it new connections wait in the listen backlog (not
    /// accepted, so they cost no memory of the process) until one closes.
    #[arg(long, env = "TOPK_API_MAX_CONNECTIONS", default_value_t = 1024,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub max_connections: u32,
    /// Open connections of one client at most, counted per peer IP address (an IPv6 client per
    /// address, not per prefix). A connection beyond it is answered `429` with `Retry-After`
    /// and a JSON reason and closed at once, without holding one of `--max-connections`: one
    /// client cannot take every connection. Behind a reverse proxy or load balancer every
    /// client has the proxy's address and they all share this one bound: raise it there to
    /// the proxy's own connection pool (and bound clients at the proxy).
    #[arg(long, env = "TOPK_API_MAX_CONNECTIONS_PER_CLIENT", default_value_t = 64,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub max_connections_per_client: u32,
    /// `/v1/…` requests being answered at once at most; one more is answered `503` with
    /// `Retry-After` at once instead of queueing.
    #[arg(long, env = "TOPK_API_MAX_IN_FLIGHT", default_value_t = 256,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub max_in_flight: u32,
    /// Answers being computed from ClickHouse at once at most (cache misses and expired
    /// entries): past it a miss is `503` with `Retry-After` (an expired entry is served stale)
    /// instead of one more query, so a flood of reads of uncached ids cannot take ClickHouse
    /// from the pipeline's own queries.
    #[arg(long, env = "TOPK_API_MAX_OLAP_IN_FLIGHT", default_value_t = 32,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub max_olap_in_flight: u32,
    /// Size bound (bytes) of a request's head, request line and headers together; past it the
    /// connection is answered `431` and closed before the request is parsed further (at least
    /// 8 KiB: the smallest read buffer the HTTP parser allows).
    #[arg(long, env = "TOPK_API_MAX_HEADER_BYTES", default_value_t = 16 * 1024,
          value_parser = clap::value_parser!(u32).range(8192..))]
    pub max_header_bytes: u32,
    /// Length bound (bytes) of a request's path and query; past it the answer is `400` with a
    /// JSON reason (a real request is under 100 bytes).
    #[arg(long, env = "TOPK_API_MAX_URI_BYTES", default_value_t = 2048,
          value_parser = clap::value_parser!(u32).range(64..))]
    pub max_uri_bytes: u32,
}

/// The flags' defaults.
impl Default for ApiSettings {
    fn default() -> Self {
        topk::config::defaults()
    }
}

/// `topk serve`.
#[derive(Debug, Clone, clap::Args)]
pub struct ApiArgs {
    #[command(flatten)]
    pub clickhouse: ClickHouseArgs,
    #[command(flatten)]
    pub redis: RedisArgs,
    #[command(flatten)]
    pub settings: ApiSettings,
    /// Address to listen on.
    #[arg(long, env = "TOPK_API_LISTEN", default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,
    /// How long in-flight requests may finish after SIGINT/SIGTERM before they are dropped.
    #[arg(long, env = "TOPK_API_DRAIN_TIMEOUT", default_value = "10s", value_parser = topk::config::duration)]
    pub drain_timeout: Duration,
    /// Keys and claims policy of bearer tokens (`auth::AuthArgs`).
    #[command(flatten)]
    pub auth: auth::AuthArgs,
    /// `--metrics-addr`, as the other roles: `/metrics` on a listener of its own (then not on
    /// `--listen`); unset, `/metrics` is on `--listen`, behind an admin token when auth is on.
    #[command(flatten)]
    pub telemetry: TelemetryArgs,
}

/// Errors starting the API.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error(transparent)]
    Cache(#[from] topk::cache::CacheError),
    /// A key or the claims policy of `--auth-…`.
    #[error(transparent)]
    Auth(#[from] auth::AuthError),
    /// The `--metrics-addr` listener.
    #[error(transparent)]
    Metrics(#[from] observe::MetricsError),
    #[error(transparent)]
    Layout(#[from] topk::olap::LayoutError),
    #[error("listening on {addr}")]
    Listen {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// Everything a handler needs; cheap to clone (axum clones it per request).
#[derive(Clone)]
pub struct AppState(pub Arc<Inner>);

/// The shared parts of [`AppState`].
pub struct Inner {
    pub redis: conn::SharedConn,
    pub prefix: String,
    pub query: TopQuery,
    /// For the readiness ping (every server of a cluster).
    pub clickhouse: Olap,
    pub clock: SharedClock,
    pub settings: ApiSettings,
    /// `None`: authentication off.
    pub auth: Option<auth::Auth>,
    pub metrics: observe::Metrics,
    /// Permits for answers computed from ClickHouse (`--max-olap-in-flight`).
    pub olap_slots: Semaphore,
    /// The last readiness result and when it was taken (`/readyz` answers from it for
    /// `top::READINESS_TTL`).
    pub readiness: tokio::sync::Mutex<Option<(std::time::Instant, top::Ready)>>,
    /// The answers' `Cache-Control` (from `--answer-max-age`).
    pub cache_control: axum::http::HeaderValue,
}

impl std::fmt::Debug for AppState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AppState")
            .field("redis", self.0.redis.redis())
            .field("prefix", &self.0.prefix)
            .field("auth", &self.0.auth.is_some())
            .finish_non_exhaustive()
    }
}

impl AppState {
    pub fn new(
        redis: Redis,
        prefix: &str,
        clickhouse: impl Into<Olap>,
        clock: SharedClock,
        settings: ApiSettings,
        auth: Option<auth::Auth>,
    ) -> Self {
        let settings_olap_slots = settings.max_olap_in_flight as usize;
        let cache_control = axum::http::HeaderValue::from_str(&format!(
            "private, max-age={}",
            settings.answer_max_age.as_secs()
        ))
        .expect("digits are a valid header value");
        // ClickHouse stops a computation the API has given up on (the client's deadline alone
        // leaves the query running on the server).
        let max_execution_secs = settings.olap_timeout.as_secs().max(1).to_string();
        let clickhouse = clickhouse
            .into()
            .with_setting("max_execution_time", max_execution_secs);
        AppState(Arc::new(Inner {
            redis: conn::SharedConn::new(redis),
            prefix: prefix.to_owned(),
            query: TopQuery::new(clickhouse.clone()),
            clickhouse,
            clock,
            settings,
            auth,
            metrics: observe::Metrics::install(),
            readiness: tokio::sync::Mutex::new(None),
            olap_slots: Semaphore::new(settings_olap_slots),
            cache_control,
        }))
    }
}

/// The routes. Every request runs under the request deadline and is observed (trace span,
/// latency histogram by route, source and status) and has its URI length checked; the routes
/// that do work (`/v1/…`: Redis, ClickHouse) share one bound of requests in flight, whose `503`
/// they document; the static pages, health checks and metrics stay outside it, so an
/// overloaded server still reports itself alive. `/metrics` is routed only when the metrics have
/// no listener of their own (`--metrics-addr`); otherwise it is `404` here like any unknown path.
pub fn router(state: AppState) -> Router {
    let settings = &state.0.settings;
    let bounded = Router::new()
        .route("/v1/users/{user_id}/top-songs", get(top::user_top_songs))
        .route("/v1/me/top-songs", get(top::my_top_songs))
        .layer(guard::in_flight_bound(
            settings.max_in_flight,
            settings.retry_after_secs,
        ));
    let mut routes = Router::new()
        .merge(bounded)
        .route("/widget/{user_id}", get(widget::page))
        .route("/openapi.json", get(openapi::document))
        .route("/healthz", get(top::healthz))
        .route("/readyz", get(top::readyz));
    if state.0.metrics.served_elsewhere().is_none() {
        routes = routes.route("/metrics", get(observe::metrics));
    }
    routes
        .fallback(|| async { AppError::NotFound })
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            guard::uri_length,
        ))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            observe::observe,
        ))
        .with_state(state)
}

/// Serves `router(state)` on `listener` until `shutdown`, then lets in-flight requests finish
/// for at most `drain_timeout`.
///
/// The accept loop is hyper's HTTP/1 connection builder under axum's router (`axum::serve` has
/// no header read timeout nor head size bound):
/// - at most `--max-connections` connections are open; the loop accepts the next one only when
///   one closes, so a flood waits in the kernel's listen backlog, not in this process's memory;
/// - at most `--max-connections-per-client` of them come from one IP address: one more is
///   answered `429` and closed by [`guard::ClientConnections::refuse`], giving its connection
///   slot back at once, so one client cannot hold all the others in the backlog;
/// - a connection must send a whole request head within `--header-read-timeout` (from its
///   opening and after each response) or it is closed: slow or idle clients cannot hold the
///   connection slots;
/// - a head over `--max-header-bytes` is answered `431` and the connection closed (hyper's
///   own answer, before any handler runs), so each connection buffers a bounded head.
pub async fn serve(
    listener: TcpListener,
    state: AppState,
    shutdown: CancellationToken,
    drain_timeout: Duration,
) -> Result<(), ServeError> {
    let settings = state.0.settings.clone();
    let app = TowerToHyperService::new(router(state));
    let head_bytes = usize::try_from(settings.max_header_bytes).unwrap_or(usize::MAX);
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(settings.header_read_timeout)
        .max_header_size(head_bytes)
        // The read buffer holds one head (a GET has no body to buffer); 8 KiB is hyper's floor.
        .max_buf_size(head_bytes.max(8192));
    let slots = Arc::new(Semaphore::new(
        usize::try_from(settings.max_connections).unwrap_or(usize::MAX),
    ));
    let clients = guard::ClientConnections::new(
        settings.max_connections_per_client,
        settings.retry_after_secs,
    );
    let graceful = GracefulShutdown::new();
    loop {
        let slot = tokio::select! {
            slot = Arc::clone(&slots).acquire_owned() => match slot {
                Ok(slot) => slot,
                Err(_) => break, // never closed
            },
            () = shutdown.cancelled() => break,
        };
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    // Per-connection errors (aborted handshakes) and resource exhaustion
                    // (EMFILE) alike: the server stays up and tries again shortly.
                    tracing::warn!(error = %Chain(&error), "accepting a connection failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = shutdown.cancelled() => break,
        };
        let Some(client) = clients.open(peer.ip()) else {
            drop(slot);
            clients.refuse(stream, peer.ip());
            continue;
        };
        // Answers are small and written at once: no Nagle delay.
        let _ = stream.set_nodelay(true);
        let connection = graceful.watch(http.serve_connection(TokioIo::new(stream), app.clone()));
        tokio::spawn(async move {
            if let Err(error) = connection.await {
                // Header timeouts, oversized heads, clients that went away: the client's doing.
                tracing::debug!(error = %Chain(&error), "connection ended with an error");
            }
            drop(client);
            drop(slot);
        });
    }
    drop(listener);
    tokio::select! {
        () = graceful.shutdown() => Ok(()),
        () = tokio::time::sleep(drain_timeout) => {
            tracing::warn!(?drain_timeout, "drain timeout: dropping the requests still in flight");
            Ok(())
        }
    }
}

/// `topk serve`: connects (lazily: a dependency that is down degrades requests, it does not
/// stop the process), binds and serves until `shutdown`.
pub async fn run(
    args: ApiArgs,
    clock: SharedClock,
    shutdown: CancellationToken,
) -> Result<(), ServeError> {
    let redis = Redis::connect(&args.redis)?;
    let auth = auth::Auth::from_args(&args.auth)?;
    // Before `AppState::new`: the recorder it installs is then this listener's.
    if let Some(addr) = args.telemetry.metrics_addr {
        observe::Metrics::serve_at(addr)?;
        tracing::info!(%addr, "metrics listener started");
    }
    let state = AppState::new(
        redis,
        &args.redis.prefix,
        topk::olap::Olap::connect(&args.clickhouse).await?,
        clock,
        args.settings,
        auth,
    );
    let listener = TcpListener::bind(args.listen)
        .await
        .map_err(|source| ServeError::Listen {
            addr: args.listen,
            source,
        })?;
    let addr = listener.local_addr().unwrap_or(args.listen);
    tracing::info!(
        %addr,
        auth = state.0.auth.is_some(),
        "API listening; widget at http://{addr}/widget/<user_id>"
    );
    serve(listener, state, shutdown, args.drain_timeout).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_default_to_the_flags_defaults() {
        let settings = ApiSettings::default();
        assert_eq!(settings.redis_timeout, Duration::from_millis(250));
        assert_eq!(settings.max_age, Duration::from_secs(3600));
        assert_eq!(settings.cache.key_ttl, Duration::from_secs(8 * 24 * 3600));
        assert_eq!(settings.cache.tombstone_ttl, Duration::from_secs(15 * 60));
        assert_eq!(settings.max_header_bytes, 16 * 1024);
    }
}
