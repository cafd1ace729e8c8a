//! Tracing (key/value logs to stderr, filtered by `RUST_LOG`), the Prometheus exporter, and
//! [`Chain`], how an error is written into a log line.

use std::fmt;
use std::io::{self, IsTerminal as _};
use std::net::SocketAddr;

use metrics_exporter_prometheus::PrometheusBuilder;
use tracing_subscriber::EnvFilter;

use crate::config::TelemetryArgs;

/// Errors starting telemetry.
#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    #[error("cannot start the metrics listener on {addr}")]
    Metrics {
        addr: SocketAddr,
        source: metrics_exporter_prometheus::BuildError,
    },
}

/// An error and every cause under it, `outer: cause: root cause`: how an error goes into a log
/// line (`tracing::warn!(error = %Chain(&error), …)`) or any text that leaves the process.
///
/// topk's errors describe only their own layer and name what caused it as
/// [`source`](std::error::Error::source), so `{}` of one shows its own layer alone and anyhow's
/// `{:#}` / `Debug` (what the CLI prints) show each cause once. A cause whose text the layer
/// above already contains (a library error that writes its source into its own message) is
/// not repeated.
#[derive(Clone, Copy)]
pub struct Chain<'a>(pub &'a (dyn std::error::Error + 'a));

impl fmt::Display for Chain<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut above = self.0.to_string();
        f.write_str(&above)?;
        let mut cause = self.0.source();
        while let Some(error) = cause {
            let text = error.to_string();
            if !above.contains(&text) {
                write!(f, ": {text}")?;
            }
            above = text;
            cause = error.source();
        }
        Ok(())
    }
}

impl fmt::Debug for Chain<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// Installs the global tracing subscriber (idempotent: a second call is a no-op).
pub fn init_logging() {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(|| LossyStderr)
        // tracing-subscriber reports a failed write with `eprintln!`, which panics when stderr
        // itself is the broken pipe: the task that logged (the signal handler, a worker loop)
        // would die. `LossyStderr` never fails, and this keeps the fallback quiet too.
        .log_internal_errors(false)
        // Colours only on a terminal: a log file or a collector gets plain `key=value` fields
        // (tests and operators grep them).
        .with_ansi(io::stderr().is_terminal())
        .try_init();
}

/// Standard error that never fails a write. Once the log's reader is gone (`… 2>&1 | tee log`
/// and tee exited, a collector restarted), lines are dropped and counted in
/// `topk_log_lines_dropped_total` instead of turning into errors: losing the log reader must
/// never stop shutdown, a flush or a request.
struct LossyStderr;

impl io::Write for LossyStderr {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        // One event is one `write_all` of its whole line, so a failure drops one line.
        if io::stderr().write_all(buf).is_err() {
            metrics::counter!("topk_log_lines_dropped_total").increment(1);
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        let _ = io::stderr().flush();
        Ok(())
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("outer")]
    struct Outer(#[source] Middle);

    #[derive(Debug, thiserror::Error)]
    #[error("middle: {0}")]
    struct Middle(#[source] io::Error);

    #[test]
    fn a_chain_shows_every_cause_once() {
        let error = Outer(Middle(io::Error::other("root")));
        assert_eq!(error.to_string(), "outer");
        // `Middle` writes its cause into its own message: shown once.
        assert_eq!(Chain(&error).to_string(), "outer: middle: root");
        assert_eq!(Chain(&io::Error::other("alone")).to_string(), "alone");
    }
}
