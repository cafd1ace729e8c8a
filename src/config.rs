//! Connection settings shared by every role. Each group is a `clap::Args` struct that a role
//! flattens into its own config, so every address is a flag and a `TOPK_…` environment variable,
//! with the defaults from the design brief. Every argument has an explicit, group-prefixed id so
//! that several groups can be flattened side by side into one subcommand.

use std::net::SocketAddr;
use std::time::Duration;

/// A duration flag (`250ms`, `10s`, `8d`) of at least 1 ms: a zero timeout, interval or TTL
/// would mean "never" or a busy loop.
pub fn duration(text: &str) -> Result<Duration, String> {
    duration_at_least(text, Duration::from_millis(1), "1ms")
}

/// A duration flag of at least 1 s, for what is counted in whole seconds (token lifetimes).
pub fn duration_in_seconds(text: &str) -> Result<Duration, String> {
    duration_at_least(text, Duration::from_secs(1), "1s")
}

fn duration_at_least(text: &str, min: Duration, shown: &str) -> Result<Duration, String> {
    match humantime::parse_duration(text) {
        Ok(d) if d >= min => Ok(d),
        Ok(_) => Err(format!("must be at least {shown}")),
        Err(error) => Err(error.to_string()),
    }
}

/// Kafka-protocol broker and topic.
#[derive(Debug, Clone, clap::Args)]
pub struct KafkaArgs {
    /// Bootstrap servers (comma-separated host:port).
    #[arg(
        id = "kafka_brokers",
        long = "kafka-brokers",
        env = "TOPK_KAFKA_BROKERS",
        default_value = "127.0.0.1:9092"
    )]
    pub brokers: String,
    /// Topic the play events arrive on; malformed events go to `<topic>.dlq`.
    #[arg(
        id = "kafka_topic",
        long = "kafka-topic",
        env = "TOPK_KAFKA_TOPIC",
        default_value = "plays"
    )]
    pub topic: String,
}

impl KafkaArgs {
    /// The dead-letter topic that belongs to [`KafkaArgs::topic`].
    pub fn dlq_topic(&self) -> String {
        dlq_topic(&self.topic)
    }
}

/// The dead-letter topic of `topic`.
pub fn dlq_topic(topic: &str) -> String {
    format!("{topic}.dlq")
}

/// ClickHouse over HTTP.
#[derive(Debug, Clone, clap::Args)]
pub struct ClickHouseArgs {
    /// ClickHouse HTTP endpoint.
    #[arg(
        id = "clickhouse_url",
        long = "clickhouse-url",
        env = "TOPK_CLICKHOUSE_URL",
        default_value = "http://127.0.0.1:8123"
    )]
    pub url: String,
    /// Database holding topk's tables.
    #[arg(
        id = "clickhouse_database",
        long = "clickhouse-database",
        env = "TOPK_CLICKHOUSE_DATABASE",
        default_value = "topk"
    )]
    pub database: String,
    /// ClickHouse user.
    #[arg(
        id = "clickhouse_user",
        long = "clickhouse-user",
        env = "TOPK_CLICKHOUSE_USER",
        default_value = "default"
    )]
    pub user: String,
    /// File holding the ClickHouse password (trailing newline ignored); without it the password
    /// is the `TOPK_CLICKHOUSE_PASSWORD` environment variable, or empty. Never a flag value:
    /// flags are visible in the process list.
    #[arg(
        id = "clickhouse_password_file",
        long = "clickhouse-password-file",
        env = "TOPK_CLICKHOUSE_PASSWORD_FILE",
        value_parser = Secret::from_file
    )]
    pub password_file: Option<Secret>,
    /// `TOPK_CLICKHOUSE_PASSWORD`, read when the arguments are parsed.
    #[arg(skip = Secret::from_env("TOPK_CLICKHOUSE_PASSWORD"))]
    pub password_env: Option<Secret>,
}

impl ClickHouseArgs {
    /// The password: from the file, else from the environment, else empty.
    pub fn password(&self) -> &str {
        file_or_env(&self.password_file, &self.password_env).unwrap_or_default()
    }
}

