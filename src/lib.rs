//! Shared library of topk: everything the roles (workers, API, jobs, tools) have in common.
//!
//! # Layout
//!
//! - [`config`]: the clap argument groups for Kafka, ClickHouse, Redis and telemetry that every
//!   role flattens into its own config, with `TOPK_…` environment variables.
//! - [`event`]: the play-event contract (JSON on Kafka) and its validation.
//! - [`counting`]: the counting core (batches, dedup, a partition's state, the rules), pure
//!   logic shared by the aggregator and the backfill.
//! - [`kafka`]: producer, consumer and admin clients configured the way topk needs them.
//! - [`group`]: the consumer-group member kit the aggregator and the archiver run on.
//! - [`olap`]: the ClickHouse client (the source of truth for play counts).
//! - [`migrate`]: numbered, idempotent SQL migrations from `schema/`.
//! - [`cache`]: the Redis (or Redis Cluster) connection pools, key layout and reading an answer.
//! - [`clock`]: the injectable clock ("now" for windows, rollups and retention).
//! - [`window`]: the rolling 7-day window, ranking and the answer's JSON.
//! - [`query`]: the exact top-K query over ClickHouse (single user and batch).
//! - [`touches`]: the users a write of counts changed, published to `<topic>.touches` for the
//!   refreshers.
//! - [`telemetry`]: tracing and the Prometheus metrics exporter.
//! - [`shutdown`]: one cancellation token fired by SIGINT/SIGTERM.
//!
//! The roles themselves live in their own crates: `workers/*` (long-running background
//! roles), `tools/*` (developer tooling) and `cli/` (the `topk` binary).

pub mod cache;
pub mod clock;
pub mod config;
pub mod counting;
pub mod event;
pub mod group;
pub mod kafka;
pub mod migrate;
pub mod olap;
pub mod query;
pub mod shutdown;
pub mod telemetry;
pub mod touches;
pub mod window;
