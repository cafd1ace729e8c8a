//! `topk`: one binary, one subcommand per role. Each subcommand parses its config, starts
//! telemetry and calls the library `run` of its role; all logic lives in the library crates.

use anyhow::Context;
use clap::{Parser, Subcommand};

use topk::config::{ClickHouseArgs, KafkaArgs};

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
    /// Apply the ClickHouse schema migrations (idempotent).
    Migrate {
        #[command(flatten)]
        clickhouse: ClickHouseArgs,
    },
    /// Create the play topic and its dead-letter topic (brokers that support CreateTopics).
    CreateTopics {
        #[command(flatten)]
        kafka: KafkaArgs,
        /// Partitions of each topic.
        #[arg(long, env = "TOPK_PARTITIONS", default_value_t = 8)]
        partitions: i32,
    },
    /// Run the in-memory development Kafka broker (librdkafka's mock cluster).
    DevBroker(topk_devbroker::DevBrokerArgs),
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
        Command::Migrate { clickhouse } => {
            topk::telemetry::init_logging();
            let report = topk::migrate::run(&clickhouse).await.with_context(|| {
                format!("migrating {} at {}", clickhouse.database, clickhouse.url)
            })?;
            println!(
                "{}",
                serde_json::json!({
                    "database": clickhouse.database,
                    "applied": report.applied,
                    "already_applied": report.already_applied,
                })
            );
        }
        Command::CreateTopics { kafka, partitions } => {
            topk::telemetry::init_logging();
            let dlq = kafka.dlq_topic();
            topk::kafka::ensure_topics(&kafka.brokers, &[&kafka.topic, &dlq], partitions)
                .await
                .with_context(|| format!("creating topics on {}", kafka.brokers))?;
            println!(
                "topics {} and {dlq} ready with {partitions} partitions",
                kafka.topic
            );
        }
        Command::DevBroker(args) => {
            topk::telemetry::init_logging();
            let shutdown = topk::shutdown::on_signals();
            topk_devbroker::run(args, shutdown)
                .await
                .context("dev broker failed")?;
        }
    }
    Ok(())
}
