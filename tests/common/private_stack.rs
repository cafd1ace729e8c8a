//! Services of one test only, run by `scripts/stack` in a folder of its own
//! (`TOPK_STACK_DIR`) on ports the OS gave (`TOPK_STACK_…_PORT`), so that stopping,
//! restarting or stalling them disturbs no other test. Brought down on drop (also when the
//! test panics; then the folder with every log is kept and its path printed).

use std::path::{Path, PathBuf};

use topk::config::{ClickHouseArgs, RedisArgs};

/// What a private stack runs, and the names its roles are given.
#[derive(Debug, Clone, Copy)]
pub struct Spec {
    /// Names its folder (`topk-<name>-…`) and its messages.
    pub name: &'static str,
    /// The `scripts/stack` services it runs: any of `redis`, `clickhouse`,
    /// `clickhouse-cluster`, `tansu`.
    pub services: &'static [&'static str],
    /// The topic tansu is given (with its dead-letter topic) and their partitions.
    pub topic: &'static str,
    pub partitions: i32,
    /// The database and the Redis key prefix the roles are given.
    pub database: &'static str,
    pub prefix: &'static str,
    /// A variable that, when set, keeps the folder after a run that passed too (to study one).
    pub keep_var: Option<&'static str>,
}

impl Default for Spec {
    fn default() -> Self {
        Spec {
            name: "private",
            services: &[],
            topic: "plays",
            partitions: 8,
            database: "topk",
            prefix: "topk",
            keep_var: None,
        }
    }
}

/// A running private stack: see the module.
pub struct PrivateStack {
    spec: Spec,
    dir: Option<tempfile::TempDir>,
    redis_port: u16,
    ch_http_port: u16,
    ch_tcp_port: u16,
    kafka_port: u16,
    /// HTTP and native ports of the clickhouse-cluster service's two shards.
    shard_http_ports: [u16; 2],
    shard_tcp_ports: [u16; 2],
}

impl PrivateStack {
    /// Brings up the services of `spec` (and a `logs` folder for the roles).
    pub async fn start(spec: Spec) -> Self {
        if spec.services.contains(&"tansu") {
            // The binary first: `scripts/stack up tansu` builds it too, and would otherwise do
            // so with the test's timing on the clock.
            super::topk_bin();
        }
        let stack = PrivateStack {
            spec,
            dir: Some(
                tempfile::Builder::new()
                    .prefix(&format!("topk-{}-", spec.name))
                    .tempdir()
                    .expect("tempdir"),
            ),
            redis_port: super::free_port(),
            ch_http_port: super::free_port(),
            ch_tcp_port: super::free_port(),
            kafka_port: super::free_port(),
            shard_http_ports: [super::free_port(), super::free_port()],
            shard_tcp_ports: [super::free_port(), super::free_port()],
        };
        std::fs::create_dir_all(stack.logs()).expect("log dir");
        stack.run("up", spec.services).await;
        stack
    }

    /// Its folder: `scripts/stack`'s in `stack/` (pid files, service logs), the roles' logs in
    /// `logs/`.
    pub fn path(&self) -> &Path {
        self.dir.as_ref().expect("dir").path()
    }

    pub fn logs(&self) -> PathBuf {
        self.path().join("logs")
    }

