//! `topk`: one binary, one subcommand per role. Each subcommand parses its config, starts
//! telemetry and calls the library `run` of its role; all logic lives in the library crates.

use anyhow::Context;
use clap::{Parser, Subcommand};

use topk::config::{ClickHouseArgs, KafkaArgs, RedisArgs};

#[derive(Debug, Parser)]
#[command(
    name = "topk",
    version,
    about = "Every listener's Top 10 songs of the past 7 days, exact and fresh."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Count plays from Kafka into ClickHouse, exactly once (a consumer-group worker).
    Aggregate(Box<topk_aggregator::AggregatorArgs>),
    /// Archive every raw message of the play topic to object storage (a consumer-group worker).
    Archive(Box<topk_archive::ArchiveArgs>),
    /// Rebuild whole UTC days of per-minute counts in ClickHouse from the archive (replaces them).
    Backfill(Box<topk_archive::BackfillArgs>),
    /// Apply the ClickHouse schema migrations (idempotent).
    Migrate {
        #[command(flatten)]
        clickhouse: ClickHouseArgs,
    },
    /// Create the play topic, its dead-letter topic and its touches topic (brokers that support
    /// CreateTopics).
    CreateTopics {
        #[command(flatten)]
        kafka: KafkaArgs,
        /// Partitions of each topic.
        #[arg(long, env = "TOPK_PARTITIONS", default_value_t = 8)]
        partitions: i32,
    },
    /// Run the in-memory development Kafka broker (librdkafka's mock cluster).
    DevBroker(topk_devbroker::DevBrokerArgs),
    /// Produce listening traffic (Zipf songs and users, late, duplicate and malformed events).
    Loadgen(topk_loadgen::LoadgenArgs),
    /// Print a user's top songs as the API's JSON (from Redis; from ClickHouse on a miss).
    Top {
        /// The user.
        user_id: u64,
        /// How many songs (1 to 50).
        #[arg(long, default_value_t = topk::window::DEFAULT_LIMIT, value_parser = parse_limit)]
        limit: usize,
        /// Compute it from ClickHouse now, bypassing Redis.
        #[arg(long)]
        fresh: bool,
        #[command(flatten)]
        clickhouse: ClickHouseArgs,
        #[command(flatten)]
        redis: RedisArgs,
    },
    /// Roll up the window's days whose daily totals are missing or out of date (once).
    Rollup {
        /// Roll up every full day of the window, even clean ones.
        #[arg(long)]
        all: bool,
        #[command(flatten)]
        clickhouse: ClickHouseArgs,
    },
    /// Drop the day partitions that can no longer touch the window (once).
    Prune {
        #[command(flatten)]
        clickhouse: ClickHouseArgs,
    },
    /// Run rollups and retention periodically (a maintenance worker).
    Maintain(topk_maintenance::MaintenanceArgs),
    /// Keep Redis equal to ClickHouse: recompute every changed user's top songs each interval.
    Refresh(Box<topk_refresher::RefresherArgs>),
    /// Fill Redis for every user with plays in the window (after a cold start); safe to re-run.
    Warmup(Box<topk_refresher::WarmupArgs>),
    /// Serve the REST API and the widget (Redis first, ClickHouse on a miss).
    Serve(Box<topk_api::ApiArgs>),
    /// Print a bearer token for the API, signed with its keys (`--auth-…`, `TOPK_JWT_SECRET`).
    Token(Box<topk_api::auth::TokenArgs>),
}

/// A `--limit` outside 1 to 50.
#[derive(Debug)]
struct LimitError;

impl std::fmt::Display for LimitError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "must be an integer from 1 to {}",
            topk::window::MAX_LIMIT
        )
    }
}

impl std::error::Error for LimitError {}

