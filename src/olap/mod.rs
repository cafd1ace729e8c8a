//! The ClickHouse clients: the source of truth for play counts, on one server or on a cluster
//! of shards (ARCHITECTURE.md, "ClickHouse as a sharded cluster").
//!
//! Validation of rows against the server schema is off because the client's validation
//! queries (`describe_include_subcolumns`, `RowBinaryWithNamesAndTypes`) do not exist on
//! ClickHouse 18.16, one of the two servers topk must run on.

pub mod tables;

use std::sync::Arc;

use clickhouse::{Client, Row};
use serde::Deserialize;

use crate::config::ClickHouseArgs;

/// A client for the configured database on the server of `--clickhouse-url`.
pub fn client(args: &ClickHouseArgs) -> Client {
    server_client(args).with_database(&args.database)
}

/// A client without a default database (for `CREATE DATABASE`).
pub fn server_client(args: &ClickHouseArgs) -> Client {
    server_client_at(args, &args.url)
}

/// A client without a default database for the server at `url` (a shard of the cluster).
pub fn server_client_at(args: &ClickHouseArgs, url: &str) -> Client {
    let client = Client::default()
        .with_url(url)
        .with_user(&args.user)
        .with_password(args.password())
        .with_validation(false);
    match &args.quota_key {
        // A header: the user and password travel as headers, and 18.16 refuses a request
        // that mixes them with the `quota_key` parameter.
        Some(key) => client.with_header("X-ClickHouse-Quota", key),
        None => client,
    }
}

/// Whether the server answers a trivial query.
pub async fn ping(client: &Client) -> Result<(), clickhouse::error::Error> {
    client.query("SELECT 1").fetch_one::<u8>().await.map(|_| ())
}

/// Where topk's tables are. The *protocol tables* (`flush_log`, `day_touches`, `rollup_log`,
/// `schema_migrations`) and the clock their protocols compare are those of one server, `meta`
/// (`--clickhouse-url`). The *count tables* (`plays_minute`, `plays_daily`) hold each user's
/// rows on exactly one shard, `user_id % shards`: every write of counts is split by shard and
/// every read of a user's counts goes to that user's shard alone. On a single server (the
/// default) `meta` is the one shard.
#[derive(Clone)]
pub struct Olap {
    meta: Client,
    shards: Arc<[Client]>,
    cluster: Option<String>,
    /// Whether the meta server is none of the shards (`--clickhouse-url` not among the shard
    /// URLs).
    meta_apart: bool,
}

impl std::fmt::Debug for Olap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Olap")
            .field("shards", &self.shards.len())
            .field("cluster", &self.cluster)
            .finish()
    }
}

/// A single server: the protocol tables and every user's counts on it.
impl From<Client> for Olap {
    fn from(client: Client) -> Self {
        Olap {
            meta: client.clone(),
            shards: Arc::from(vec![client]),
            cluster: None,
            meta_apart: false,
        }
    }
}

impl From<&Client> for Olap {
    fn from(client: &Client) -> Self {
        Olap::from(client.clone())
    }
}

impl From<&Olap> for Olap {
    fn from(olap: &Olap) -> Self {
        olap.clone()
    }
}

/// The cluster's shards disagree with `--clickhouse-shard-urls`.
#[derive(Debug, thiserror::Error)]
pub enum LayoutError {
    #[error("--clickhouse-cluster {0} needs --clickhouse-shard-urls (one URL per shard)")]
    NoShards(String),
    #[error(
        "cluster {cluster} has {found} shards (system.clusters on --clickhouse-url), \
         --clickhouse-shard-urls names {given}"
    )]
    ShardCount {
        cluster: String,
        found: usize,
        given: usize,
    },
    #[error(
        "cluster {cluster}: shard weights must all be 1 (users are placed on user_id % shards)"
    )]
    Weights { cluster: String },
    #[error(
        "shard URL {url} is shard {found:?} of the cluster, not shard {expected} \
         (--clickhouse-shard-urls must list the shards in the cluster's order)"
    )]
    WrongShard {
        url: String,
        expected: u32,
        found: Option<u32>,
    },
    #[error("ClickHouse error while checking the cluster layout")]
    ClickHouse(#[from] clickhouse::error::Error),
}

