//! Observability of the API, one function per event (its log line and its metric together):
//!
//! - `topk_api_request_seconds` histogram, labels `route` (the matched route template),
//!   `source` (`cache`, `olap`, `stale`, `none` for errors and other routes) and `status`;
//! - `topk_api_cache_total{result=hit|miss|expired|error}`: the cache hit ratio is
//!   `hit / sum` (`expired`: older than `--max-age`, recomputed);
//! - `topk_api_fallback_total{reason=cache_miss|redis_down}`: answers computed by ClickHouse;
//! - `topk_api_stale_total`: cached answers served stale because ClickHouse failed;
//! - `topk_api_dependency_errors_total{dependency=redis|clickhouse, op}`;
//! - `topk_api_write_back_total{outcome=written|emptied|refused}`;
//! - `topk_api_shed_total`: requests answered `503` at once over `--max-in-flight`
//!   (counted in [`crate::guard`]);
//! - `topk_api_refused_connections_total`: connections refused (`429`, or closed unanswered
//!   past [`crate::guard::MAX_REFUSALS_IN_FLIGHT`]) because their client already held
//!   `--max-connections-per-client`.
//!
//! Every request runs in a `request` span (method, route) under the request deadline.
//!
//! The metrics are rendered at `/metrics` on the API's own listener, or, with `--metrics-addr`,
//! only on a listener of their own ([`Metrics::serve_at`]), as the other roles do.

use std::net::{IpAddr, SocketAddr};
use std::sync::OnceLock;
use std::time::Instant;

use axum::extract::{MatchedPath, Request, State};
use axum::http::{HeaderMap, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use metrics_exporter_prometheus::{BuildError, Matcher, PrometheusBuilder, PrometheusHandle};
use topk::telemetry::Chain;
use tracing::Instrument;

use crate::{AppError, AppState};

/// Which path produced an answer (a response extension the request observer reads).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AnswerSource {
    Cache,
    Olap,
    /// The cached answer, served with `stale: true` because ClickHouse failed.
    Stale,
}

impl AnswerSource {
    fn label(self) -> &'static str {
        match self {
            AnswerSource::Cache => "cache",
            AnswerSource::Olap => "olap",
            AnswerSource::Stale => "stale",
        }
    }
}

/// Latency buckets (seconds): a cache hit takes well under a millisecond, a ClickHouse
/// computation milliseconds to the olap deadline.
const BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
];

/// The process's Prometheus recorder and where it is rendered.
#[derive(Clone)]
pub struct Metrics(Exporter);

#[derive(Clone)]
enum Exporter {
    /// Rendered by the API at `/metrics` on its own listener.
    Here(PrometheusHandle),
    /// Served by a listener of its own at this address (`--metrics-addr`): not on the API's.
    Elsewhere(SocketAddr),
    /// Another recorder was installed first: `/metrics` says so.
    Missing,
}

/// The recorder of this process, installed once (by [`Metrics::serve_at`] or the first
/// [`Metrics::install`]).
static INSTALLED: OnceLock<Exporter> = OnceLock::new();

/// Errors installing the metrics listener.
#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    #[error("cannot start the metrics listener on {addr}")]
    Listen {
        addr: SocketAddr,
        source: BuildError,
    },
    #[error("cannot start the metrics listener on {addr}: this process's recorder is installed")]
    AlreadyInstalled { addr: SocketAddr },
}

/// The API's recorder: the exporter's defaults with the latency histogram's buckets.
fn builder() -> Result<PrometheusBuilder, BuildError> {
    PrometheusBuilder::new().set_buckets_for_metric(
        Matcher::Full("topk_api_request_seconds".to_owned()),
        BUCKETS,
    )
}

impl Metrics {
    /// Installs the process-wide Prometheus recorder once (later calls share it), rendered by
    /// the API at `/metrics` unless [`Metrics::serve_at`] installed it first. Missing when
    /// another recorder was installed first (then `/metrics` says so).
    pub fn install() -> Self {
        Metrics(
            INSTALLED
                .get_or_init(
                    || match builder().and_then(PrometheusBuilder::install_recorder) {
                        Ok(handle) => Exporter::Here(handle),
                        Err(error) => {
                            tracing::warn!(error = %Chain(&error), "no Prometheus recorder");
                            Exporter::Missing
                        }
                    },
                )
                .clone(),
        )
    }

    /// Installs the process-wide recorder with a `/metrics` listener of its own at `addr`: the
    /// exporter's HTTP listener that `topk::telemetry::init` starts for the other roles (the
    /// same `--metrics-addr`), with the API's histogram buckets. The API's own listener then
    /// answers `404` for `/metrics` ([`crate::router`]). Must run inside a tokio runtime, before
    /// the first [`Metrics::install`] (which [`crate::AppState::new`] calls): one recorder per
    /// process.
    pub fn serve_at(addr: SocketAddr) -> Result<Self, MetricsError> {
        let mut failed = None;
        let exporter = INSTALLED.get_or_init(|| {
            match builder().and_then(|b| b.with_http_listener(addr).install()) {
                Ok(()) => Exporter::Elsewhere(addr),
                Err(source) => {
                    failed = Some(source);
                    Exporter::Missing
                }
            }
        });
        if let Some(source) = failed {
            return Err(MetricsError::Listen { addr, source });
        }
        match exporter {
            Exporter::Elsewhere(at) if *at == addr => Ok(Metrics(exporter.clone())),
            _ => Err(MetricsError::AlreadyInstalled { addr }),
        }
    }

