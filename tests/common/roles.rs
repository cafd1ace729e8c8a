//! Roles as processes: each a `topk` child process against a private stack, restarted after
//! each kill, each incarnation logging to a file of its own (`<name>-<n>.log`), and every exit
//! nobody asked for recorded.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::process::Child;
use tokio::time::Instant;

/// What the roles of one test share: their log folder, the environment they are given and the
/// list of their unexpected exits.
pub struct Roles {
    logs: PathBuf,
    env: Vec<(String, String)>,
    exits: Arc<Mutex<Vec<String>>>,
}

impl Roles {
    /// Roles logging to `logs`, each given `env` (on top of an environment without the
    /// shared stack's variables: see `scrub_env`).
    pub fn new(logs: PathBuf, env: &[(&str, &str)]) -> Self {
        Roles {
            logs,
            env: env
                .iter()
                .map(|&(name, value)| (name.to_owned(), value.to_owned()))
                .collect(),
            exits: Arc::default(),
        }
    }

    /// The exits nobody asked for, of every role: (incarnation log, status).
    pub fn exits(&self) -> Arc<Mutex<Vec<String>>> {
        self.exits.clone()
    }

    /// The role `name`: `topk <args…>`, not started yet.
    pub fn role(&self, name: &'static str, args: Vec<String>) -> Role {
        Role {
            name,
            args,
            logs: self.logs.clone(),
            env: self.env.clone(),
            child: None,
            starts: 0,
            unexpected_exits: self.exits.clone(),
        }
    }
}

/// One role: a `topk` child process, restarted after each kill, each incarnation logging to a
/// file of its own.
pub struct Role {
    name: &'static str,
    args: Vec<String>,
    logs: PathBuf,
    env: Vec<(String, String)>,
    /// The running incarnation.
    pub child: Option<Child>,
    /// Incarnations started so far.
    pub starts: usize,
    /// Exits nobody asked for: (incarnation log, status).
    unexpected_exits: Arc<Mutex<Vec<String>>>,
}

impl Role {
    fn log_path(&self, n: usize) -> PathBuf {
        self.logs.join(format!("{}-{n:03}.log", self.name))
    }

    /// The log of the newest incarnation.
    pub fn current_log(&self) -> PathBuf {
        self.log_path(self.starts - 1)
    }

    /// Starts a new incarnation, given `extra` flags too.
    pub fn start_with(&mut self, extra: &[&str]) {
        assert!(self.child.is_none(), "{} already running", self.name);
        let mut command = super::topk_command(&self.args, &self.log_path(self.starts));
        command.args(extra);
        super::scrub_env(&mut command);
        command.envs(self.env.iter().map(|(name, value)| (name, value)));
        self.child = Some(command.spawn().expect("topk starts"));
        self.starts += 1;
    }

    pub fn start(&mut self) {
        self.start_with(&[]);
    }

    /// Records the current incarnation as an unexpected exit if it is no longer running.
    pub fn check(&mut self) {
        if let Some(child) = &mut self.child
            && let Ok(Some(status)) = child.try_wait()
        {
            self.unexpected_exits.lock().unwrap().push(format!(
                "{} exited on its own ({status}); log {:?}",
                self.name,
                self.current_log()
            ));
            self.child = None;
        }
    }

    pub async fn kill_9(&mut self) {
        self.check();
        if let Some(mut child) = self.child.take() {
            child.start_kill().expect("SIGKILL");
            child.wait().await.expect("reaped");
        }
    }

    /// SIGTERM; the role must exit cleanly.
    pub async fn terminate(&mut self) {
        self.check();
        let child = self
            .child
            .take()
            .unwrap_or_else(|| panic!("{} is not running", self.name));
        super::terminate(child).await;
    }
}

/// The newest incarnation log of the role `name` in `logs`.
pub fn newest_log(logs: &Path, name: &str) -> Option<PathBuf> {
    std::fs::read_dir(logs)
        .ok()?
        .filter_map(Result::ok)
        .map(|entry| entry.path())
        .filter(|path| {
            path.file_name()
                .and_then(|n| n.to_str())
                .and_then(|n| n.strip_prefix(name)?.strip_prefix('-'))
                .is_some_and(|rest| rest.starts_with(|c: char| c.is_ascii_digit()))
        })
        .max()
}

/// Waits until the file `log()` names contains `needle`, for at most `limit` (a disruption
/// aimed at a role that never got that far still happens, only less precisely).
/// Whether it came.
pub async fn wait_for_line(
    log: impl Fn() -> Option<PathBuf>,
    needle: &str,
    limit: Duration,
) -> bool {
    let started = Instant::now();
    loop {
        if log()
            .and_then(|path| std::fs::read_to_string(path).ok())
            .is_some_and(|text| text.contains(needle))
        {
            return true;
        }
        if started.elapsed() >= limit {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
