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
//!   (counted in [`crate::guard`]).
//!
//! Every request runs in a `request` span (method, route) under the request deadline.

use std::sync::OnceLock;
use std::time::Instant;

use axum::extract::{MatchedPath, Request, State};
use axum::http::header;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
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

/// The process's Prometheus recorder, rendered at `/metrics`.
#[derive(Clone)]
pub struct Metrics(Option<PrometheusHandle>);

impl Metrics {
    /// Installs the process-wide Prometheus recorder once (later calls share it). `None` when
    /// another recorder was installed first (then `/metrics` says so).
    pub fn install() -> Self {
        static HANDLE: OnceLock<Option<PrometheusHandle>> = OnceLock::new();
        Metrics(
            HANDLE
                .get_or_init(|| {
                    PrometheusBuilder::new()
                        .set_buckets_for_metric(
                            Matcher::Full("topk_api_request_seconds".to_owned()),
                            BUCKETS,
                        )
                        .ok()?
                        .install_recorder()
                        .map_err(|error| tracing::warn!(%error, "no Prometheus recorder"))
                        .ok()
                })
                .clone(),
        )
    }
}

/// `/metrics`: the Prometheus text format.
pub async fn metrics(State(state): State<AppState>) -> Response {
    match &state.0.metrics.0 {
        Some(handle) => {
            handle.run_upkeep();
            (
                [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
                handle.render(),
            )
                .into_response()
        }
        None => AppError::Unavailable {
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

pub fn redis_failed(op: &'static str, error: &str) {
    metrics::counter!("topk_api_dependency_errors_total", "dependency" => "redis", "op" => op)
        .increment(1);
    tracing::warn!(op, %error, "Redis failed");
}

pub fn olap_failed(error: &str) {
    metrics::counter!("topk_api_dependency_errors_total",
        "dependency" => "clickhouse", "op" => "top")
    .increment(1);
    tracing::warn!(%error, "ClickHouse failed");
}

pub fn write_back(outcome: topk::cache::Outcome) {
    let outcome = match outcome {
        topk::cache::Outcome::Written => "written",
        topk::cache::Outcome::Emptied => "emptied",
        topk::cache::Outcome::Refused => "refused",
    };
    metrics::counter!("topk_api_write_back_total", "outcome" => outcome).increment(1);
}
