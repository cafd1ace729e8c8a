//! `topk warmup`: fills Redis for every user with plays in the window, after a cold start or a
//! refresher outage longer than its catch-up.
//!
//! Users are read in pages of ascending id (`user_id > last`, served by the primary key), each
//! page refreshed through the same path as the refresher, so ClickHouse sees at most
//! `--concurrency` batch queries at a time. Each page reads `now` right before its queries and
//! takes its window and version from it: a page is a refresher cycle over its users at that
//! instant, never an answer older than the data read (a warm-up of many users runs for tens of
//! minutes; one version for all of it would store answers older than what a refresher already
//! stored or emptied). Interrupting is safe (every stored answer is complete), and so is
//! re-running: the script's guard makes racing with a refresher harmless either way
//! (ARCHITECTURE.md, "The refresher").

use std::io::IsTerminal;
use std::time::Instant;

use indicatif::{ProgressBar, ProgressStyle};
use tokio_util::sync::CancellationToken;
use topk::clock::Clock;
use topk::olap::Olap;
use topk::window::Window;

use crate::refresh::{Refresh, Refreshed};
use crate::{RefreshError, changes, events};

/// What a warm-up did.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct WarmupReport {
    pub users: u64,
    pub written: u64,
    pub unchanged: u64,
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

/// One page of a warm-up: its users, and the instant it computed them at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WarmupPage {
    pub users: Vec<u64>,
    pub window: Window,
    pub computed_at_ms: i64,
    pub refreshed: Refreshed,
}

/// A warm-up in progress, one [`Warmup::page`] at a time (what [`warmup`] loops over; tests
/// step it to interleave refresher cycles between pages).
#[derive(Debug)]
pub struct Warmup<'a> {
    refresh: &'a Refresh,
    olap: Olap,
    clock: &'a dyn Clock,
    page_size: usize,
    /// The last user of the previous page.
    after: Option<u64>,
    report: WarmupReport,
}

impl<'a> Warmup<'a> {
    pub fn new(
        refresh: &'a Refresh,
        olap: impl Into<Olap>,
        clock: &'a dyn Clock,
        page_size: usize,
    ) -> Self {
        Warmup {
            refresh,
            olap: olap.into(),
            clock,
            page_size: page_size.max(1),
            after: None,
            report: WarmupReport::default(),
        }
    }

    /// Reads and refreshes the next page; `None` once every user has been done (the report is
    /// then complete). Dropping the future in the middle leaves the warm-up where it was: the
    /// next call does the same page again.
    pub async fn page(&mut self) -> Result<Option<WarmupPage>, RefreshError> {
        if self.report.complete {
            return Ok(None);
        }
        // This page's own `now`, read before its queries: the version never claims data newer
        // than what is read, and is as new as the data (a version taken at the start of the
        // warm-up would lose, or win after a tombstone expired, against what a refresher
        // decided from newer data in between).
        let computed_at_ms = self.clock.now_ms();
        let window = Window::at(computed_at_ms);
        let users =
            changes::users_page(&self.olap, window, None, self.after, self.page_size).await?;
        let Some(&last) = users.last() else {
            self.report.complete = true;
            return Ok(None);
        };
        let refreshed = self.refresh.users(&users, window, computed_at_ms).await;
        let report = &mut self.report;
        report.users += users.len() as u64;
        report.written += refreshed.written;
        report.unchanged += refreshed.unchanged;
        report.emptied += refreshed.emptied;
        report.refused += refreshed.refused;
        report.failed += refreshed.failed.len() as u64;
        self.after = Some(last);
        Ok(Some(WarmupPage {
            users,
            window,
            computed_at_ms,
            refreshed,
        }))
    }

    /// What the pages done so far did.
    pub fn report(&self) -> &WarmupReport {
        &self.report
    }
}

/// Refreshes every user with plays in the window, a page of `page_size` users at a time (each
/// page at its own instant), until done or `shutdown`.
pub async fn warmup(
    refresh: &Refresh,
    olap: impl Into<Olap>,
    clock: &dyn Clock,
    page_size: usize,
    shutdown: CancellationToken,
) -> Result<WarmupReport, RefreshError> {
    let olap = olap.into();
    // Only the progress bar's length: the pages read their own window.
    let estimate = changes::users_estimate(&olap, Window::at(clock.now_ms())).await?;
    let mut progress = Progress::new(estimate);
    let mut pages = Warmup::new(refresh, olap, clock, page_size);
    loop {
        let page = tokio::select! {
            _ = shutdown.cancelled() => break,
            page = pages.page() => page?,
        };
        let Some(page) = page else { break };
        progress.advance(pages.report().users, page.users.len() as u64);
    }
    progress.finish();
    let report = pages.report().clone();
    events::warmup_done(&report);
    Ok(report)
}
