//! Tracing (key/value logs to stderr, filtered by `RUST_LOG`) and the Prometheus exporter.

use std::io::IsTerminal as _;
use std::net::SocketAddr;

use metrics_exporter_prometheus::PrometheusBuilder;
use tracing_subscriber::EnvFilter;

use crate::config::TelemetryArgs;

/// Errors starting telemetry.
#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    #[error("cannot start the metrics listener on {addr}: {source}")]
    Metrics {
        addr: SocketAddr,
        source: metrics_exporter_prometheus::BuildError,
    },
}

/// Installs the global tracing subscriber (idempotent: a second call is a no-op).
pub fn init_logging() {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // Colours only on a terminal: a log file or a collector gets plain `key=value` fields
        // (tests and operators grep them).
        .with_ansi(std::io::stderr().is_terminal())
        .try_init();
}

/// Installs logging and, when an address is configured, a Prometheus `/metrics` listener.
/// Must be called inside a tokio runtime.
pub fn init(args: &TelemetryArgs) -> Result<(), TelemetryError> {
    init_logging();
    if let Some(addr) = args.metrics_addr {
        PrometheusBuilder::new()
            .with_http_listener(addr)
            .install()
            .map_err(|source| TelemetryError::Metrics { addr, source })?;
        tracing::info!(%addr, "metrics listener started");
    }
    Ok(())
}
