//! The shape of every private server a test starts itself (`private_redis`,
//! `private_clickhouse`): one process on free loopback ports with a data folder of its own,
//! waited for until it answers, killed (and its folder removed) on drop.

use std::path::Path;
use std::process::{Child, Command};
use std::time::Duration;

/// A private server process; killed on drop.
pub struct PrivateProcess {
    /// What the messages call it, e.g. `redis-server on port 1234`.
    name: String,
    child: Child,
    /// The file in `dir` a failure shows.
    log: &'static str,
    dir: tempfile::TempDir,
}

impl PrivateProcess {
    /// Spawns `command`, whose data and logs go to `dir`; `log` (a file in `dir`) is what a
    /// failure shows. Not waited for yet: see [`wait_until`](Self::wait_until).
    pub fn spawn(
        name: impl Into<String>,
        mut command: Command,
        dir: tempfile::TempDir,
        log: &'static str,
    ) -> Self {
        let name = name.into();
        let child = command
            .spawn()
            .unwrap_or_else(|e| panic!("{name} runs: {e}"));
        PrivateProcess {
            name,
            child,
            log,
            dir,
        }
    }

    /// Its data folder.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Panics with its log if the process has exited.
    fn assert_running(&mut self) {
        if let Ok(Some(status)) = self.child.try_wait() {
            let log = std::fs::read_to_string(self.dir.path().join(self.log));
            panic!("private {} exited ({status}): {log:?}", self.name);
        }
    }

    /// Asks `ready` every 50 ms, at most `attempts` times, until it says yes; panics if the
    /// process exits first or never answers.
    pub async fn wait_until(&mut self, attempts: usize, mut ready: impl AsyncFnMut() -> bool) {
        for _ in 0..attempts {
            self.assert_running();
            if ready().await {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("private {} did not answer", self.name);
    }

    /// As [`wait_until`](Self::wait_until), for a caller outside any runtime: `ready` blocks.
    pub fn wait_until_blocking(&mut self, attempts: usize, mut ready: impl FnMut() -> bool) {
        for _ in 0..attempts {
            self.assert_running();
            if ready() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("private {} did not answer", self.name);
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for PrivateProcess {
    fn drop(&mut self) {
        self.kill();
    }
}
