//! Graceful shutdown: SIGINT and SIGTERM cancel one token; every loop selects on it, and workers
//! flush and commit before they return.

use tokio_util::sync::CancellationToken;

/// A token cancelled on the first SIGINT or SIGTERM received by the process.
pub fn on_signals() -> CancellationToken {
    let token = CancellationToken::new();
    let fired = token.clone();
    tokio::spawn(async move {
        wait_for_signal().await;
        // Cancel before logging: nothing the log does (a full or broken pipe) may delay or
        // prevent the shutdown.
        fired.cancel();
        tracing::info!("shutdown signal received");
    });
    token
}

async fn wait_for_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match (
        signal(SignalKind::interrupt()),
        signal(SignalKind::terminate()),
    ) {
        (Ok(mut int), Ok(mut term)) => {
            tokio::select! {
                _ = int.recv() => {},
                _ = term.recv() => {},
            }
        }
        // Without signal handlers the process still stops on the default disposition.
        _ => std::future::pending::<()>().await,
    }
}
