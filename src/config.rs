//! Connection settings shared by every role. Each group is a `clap::Args` struct that a role
//! flattens into its own config, so every address is a flag and a `TOPK_…` environment variable,
//! with the defaults of docs/contracts.md ("Defaults"). Every argument has an explicit,
//! group-prefixed id so that several groups can be flattened side by side into one subcommand.

use std::net::SocketAddr;
use std::time::Duration;

/// The values of a flag group when no flag and no environment variable is given: its clap
/// defaults, so that each default is written once, in its `#[arg]` (a group's `Default` is
/// this). The `TOPK_…` variables are not read, so a default is the same in every process (a
/// `#[arg(skip = …)]` field is still its expression). Panics if the group has a required flag
/// (a programming error, caught by the group's tests).
pub fn defaults<T: clap::Args>() -> T {
    let command = T::augment_args(clap::Command::new("defaults")).mut_args(|arg| arg.env(None));
    command
        .try_get_matches_from(["defaults"])
        .and_then(|matches| T::from_arg_matches(&matches))
        .unwrap_or_else(|error| panic!("a flag group without defaults: {error}"))
}

/// A duration flag that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum DurationError {
    #[error(transparent)]
    Unreadable(#[from] humantime::DurationError),
    #[error("must be at least {0}")]
    TooShort(&'static str),
}

/// A duration flag (`250ms`, `10s`, `8d`) of at least 1 ms: a zero timeout, interval or TTL
/// would mean "never" or a busy loop.
pub fn duration(text: &str) -> Result<Duration, DurationError> {
    duration_at_least(text, Duration::from_millis(1), "1ms")
}

/// A duration flag of at least 1 s, for what is counted in whole seconds (token lifetimes).
pub fn duration_in_seconds(text: &str) -> Result<Duration, DurationError> {
    duration_at_least(text, Duration::from_secs(1), "1s")
}

fn duration_at_least(
    text: &str,
    min: Duration,
    shown: &'static str,
) -> Result<Duration, DurationError> {
    match humantime::parse_duration(text)? {
        d if d >= min => Ok(d),
        _ => Err(DurationError::TooShort(shown)),
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

    /// The touches topic that belongs to [`KafkaArgs::topic`] (see [`crate::touches`]).
    pub fn touches_topic(&self) -> String {
        crate::touches::topic(&self.topic)
    }

    /// Every topic of a deployment: the plays, their dead letters and their touches.
    pub fn all_topics(&self) -> [String; 3] {
        all_topics(&self.topic)
    }
}

/// The plays topic `topic`, its dead letters and its touches.
pub fn all_topics(topic: &str) -> [String; 3] {
    [
        topic.to_owned(),
        dlq_topic(topic),
        crate::touches::topic(topic),
    ]
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
    /// Run on a sharded ClickHouse cluster: the name of the cluster in the servers'
    /// `remote_servers`. Each user's rows live on shard `user_id % shards`; the protocol tables
    /// (flush log, rollup log, day touches) on the server of `--clickhouse-url`. Requires
    /// `--clickhouse-shard-urls`.
    #[arg(
        id = "clickhouse_cluster",
        long = "clickhouse-cluster",
        env = "TOPK_CLICKHOUSE_CLUSTER",
        requires = "clickhouse_shard_urls"
    )]
    pub cluster: Option<String>,
    /// The HTTP endpoint of every shard of `--clickhouse-cluster`, comma-separated, in the
    /// cluster's shard order (checked against the cluster at start).
    #[arg(
        id = "clickhouse_shard_urls",
        long = "clickhouse-shard-urls",
        env = "TOPK_CLICKHOUSE_SHARD_URLS",
        value_delimiter = ',',
        requires = "clickhouse_cluster"
    )]
    pub shard_urls: Vec<String>,
    /// Servers holding replicas of the tables of `--clickhouse-url` and the shards
    /// (ReplicatedMergeTree over ZooKeeper), comma-separated: `topk migrate` creates the
    /// tables on them too, migration by migration on every server; the other roles use the
    /// servers above only and ClickHouse replicates.
    #[arg(
        id = "clickhouse_replica_urls",
        long = "clickhouse-replica-urls",
        env = "TOPK_CLICKHOUSE_REPLICA_URLS",
        value_delimiter = ','
    )]
    pub replica_urls: Vec<String>,
    /// The quota key every statement is sent with (the `X-ClickHouse-Quota` header): a server
    /// whose quota is keyed by the client's key (`<keyed/>` on 18.16, `KEYED BY client_key`
    /// on a current ClickHouse) then accounts each role (or tenant) apart, and
    /// `system.query_log` names it beside every statement. Unset, no key is sent.
    #[arg(
        id = "clickhouse_quota_key",
        long = "clickhouse-quota-key",
        env = "TOPK_CLICKHOUSE_QUOTA_KEY"
    )]
    pub quota_key: Option<String>,
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
    pub fn from_file(path: &str) -> Result<Self, SecretFileError> {
        let text = std::fs::read_to_string(path).map_err(|error| SecretFileError {
            path: path.to_owned(),
            error,
        })?;
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

/// A secret file that cannot be read. The reason is part of the message, not a `source`: clap,
/// which reports it for a `--…-file` flag, prints an error's own message only.
#[derive(Debug, thiserror::Error)]
#[error("cannot read {path}: {error}")]
pub struct SecretFileError {
    pub path: String,
    pub error: std::io::Error,
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

/// A secret from its file if one was given, else from its environment variable: the one way
/// every `--…-file` flag and its `TOPK_…` variable are read.
pub fn file_or_env<'a>(file: &'a Option<Secret>, env: &'a Option<Secret>) -> Option<&'a str> {
    file.as_ref().or(env.as_ref()).map(Secret::expose)
}

/// Logging and metrics of a long-running role.
#[derive(Debug, Clone, clap::Args)]
pub struct TelemetryArgs {
    /// Address of the Prometheus `/metrics` listener of this process (none when unset).
    #[arg(id = "metrics_addr", long = "metrics-addr", env = "TOPK_METRICS_ADDR")]
    pub metrics_addr: Option<SocketAddr>,
}

/// The settings every consumer-group role (aggregator, archiver) has, under the same names:
/// membership and shutdown (`topk::group`).
#[derive(Debug, Clone, clap::Args)]
pub struct MemberArgs {
    /// Kafka consumer-group session timeout: how long a dead member keeps its partitions.
    #[arg(long, env = "TOPK_KAFKA_SESSION_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration)]
    pub kafka_session_timeout: std::time::Duration,
    /// How long SIGTERM may spend on the final flush or upload before giving up (nothing is
    /// lost: the uncommitted range is re-read by the next owner).
    #[arg(long, env = "TOPK_SHUTDOWN_TIMEOUT", default_value = "30s", value_parser = humantime::parse_duration)]
    pub shutdown_timeout: std::time::Duration,
    /// Test hook: sleep this long between writing a flush (or an upload) and committing its
    /// offsets, to widen the window a crash test aims `kill -9` at.
    #[arg(long, env = "TOPK_TEST_PAUSE_BEFORE_COMMIT", value_parser = humantime::parse_duration, hide = true)]
    pub test_pause_before_commit: Option<std::time::Duration>,
}

/// How long answers are kept in Redis: one policy for every writer of a user's keys (the
/// refresher, the warm-up and the API's write-back), so they cannot disagree.
#[derive(Debug, Clone, PartialEq, Eq, clap::Args)]
pub struct CachePolicyArgs {
    /// TTL of a user's keys, renewed by every write (the refresher's, the warm-up's and the
    /// API's write-back alike). Longer than the window, so that only users no refresher looks
    /// after any more (abandoned prefixes, stopped refreshers) vanish by TTL. `TOPK_KEY_TTL`
    /// replaces `TOPK_API_KEY_TTL` and `TOPK_REFRESH_KEY_TTL`, which are no longer read.
    #[arg(
        id = "cache_key_ttl",
        long = "key-ttl",
        env = "TOPK_KEY_TTL",
        default_value = "8d",
        value_parser = duration
    )]
    pub key_ttl: Duration,
    /// How long the tombstone of an emptied answer keeps its version, so that an older answer
    /// still in flight cannot bring the user back. Longer than any computation takes (a cycle, a
    /// warm-up page, a miss: from its `now` to its last write). `TOPK_TOMBSTONE_TTL` replaces
    /// `TOPK_API_TOMBSTONE_TTL` and `TOPK_REFRESH_TOMBSTONE_TTL`, which are no longer read.
    #[arg(
        id = "cache_tombstone_ttl",
        long = "tombstone-ttl",
        env = "TOPK_TOMBSTONE_TTL",
        default_value = "15m",
        value_parser = duration
    )]
    pub tombstone_ttl: Duration,
}

impl Default for CachePolicyArgs {
    fn default() -> Self {
        defaults()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_the_flags_defaults() {
        let policy: CachePolicyArgs = defaults();
        assert_eq!(policy.key_ttl, Duration::from_secs(8 * 24 * 3600));
        assert_eq!(policy.tombstone_ttl, Duration::from_secs(15 * 60));
        assert_eq!(defaults::<KafkaArgs>().topic, "plays");
    }

    #[test]
    fn durations_have_a_floor() {
        assert_eq!(duration("250ms").ok(), Some(Duration::from_millis(250)));
        assert_eq!(
            duration("0s").map_err(|e| e.to_string()).err().as_deref(),
            Some("must be at least 1ms")
        );
        assert!(duration_in_seconds("500ms").is_err());
        assert!(matches!(
            duration("soon"),
            Err(DurationError::Unreadable(_))
        ));
    }
}