/// One shard of the cluster as the servers' `remote_servers` configure it.
#[derive(Debug, Clone, Row, Deserialize)]
pub struct ClusterShard {
    pub shard_num: u32,
    pub shard_weight: u32,
    pub host_address: String,
    pub port: u16,
}

impl Olap {
    /// The clients `args` names, without asking any server. [`Olap::connect`] also checks a
    /// cluster's layout.
    pub fn open(args: &ClickHouseArgs) -> Self {
        let meta = client(args);
        match &args.cluster {
            None => Olap::from(meta),
            Some(cluster) => Olap {
                meta,
                shards: args
                    .shard_urls
                    .iter()
                    .map(|url| server_client_at(args, url).with_database(&args.database))
                    .collect(),
                cluster: Some(cluster.clone()),
                meta_apart: !args.shard_urls.contains(&args.url),
            },
        }
    }

    /// [`Olap::open`], and on a cluster the check that the shard URLs are the cluster's shards
    /// in its order: a role that placed users by another order would read and write them on
    /// the wrong shards.
    /// A server that does not answer is not a wrong layout: the role starts (it waits for
    /// ClickHouse as it would on a single server) and the warning says what was not checked.
    pub async fn connect(args: &ClickHouseArgs) -> Result<Self, LayoutError> {
        let olap = Olap::open(args);
        match olap.check_layout(args).await {
            Ok(()) => Ok(olap),
            Err(LayoutError::ClickHouse(error)) => {
                tracing::warn!(
                    error = %crate::telemetry::Chain(&error),
                    "the cluster layout could not be checked: ClickHouse does not answer"
                );
                Ok(olap)
            }
            Err(wrong) => Err(wrong),
        }
    }

    /// On a cluster: the meta server knows as many shards as there are URLs, each of weight 1,
    /// and the server at the i-th URL is the cluster's shard i (its own `system.clusters`
    /// marks shard i as local). Nothing to check on a single server.
    pub async fn check_layout(&self, args: &ClickHouseArgs) -> Result<(), LayoutError> {
        let Some(cluster) = &self.cluster else {
            return Ok(());
        };
        let shards = cluster_shards(&self.meta, cluster).await?;
        self.check_shards(cluster, &shards)?;
        for (index, client) in self.shards.iter().enumerate() {
            let expected = index as u32 + 1;
            let local: Vec<u32> = client
                .query(
                    "SELECT DISTINCT shard_num FROM system.clusters \
                     WHERE cluster = ? AND is_local = 1",
                )
                .bind(cluster.as_str())
                .fetch_all()
                .await?;
            if local != [expected] {
                return Err(LayoutError::WrongShard {
                    url: args.shard_urls[index].clone(),
                    expected,
                    found: local.first().copied(),
                });
            }
        }
        Ok(())
    }

    /// The number of shards and their weights agree with the URLs.
    pub fn check_shards(&self, cluster: &str, shards: &[ClusterShard]) -> Result<(), LayoutError> {
        if self.shards.is_empty() {
            return Err(LayoutError::NoShards(cluster.to_owned()));
        }
        let mut numbers: Vec<u32> = shards.iter().map(|s| s.shard_num).collect();
        numbers.dedup();
        if numbers.len() != self.shards.len() {
            return Err(LayoutError::ShardCount {
                cluster: cluster.to_owned(),
                found: numbers.len(),
                given: self.shards.len(),
            });
        }
        if shards.iter().any(|s| s.shard_weight != 1) {
            return Err(LayoutError::Weights {
                cluster: cluster.to_owned(),
            });
        }
        Ok(())
    }

