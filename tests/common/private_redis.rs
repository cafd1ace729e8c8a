//! A private `redis-server` for tests that do what must not be done to the shared one (kill it,
//! flush its scripts, restart it on the same port).

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use topk::config::RedisArgs;

/// A private `redis-server` on a free port, killed on drop.
pub struct PrivateRedis {
    child: Child,
    pub port: u16,
    _dir: tempfile::TempDir,
}

impl PrivateRedis {
    pub fn start() -> Self {
        Self::start_on(super::free_port())
    }

    pub fn start_on(port: u16) -> Self {
        Self::start_with(port, &[])
    }

    /// A private server given `extra` arguments too (e.g. `--requirepass`).
    pub fn start_with(port: u16, extra: &[&str]) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(extra)
            .args(["--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(dir.path())
            .args(["--logfile", "redis.log"])
            .stdout(Stdio::null())
            .spawn()
            .expect("redis-server runs");
        let mut redis = PrivateRedis {
            child,
            port,
            _dir: dir,
        };
        for _ in 0..100 {
            if let Ok(Some(status)) = redis.child.try_wait() {
                let log = std::fs::read_to_string(redis._dir.path().join("redis.log"));
                panic!("private redis-server on port {port} exited ({status}): {log:?}");
            }
            let ping = Command::new("redis-cli")
                .args(["-p", &port.to_string(), "PING"])
                .output()
                .expect("redis-cli");
            // A server with a password answers NOAUTH: it is up all the same.
            let reply = String::from_utf8_lossy(&ping.stdout);
            if reply.trim() == "PONG" || reply.starts_with("NOAUTH") {
                return redis;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("private redis-server did not start");
    }

    pub fn args(&self) -> RedisArgs {
        RedisArgs {
            url: format!("redis://127.0.0.1:{}", self.port),
            ..super::redis_args()
        }
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for PrivateRedis {
    fn drop(&mut self) {
        self.kill();
    }
}
