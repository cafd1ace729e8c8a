//! A private `redis-server` for tests that do what must not be done to the shared one (kill it,
//! flush its scripts, restart it on the same port).

use std::process::{Command, Stdio};

use topk::config::RedisArgs;

use super::private_process::PrivateProcess;

/// A private `redis-server` on a free port, killed on drop.
pub struct PrivateRedis {
    process: PrivateProcess,
    pub port: u16,
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
        let mut command = Command::new("redis-server");
        command
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(extra)
            .args(["--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(dir.path())
            .args(["--logfile", "redis.log"])
            .stdout(Stdio::null());
        let mut process = PrivateProcess::spawn(
            format!("redis-server on port {port}"),
            command,
            dir,
            "redis.log",
        );
        process.wait_until_blocking(100, || {
            let ping = Command::new("redis-cli")
                .args(["-p", &port.to_string(), "PING"])
                .output()
                .expect("redis-cli");
            // A server with a password answers NOAUTH: it is up all the same.
            let reply = String::from_utf8_lossy(&ping.stdout);
            reply.trim() == "PONG" || reply.starts_with("NOAUTH")
        });
        PrivateRedis { process, port }
    }

    pub fn args(&self) -> RedisArgs {
        RedisArgs {
            url: format!("redis://127.0.0.1:{}", self.port),
            ..super::redis_args()
        }
    }

    pub fn kill(&mut self) {
        self.process.kill();
    }
}