    /// The address of the metrics' own listener, when they have one (`--metrics-addr`).
    pub fn served_elsewhere(&self) -> Option<SocketAddr> {
        match self.0 {
            Exporter::Elsewhere(addr) => Some(addr),
            Exporter::Here(_) | Exporter::Missing => None,
        }
    }
}

/// `/metrics` on the API's listener: the Prometheus text format. With authentication on it
/// needs a token with the admin scope (`401` without a valid token, `403` with another one):
/// the counters tell request rates, cache ratios and dependency failures, which are the
/// operator's business, not every caller's. A `--metrics-addr` listener has no such check: it
/// is meant for a private address, as the other roles'.
pub async fn metrics(State(state): State<AppState>, headers: HeaderMap) -> Response {
    if let Some(auth) = &state.0.auth {
        match auth.caller(&headers) {
            Ok(caller) if caller.admin => {}
            Ok(_) => {
                return AppError::Forbidden(
                    "/metrics needs a token with the admin scope".to_owned(),
                )
                .into_response();
            }
            Err(error) => return error.into_response(),
        }
    }
    match &state.0.metrics.0 {
        Exporter::Here(handle) => {
            handle.run_upkeep();
            (
                [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
                handle.render(),
            )
                .into_response()
        }
        // Not routed (`crate::router`); answered as any unknown route if it ever were.
        Exporter::Elsewhere(_) => AppError::NotFound.into_response(),
        Exporter::Missing => AppError::Unavailable {
            reason: "no metrics recorder in this process".to_owned(),
            retry_after_secs: state.0.settings.retry_after_secs,
        }
        .into_response(),
    }
}

/// The request deadline, the `request` span and the latency histogram of every route.
pub async fn observe(
    State(state): State<AppState>,
    matched: Option<MatchedPath>,
    request: Request,
    next: Next,
) -> Response {
    let route = matched.map_or_else(|| "unmatched".to_owned(), |m| m.as_str().to_owned());
    let method = request.method().clone();
    let span = tracing::info_span!("request", %method, route = %route);
    let started = Instant::now();
    let deadline = state.0.settings.request_timeout;
    let response = match tokio::time::timeout(deadline, next.run(request))
        .instrument(span.clone())
        .await
    {
        Ok(response) => response,
        Err(_) => {
            metrics::counter!("topk_api_deadline_exceeded_total").increment(1);
            span.in_scope(|| tracing::warn!(?deadline, "request deadline passed"));
            AppError::Unavailable {
                reason: format!("no answer within the request deadline ({deadline:?})"),
                retry_after_secs: state.0.settings.retry_after_secs,
            }
            .into_response()
        }
    };
    let elapsed = started.elapsed();
    let source = response
        .extensions()
        .get::<AnswerSource>()
        .map_or("none", |s| s.label());
    let status = response.status().as_u16();
    metrics::histogram!("topk_api_request_seconds",
        "route" => route, "source" => source, "status" => status.to_string())
    .record(elapsed.as_secs_f64());
    span.in_scope(|| {
        tracing::debug!(
            status,
            source,
            elapsed_us = elapsed.as_micros() as u64,
            "request"
        )
    });
    response
}

pub fn cache(result: &'static str) {
    metrics::counter!("topk_api_cache_total", "result" => result).increment(1);
}

pub fn fallback(reason: &'static str) {
    metrics::counter!("topk_api_fallback_total", "reason" => reason).increment(1);
    tracing::debug!(reason, "answer computed from ClickHouse");
}

pub fn stale() {
    metrics::counter!("topk_api_stale_total").increment(1);
    tracing::warn!("ClickHouse failed: serving the cached answer as stale");
}

pub fn redis_failed(op: &'static str, error: &dyn std::error::Error) {
    metrics::counter!("topk_api_dependency_errors_total", "dependency" => "redis", "op" => op)
        .increment(1);
    tracing::warn!(op, error = %Chain(error), "Redis failed");
}

pub fn olap_failed(error: &dyn std::error::Error) {
    metrics::counter!("topk_api_dependency_errors_total",
        "dependency" => "clickhouse", "op" => "top")
    .increment(1);
    tracing::warn!(error = %Chain(error), "ClickHouse failed");
}

pub fn write_back(outcome: topk::cache::Outcome) {
    let outcome = match outcome {
        topk::cache::Outcome::Written => "written",
        topk::cache::Outcome::Unchanged => "unchanged",
        topk::cache::Outcome::Emptied => "emptied",
        topk::cache::Outcome::Refused => "refused",
    };
    metrics::counter!("topk_api_write_back_total", "outcome" => outcome).increment(1);
}

/// A connection refused because `peer` already held `max` connections
/// (`--max-connections-per-client`). Logged at debug only: a client flooding past its share
/// must not flood the log too (the counter shows it).
pub fn connection_refused(peer: IpAddr, max: u32) {
    metrics::counter!("topk_api_refused_connections_total").increment(1);
    tracing::debug!(%peer, max, "connection refused: the client holds its share of connections");
}