fn parse_limit(text: &str) -> Result<usize, LimitError> {
    match text.parse::<usize>() {
        Ok(n) if (1..=topk::window::MAX_LIMIT).contains(&n) => Ok(n),
        _ => Err(LimitError),
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Aggregate(args) => {
            topk::telemetry::init(&args.telemetry).context("starting telemetry")?;
            let shutdown = topk::shutdown::on_signals();
            topk_aggregator::run(*args, shutdown)
                .await
                .context("aggregator failed")?;
        }
        Command::Archive(args) => {
            topk::telemetry::init(&args.telemetry).context("starting telemetry")?;
            let shutdown = topk::shutdown::on_signals();
            topk_archive::run(*args, shutdown)
                .await
                .context("archiver failed")?;
        }
        Command::Backfill(args) => {
            topk::telemetry::init_logging();
            let report = topk_archive::backfill::run(&args)
                .await
                .with_context(|| format!("backfilling from {}", args.store.url))?;
            print_line(&serde_json::to_string(&report)?)?;
        }
        Command::Migrate { clickhouse } => {
            topk::telemetry::init_logging();
            let report = topk::migrate::run(&clickhouse).await.with_context(|| {
                format!("migrating {} at {}", clickhouse.database, clickhouse.url)
            })?;
            print_line(&serde_json::json!({
                "database": clickhouse.database,
                "applied": report.applied,
                "already_applied": report.already_applied,
            }))?;
        }
        Command::CreateTopics { kafka, partitions } => {
            topk::telemetry::init_logging();
            let topics = kafka.all_topics();
            let names: Vec<&str> = topics.iter().map(String::as_str).collect();
            topk::kafka::ensure_topics(&kafka.brokers, &names, partitions)
                .await
                .with_context(|| format!("creating topics on {}", kafka.brokers))?;
            print_line(&format!(
                "topics {} ready with {partitions} partitions",
                names.join(", ")
            ))?;
        }
        Command::DevBroker(args) => {
            topk::telemetry::init_logging();
            let shutdown = topk::shutdown::on_signals();
            topk_devbroker::run(args, shutdown)
                .await
                .context("dev broker failed")?;
        }
        Command::Loadgen(args) => {
            topk::telemetry::init_logging();
            let shutdown = topk::shutdown::on_signals();
            let sent = topk_loadgen::run(args, shutdown)
                .await
                .context("load generator failed")?;
            print_line(
                &serde_json::json!({"plays": sent.plays, "duplicates": sent.duplicates, "malformed": sent.malformed}),
            )?;
        }
        Command::Top {
            user_id,
            limit,
            fresh,
            clickhouse,
            redis,
        } => {
            topk::telemetry::init_logging();
            let clock = topk::clock::SystemClock;
            let cached = if fresh {
                None
            } else {
                let cache = topk::cache::Redis::connect(&redis).context("Redis pool")?;
                match cache.read_top(&redis.prefix, user_id, limit).await {
                    Ok(answer) => answer,
                    Err(error) => {
                        tracing::warn!(
                            error = %topk::telemetry::Chain(&error),
                            "Redis unavailable; computing from ClickHouse"
                        );
                        None
                    }
                }
            };
            let answer = match cached {
                Some(answer) => answer,
                None => {
                    use topk::clock::Clock as _;
                    let now = clock.now_ms();
                    let window = topk::window::Window::at(now);
                    let olap = topk::olap::Olap::connect(&clickhouse).await?;
                    let query = topk::query::TopQuery::new(olap);
                    let songs = query
                        .top_for_user(user_id, window, limit)
                        .await
                        .context("querying ClickHouse")?;
                    topk::window::TopSongs::new(
                        user_id,
                        window,
                        now,
                        topk::window::Source::Olap,
                        songs,
                    )
                }
            };
            print_line(&serde_json::to_string(&answer)?)?;
        }
        Command::Rollup { all, clickhouse } => {
            topk::telemetry::init_logging();
            let olap = topk::olap::Olap::connect(&clickhouse).await?;
            let report = topk_maintenance::rollup(olap, &topk::clock::SystemClock, all).await?;
            print_line(&serde_json::to_string(&report)?)?;
        }
        Command::Prune { clickhouse } => {
            topk::telemetry::init_logging();
            let olap = topk::olap::Olap::connect(&clickhouse).await?;
            let report = topk_maintenance::prune(olap, &topk::clock::SystemClock).await?;
            print_line(&serde_json::to_string(&report)?)?;
        }
        Command::Maintain(args) => {
            topk::telemetry::init(&args.telemetry).context("starting telemetry")?;
            let shutdown = topk::shutdown::on_signals();
            topk_maintenance::run(args, topk::clock::system(), shutdown).await;
        }
        Command::Refresh(args) => {
            topk::telemetry::init(&args.telemetry).context("starting telemetry")?;
            let shutdown = topk::shutdown::on_signals();
            topk_refresher::run(*args, topk::clock::system(), shutdown)
                .await
                .context("refresher failed")?;
        }
        Command::Serve(args) => {
            topk::telemetry::init_logging();
            let shutdown = topk::shutdown::on_signals();
            topk_api::run(*args, topk::clock::system(), shutdown)
                .await
                .context("API failed")?;
        }
        Command::Token(args) => {
            let token = topk_api::auth::mint(&args).context("minting a token")?;
            print_line(&token)?;
        }
        Command::Warmup(args) => {
            topk::telemetry::init_logging();
            let shutdown = topk::shutdown::on_signals();
            let report = topk_refresher::run_warmup(*args, topk::clock::system(), shutdown)
                .await
                .context("warm-up failed")?;
            print_line(&serde_json::to_string(&report)?)?;
            if !report.complete || report.failed > 0 {
                anyhow::bail!(
                    "warm-up incomplete ({} users failed, interrupted: {}); re-run it",
                    report.failed,
                    !report.complete
                );
            }
        }
    }
    Ok(())
}

/// Prints one line of a command's result on stdout. A closed stdout (`topk top 42 | head -c 1`)
/// is an error with its reason, not `println!`'s panic.
fn print_line(line: &dyn std::fmt::Display) -> anyhow::Result<()> {
    use std::io::Write as _;
    let mut out = std::io::stdout().lock();
    writeln!(out, "{line}")
        .and_then(|()| out.flush())
        .context("writing the result to stdout")
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn every_subcommand_definition_is_valid() {
        Cli::command().debug_assert();
    }
}
