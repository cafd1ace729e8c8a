//! `topk warmup`: fills Redis for every user with plays in the window, after a cold start or a
//! refresher outage longer than its catch-up.
//!
//! Users are read in pages of ascending id (`user_id > last`, served by the primary key), each
//! page refreshed through the same path as the refresher, so ClickHouse sees at most
//! `--concurrency` batch queries at a time. Interrupting is safe (every stored answer is
//! complete), and so is re-running: a later run carries a later version and the script's guard
//! makes racing with a refresher harmless either way.

use std::io::IsTerminal;
use std::time::Instant;

use indicatif::{ProgressBar, ProgressStyle};
use tokio_util::sync::CancellationToken;
use topk::clock::Clock;
use topk::window::Window;

use crate::refresh::{Refresh, Refreshed};
use crate::{RefreshError, changes, events};

/// What a warm-up did.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct WarmupReport {
    pub users: u64,
    pub written: u64,
    pub emptied: u64,
    pub refused: u64,
    pub failed: u64,
    /// False when interrupted before the last page.
    pub complete: bool,
}

enum Progress {
    Bar(ProgressBar),
    Lines { total: u64, last: Instant },
}

impl Progress {
    fn new(total: u64) -> Self {
        if std::io::stderr().is_terminal() {
            let bar = ProgressBar::new(total);
            if let Ok(style) = ProgressStyle::with_template(
                "{elapsed_precise} [{bar:40}] {pos}/{len} users ({per_sec}, eta {eta})",
            ) {
                bar.set_style(style.progress_chars("=> "));
            }
            Progress::Bar(bar)
        } else {
            Progress::Lines {
                total,
                last: Instant::now(),
            }
        }
    }

    fn advance(&mut self, done: u64, by: u64) {
        match self {
            Progress::Bar(bar) => {
                // The total is an estimate (uniq): grow the bar rather than overflow it.
                if done > bar.length().unwrap_or(0) {
                    bar.set_length(done);
                }
                bar.inc(by);
            }
            Progress::Lines { total, last } => {
                // Plain lines for logs: at most one a second, and the last one.
                if last.elapsed().as_secs() >= 1 || done >= *total {
                    *last = Instant::now();
                    tracing::info!(done, estimated_total = *total, "warm-up progress");
                }
            }
        }
    }

    fn finish(&self) {
        if let Progress::Bar(bar) = self {
            bar.finish();
        }
    }
}

/// Refreshes every user with plays in the current window, a page of `page_size` users at a time,
/// until done or `shutdown`.
pub async fn warmup(
    refresh: &Refresh,
    client: &clickhouse::Client,
    clock: &dyn Clock,
    page_size: usize,
    shutdown: CancellationToken,
) -> Result<WarmupReport, RefreshError> {
    let computed_at_ms = clock.now_ms();
    let window = Window::at(computed_at_ms);
    let estimate = changes::users_estimate(client, window).await?;
    let mut progress = Progress::new(estimate);
    let mut report = WarmupReport::default();
    let mut after = None;
    loop {
        let page = tokio::select! {
            _ = shutdown.cancelled() => break,
            page = changes::users_page(client, window, after, page_size.max(1)) => page?,
        };
        let Some(&last) = page.last() else {
            report.complete = true;
            break;
        };
        let refreshed: Refreshed = tokio::select! {
            _ = shutdown.cancelled() => break,
            done = refresh.users(&page, window, computed_at_ms) => done,
        };
        report.users += page.len() as u64;
        report.written += refreshed.written;
        report.emptied += refreshed.emptied;
        report.refused += refreshed.refused;
        report.failed += refreshed.failed.len() as u64;
        progress.advance(report.users, page.len() as u64);
        after = Some(last);
    }
    progress.finish();
    events::warmup_done(&report);
    Ok(report)
}
