//! The development broker: librdkafka's in-memory mock cluster, a real Kafka-protocol broker
//! over TCP that needs nothing installed.
//!
//! The mock cluster listens on an ephemeral loopback port. `topk dev-broker` puts it behind a
//! fixed address (default `127.0.0.1:9092`): a TCP proxy forwards connections there, and the
//! broker advertises that address in its metadata so clients never see the ephemeral port.
//! Tests use [`DevBroker`] in-process instead and create their own topics with it.
//!
//! Data lives in memory only: it is gone when the process stops. librdkafka also trims each
//! mock partition to its last 100,000 messages or 5 MB, so a consumer that falls further behind
//! than that loses messages: size partitions accordingly (`--partitions`). The durable
//! alternative is tansu (`scripts/stack` with `TOPK_BROKER=tansu`).

mod mock;

use std::net::SocketAddr;
use std::path::PathBuf;

use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use topk::telemetry::Chain;

pub use mock::{DevBroker, DevBrokerError};

/// `topk dev-broker`: run the mock cluster behind a fixed loopback address.
#[derive(Debug, Clone, clap::Args)]
pub struct DevBrokerArgs {
    /// Address clients connect to (and the broker advertises).
    #[arg(long, env = "TOPK_DEVBROKER_LISTEN", default_value = "127.0.0.1:9092")]
    pub listen: SocketAddr,
    /// Topics created at start (each also gets its `<topic>.dlq`).
    #[arg(
        long = "topic",
        env = "TOPK_KAFKA_TOPIC",
        default_value = "plays",
        value_delimiter = ','
    )]
    pub topics: Vec<String>,
    /// Partitions of every created topic.
    #[arg(long, env = "TOPK_PARTITIONS", default_value_t = 8)]
    pub partitions: i32,
    /// Delay before a new consumer group's first assignment (Kafka's default is 3000 ms).
    #[arg(long, env = "TOPK_DEVBROKER_REBALANCE_DELAY_MS", default_value_t = 100)]
    pub rebalance_delay_ms: i32,
    /// File the bootstrap address is written to once the broker accepts connections.
    #[arg(long, env = "TOPK_DEVBROKER_ADDR_FILE")]
    pub addr_file: Option<PathBuf>,
}

/// Runs the broker until `shutdown` fires.
pub async fn run(args: DevBrokerArgs, shutdown: CancellationToken) -> Result<(), DevBrokerError> {
    let broker = DevBroker::start(args.rebalance_delay_ms)?;
    for topic in &args.topics {
        broker.create_plays_topics(topic, args.partitions)?;
    }
    let upstream = broker.bootstrap_servers();
    let listener =
        TcpListener::bind(args.listen)
            .await
            .map_err(|source| DevBrokerError::Listen {
                addr: args.listen,
                source,
            })?;
    broker.advertise(&args.listen.ip().to_string(), args.listen.port());
    if let Some(path) = &args.addr_file {
        std::fs::write(path, format!("{}\n", args.listen)).map_err(|source| {
            DevBrokerError::AddrFile {
                path: path.clone(),
                source,
            }
        })?;
    }
    tracing::info!(listen = %args.listen, %upstream, topics = ?args.topics, partitions = args.partitions, "dev broker ready");

    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok((client, _)) => {
                    let upstream = upstream.clone();
                    tokio::spawn(async move {
                        if let Err(error) = forward(client, &upstream).await {
                            tracing::debug!(error = %Chain(&error), "proxied connection ended");
                        }
                    });
                }
                Err(error) => tracing::warn!(error = %Chain(&error), "accept failed"),
            },
        }
    }
    tracing::info!("dev broker stopped");
    Ok(())
}

async fn forward(mut client: TcpStream, upstream: &str) -> std::io::Result<()> {
    client.set_nodelay(true)?;
    let mut broker = TcpStream::connect(upstream).await?;
    broker.set_nodelay(true)?;
    tokio::io::copy_bidirectional(&mut client, &mut broker).await?;
    Ok(())
}