    fn command(&self, verb: &str, services: &[&str]) -> tokio::process::Command {
        let mut command =
            tokio::process::Command::new(super::workspace_root().join("scripts/stack"));
        super::scrub_env(&mut command);
        command
            .arg(verb)
            .args(services)
            .env("TOPK_STACK_DIR", self.path().join("stack"))
            .env("TOPK_BROKER", "tansu")
            .env("TOPK_PARTITIONS", self.spec.partitions.to_string())
            .env("TOPK_KAFKA_TOPIC", self.spec.topic)
            .env("TOPK_STACK_REDIS_PORT", self.redis_port.to_string())
            .env("TOPK_STACK_CH_HTTP_PORT", self.ch_http_port.to_string())
            .env("TOPK_STACK_CH_TCP_PORT", self.ch_tcp_port.to_string())
            .env("TOPK_STACK_KAFKA_PORT", self.kafka_port.to_string())
            .envs(self.cluster_ports())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true);
        command
    }

    /// `scripts/stack <verb> <services…>` on this stack (`down` then `up` restarts a service);
    /// asserts that it succeeded.
    pub async fn run(&self, verb: &str, services: &[&str]) {
        let output = self
            .command(verb, services)
            .output()
            .await
            .expect("scripts/stack runs");
        assert!(
            output.status.success(),
            "scripts/stack {verb} {services:?} failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }

    pub fn brokers(&self) -> String {
        format!("127.0.0.1:{}", self.kafka_port)
    }

    pub fn clickhouse(&self) -> ClickHouseArgs {
        ClickHouseArgs {
            url: format!("http://127.0.0.1:{}", self.ch_http_port),
            ..super::clickhouse_args(self.spec.database)
        }
    }

    /// Its clickhouse-cluster service: the cluster `topk` of two shards, the meta server on
    /// shard 1.
    pub fn clickhouse_cluster(&self) -> ClickHouseArgs {
        let shard_urls: Vec<String> = self
            .shard_http_ports
            .iter()
            .map(|port| format!("http://127.0.0.1:{port}"))
            .collect();
        ClickHouseArgs {
            url: shard_urls[0].clone(),
            cluster: Some("topk".to_owned()),
            shard_urls,
            ..super::clickhouse_args(self.spec.database)
        }
    }

    pub fn redis(&self) -> RedisArgs {
        RedisArgs {
            url: format!("redis://127.0.0.1:{}", self.redis_port),
            prefix: self.spec.prefix.to_owned(),
            ..super::redis_args()
        }
    }

    /// The flags that point a role at this stack's Kafka, ClickHouse and Redis (those asked for).
    pub fn flags(&self, kafka: bool, clickhouse: bool, redis: bool) -> Vec<String> {
        let Spec {
            topic,
            database,
            prefix,
            ..
        } = self.spec;
        let mut flags = Vec::new();
        if kafka {
            flags.push(format!("--kafka-brokers={}", self.brokers()));
            flags.push(format!("--kafka-topic={topic}"));
        }
        if clickhouse {
            flags.push(format!("--clickhouse-url={}", self.clickhouse().url));
            flags.push(format!("--clickhouse-database={database}"));
        }
        if redis {
            flags.push(format!("--redis-url={}", self.redis().url));
            flags.push(format!("--redis-prefix={prefix}"));
        }
        flags
    }
}

impl PrivateStack {
    /// The ports of its clickhouse-cluster service, as `scripts/stack` reads them.
    fn cluster_ports(&self) -> [(&'static str, String); 2] {
        let list = |ports: &[u16]| {
            ports
                .iter()
                .map(u16::to_string)
                .collect::<Vec<_>>()
                .join(" ")
        };
        [
            (
                "TOPK_STACK_CH_CLUSTER_HTTP_PORTS",
                list(&self.shard_http_ports),
            ),
            (
                "TOPK_STACK_CH_CLUSTER_TCP_PORTS",
                list(&self.shard_tcp_ports),
            ),
        ]
    }
}

impl Drop for PrivateStack {
    fn drop(&mut self) {
        let mut command = std::process::Command::new(super::workspace_root().join("scripts/stack"));
        command
            .arg("down")
            .args(self.spec.services)
            .env("TOPK_STACK_DIR", self.path().join("stack"))
            .env("TOPK_BROKER", "tansu")
            .envs(self.cluster_ports())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null());
        let _ = command.status();
        let keep = self
            .spec
            .keep_var
            .is_some_and(|name| std::env::var_os(name).is_some());
        if (std::thread::panicking() || keep)
            && let Some(dir) = self.dir.take()
        {
            eprintln!(
                "{}: logs and stack data kept in {:?}",
                self.spec.name,
                dir.keep()
            );
        }
    }
}