    /// The same clients, each with the ClickHouse setting `name` = `value` on every request.
    pub fn with_setting(self, name: &str, value: impl Into<String>) -> Self {
        let value = value.into();
        Olap {
            meta: self.meta.with_setting(name, value.clone()),
            shards: self
                .shards
                .iter()
                .map(|shard| shard.clone().with_setting(name, value.clone()))
                .collect(),
            cluster: self.cluster,
            meta_apart: self.meta_apart,
        }
    }

    /// Whether every shard and the meta server answer a trivial query (one query per server).
    pub async fn ping(&self) -> Result<(), clickhouse::error::Error> {
        let apart = self.meta_apart.then_some(&self.meta);
        let servers = self.shards.iter().chain(apart).map(ping);
        futures::future::try_join_all(servers).await.map(|_| ())
    }

    /// The server of the protocol tables and of the clock they compare.
    pub fn meta(&self) -> &Client {
        &self.meta
    }

    /// Every shard, in the cluster's order (one on a single server).
    pub fn shards(&self) -> &[Client] {
        &self.shards
    }

    /// The shard holding every row of `user_id`: `user_id % shards`, the index the
    /// Distributed tables' sharding key `user_id` gives with weights of 1.
    pub fn shard_index(&self, user_id: u64) -> usize {
        (user_id % self.shards.len() as u64) as usize
    }

    /// `items` split by the shard of their user, one list per shard (in shard order).
    pub fn by_shard<T>(
        &self,
        items: impl IntoIterator<Item = T>,
        user_of: impl Fn(&T) -> u64,
    ) -> Vec<Vec<T>> {
        let mut split: Vec<Vec<T>> = (0..self.shards.len()).map(|_| Vec::new()).collect();
        for item in items {
            split[self.shard_index(user_of(&item))].push(item);
        }
        split
    }
}

/// The shards of `cluster` as the server of `client` knows them, ordered by shard number.
pub async fn cluster_shards(
    client: &Client,
    cluster: &str,
) -> Result<Vec<ClusterShard>, clickhouse::error::Error> {
    client
        .query(
            "SELECT shard_num, shard_weight, host_address, port FROM system.clusters \
             WHERE cluster = ? ORDER BY shard_num, replica_num",
        )
        .bind(cluster)
        .fetch_all()
        .await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cluster_of(shards: usize) -> Olap {
        let client = Client::default();
        Olap {
            meta: client.clone(),
            shards: (0..shards).map(|_| client.clone()).collect(),
            cluster: Some("topk".to_owned()),
            meta_apart: false,
        }
    }

    #[test]
    fn users_are_split_by_user_id_modulo_shards() {
        let olap = cluster_of(3);
        let split = olap.by_shard([0u64, 1, 2, 3, 4, 5, 301], |&u| u);
        assert_eq!(split, vec![vec![0, 3], vec![1, 4, 301], vec![2, 5]]);
        assert_eq!(
            Olap::from(Client::default()).by_shard([7u64, 8], |&u| u),
            vec![vec![7, 8]]
        );
    }

    #[test]
    fn the_layout_must_match_the_urls() {
        let shard = |shard_num, shard_weight| ClusterShard {
            shard_num,
            shard_weight,
            host_address: "127.0.0.1".to_owned(),
            port: 9000,
        };
        let olap = cluster_of(2);
        assert!(
            olap.check_shards("topk", &[shard(1, 1), shard(2, 1)])
                .is_ok()
        );
        // Two replicas of shard 1 and one of shard 2 are still two shards.
        assert!(
            olap.check_shards("topk", &[shard(1, 1), shard(1, 1), shard(2, 1)])
                .is_ok()
        );
        assert!(matches!(
            olap.check_shards("topk", &[shard(1, 1)]),
            Err(LayoutError::ShardCount {
                found: 1,
                given: 2,
                ..
            })
        ));
        assert!(matches!(
            olap.check_shards("topk", &[shard(1, 1), shard(2, 2)]),
            Err(LayoutError::Weights { .. })
        ));
        assert!(matches!(
            cluster_of(0).check_shards("topk", &[]),
            Err(LayoutError::NoShards(_))
        ));
    }
}
