//! Connection settings shared by every role. Each group is a `clap::Args` struct that a role
//! flattens into its own config, so every address is a flag and a `TOPK_…` environment variable,
//! with the defaults from the design brief.

use std::net::SocketAddr;

/// Kafka-protocol broker and topic.
#[derive(Debug, Clone, clap::Args)]
pub struct KafkaArgs {
    /// Bootstrap servers (comma-separated host:port).
    #[arg(
        long = "kafka-brokers",
        env = "TOPK_KAFKA_BROKERS",
        default_value = "127.0.0.1:9092"
    )]
    pub brokers: String,
    /// Topic the play events arrive on; malformed events go to `<topic>.dlq`.
    #[arg(
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
        long = "clickhouse-url",
        env = "TOPK_CLICKHOUSE_URL",
        default_value = "http://127.0.0.1:8123"
    )]
    pub url: String,
    /// Database holding topk's tables.
    #[arg(
        long = "clickhouse-database",
        env = "TOPK_CLICKHOUSE_DATABASE",
        default_value = "topk"
    )]
    pub database: String,
    /// ClickHouse user.
    #[arg(
        long = "clickhouse-user",
        env = "TOPK_CLICKHOUSE_USER",
        default_value = "default"
    )]
    pub user: String,
    /// ClickHouse password (prefer the environment variable over the flag).
    #[arg(
        long = "clickhouse-password",
        env = "TOPK_CLICKHOUSE_PASSWORD",
        default_value = "",
        hide_env_values = true
    )]
    pub password: String,
}

/// Redis (standalone or cluster).
#[derive(Debug, Clone, clap::Args)]
pub struct RedisArgs {
    /// Redis URL.
    #[arg(
        long = "redis-url",
        env = "TOPK_REDIS_URL",
        default_value = "redis://127.0.0.1:6379"
    )]
    pub url: String,
    /// Prefix of every key topk writes (`<prefix>:{<user_id>}:songs`).
    #[arg(
        long = "redis-prefix",
        env = "TOPK_REDIS_PREFIX",
        default_value = "topk"
    )]
    pub prefix: String,
    /// Maximum connections in the pool.
    #[arg(
        long = "redis-pool-size",
        env = "TOPK_REDIS_POOL_SIZE",
        default_value_t = 16
    )]
    pub pool_size: u32,
}

/// Logging and metrics of a long-running role.
#[derive(Debug, Clone, clap::Args)]
pub struct TelemetryArgs {
    /// Address of the Prometheus `/metrics` listener of this process (none when unset).
    #[arg(long = "metrics-addr", env = "TOPK_METRICS_ADDR")]
    pub metrics_addr: Option<SocketAddr>,
}