/// A credential, only ever read from a file or the environment. `Debug` never shows it, so a
/// logged configuration cannot leak it.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Secret(value.into())
    }

    /// The secret in the file at `path`, trailing whitespace (the editor's newline) removed.
    pub fn from_file(path: &str) -> Result<Self, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("cannot read {path}: {e}"))?;
        Ok(Secret(text.trim_end().to_owned()))
    }

    /// The environment variable `name`, if set and not empty.
    pub fn from_env(name: &str) -> Option<Self> {
        std::env::var(name)
            .ok()
            .filter(|value| !value.is_empty())
            .map(Secret)
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(***)")
    }
}

/// Redis (standalone or cluster).
#[derive(Debug, Clone, clap::Args)]
pub struct RedisArgs {
    /// Redis URL; with `--redis-cluster`, a comma-separated list of cluster seed nodes.
    #[arg(
        id = "redis_url",
        long = "redis-url",
        env = "TOPK_REDIS_URL",
        default_value = "redis://127.0.0.1:6379"
    )]
    pub url: String,
    /// Treat `--redis-url` as Redis Cluster seed nodes: keys are routed by slot (a user's two
    /// keys share one).
    #[arg(
        id = "redis_cluster",
        long = "redis-cluster",
        env = "TOPK_REDIS_CLUSTER",
        default_value_t = false
    )]
    pub cluster: bool,
    /// Prefix of every key topk writes (`<prefix>:{<user_id>}:songs`).
    #[arg(
        id = "redis_prefix",
        long = "redis-prefix",
        env = "TOPK_REDIS_PREFIX",
        default_value = "topk"
    )]
    pub prefix: String,
    /// Who connects (ACL user and password).
    #[command(flatten)]
    pub auth: RedisAuth,
    /// Maximum connections in the pool.
    #[arg(
        id = "redis_pool_size",
        long = "redis-pool-size",
        env = "TOPK_REDIS_POOL_SIZE",
        default_value_t = 16
    )]
    pub pool_size: u32,
}

/// Redis credentials: an ACL user (or the default one) and its password, as `AUTH` sends them
/// on every new connection (of every node, on a cluster). None: no `AUTH` (a server without
/// `requirepass`).
#[derive(Debug, Clone, Default, clap::Args)]
pub struct RedisAuth {
    /// Redis ACL user; without it, the `default` user (`requirepass`).
    #[arg(id = "redis_user", long = "redis-user", env = "TOPK_REDIS_USER")]
    pub user: Option<String>,
    /// File holding the Redis password (trailing newline ignored); without it the password is
    /// the `TOPK_REDIS_PASSWORD` environment variable, or none. Never a flag value (nor in
    /// `--redis-url`): flags are visible in the process list.
    #[arg(
        id = "redis_password_file",
        long = "redis-password-file",
        env = "TOPK_REDIS_PASSWORD_FILE",
        value_parser = Secret::from_file
    )]
    pub password_file: Option<Secret>,
    /// `TOPK_REDIS_PASSWORD`, read when the arguments are parsed.
    #[arg(skip = Secret::from_env("TOPK_REDIS_PASSWORD"))]
    pub password_env: Option<Secret>,
}

impl RedisAuth {
    /// The password: from the file, else from the environment, else none.
    pub fn password(&self) -> Option<&str> {
        file_or_env(&self.password_file, &self.password_env)
    }
}

/// A secret from its file if one was given, else from its environment variable.
fn file_or_env<'a>(file: &'a Option<Secret>, env: &'a Option<Secret>) -> Option<&'a str> {
    file.as_ref().or(env.as_ref()).map(Secret::expose)
}

/// Logging and metrics of a long-running role.
#[derive(Debug, Clone, clap::Args)]
pub struct TelemetryArgs {
    /// Address of the Prometheus `/metrics` listener of this process (none when unset).
    #[arg(id = "metrics_addr", long = "metrics-addr", env = "TOPK_METRICS_ADDR")]
    pub metrics_addr: Option<SocketAddr>,
}
