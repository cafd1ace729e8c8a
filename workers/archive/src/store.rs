//! The object store behind the archive: a local directory by default, any S3-compatible
//! endpoint by configuration (`object_store`), and the listing helpers both roles use.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use futures::TryStreamExt as _;
use object_store::aws::AmazonS3Builder;
use object_store::local::LocalFileSystem;
use object_store::prefix::PrefixStore;
use object_store::{ClientOptions, ObjectStore, RetryConfig};

use topk::config::Secret;

use crate::layout::{self, ObjectName};

/// Where the archive lives.
#[derive(Debug, Clone, clap::Args)]
pub struct StoreArgs {
    /// The archive: a local directory (a path or `file:///dir`) or `s3://bucket[/prefix]`.
    #[arg(
        id = "archive_url",
        long = "archive-url",
        env = "TOPK_ARCHIVE_URL",
        default_value = "archive"
    )]
    pub url: String,
    /// S3-compatible endpoint, e.g. `http://127.0.0.1:5000` (AWS itself when unset).
    #[arg(id = "s3_endpoint", long = "s3-endpoint", env = "TOPK_S3_ENDPOINT")]
    pub s3_endpoint: Option<String>,
    /// S3 region.
    #[arg(
        id = "s3_region",
        long = "s3-region",
        env = "TOPK_S3_REGION",
        default_value = "us-east-1"
    )]
    pub s3_region: String,
    /// S3 access key id (otherwise `AWS_ACCESS_KEY_ID` and the usual AWS credential sources).
    #[arg(
        id = "s3_access_key_id",
        long = "s3-access-key-id",
        env = "TOPK_S3_ACCESS_KEY_ID"
    )]
    pub s3_access_key_id: Option<String>,
    /// File holding the S3 secret access key; without it the key is the
    /// `TOPK_S3_SECRET_ACCESS_KEY` environment variable (otherwise the usual AWS credential
    /// sources). Never a flag value: flags are visible in the process list.
    #[arg(
        id = "s3_secret_access_key_file",
        long = "s3-secret-access-key-file",
        env = "TOPK_S3_SECRET_ACCESS_KEY_FILE",
        value_parser = Secret::from_file
    )]
    pub s3_secret_access_key_file: Option<Secret>,
    /// `TOPK_S3_SECRET_ACCESS_KEY`, read when the arguments are parsed.
    #[arg(skip = Secret::from_env("TOPK_S3_SECRET_ACCESS_KEY"))]
    pub s3_secret_access_key_env: Option<Secret>,
}

impl StoreArgs {
    /// A local-directory archive at `dir`.
    pub fn local(dir: &std::path::Path) -> Self {
        StoreArgs {
            url: dir.display().to_string(),
            s3_endpoint: None,
            s3_region: "us-east-1".to_owned(),
            s3_access_key_id: None,
            s3_secret_access_key_file: None,
            s3_secret_access_key_env: None,
        }
    }

    /// The S3 secret access key: from the file, else from the environment, else none (the usual
    /// AWS credential sources).
    pub fn s3_secret_access_key(&self) -> Option<&str> {
        topk::config::file_or_env(
            &self.s3_secret_access_key_file,
            &self.s3_secret_access_key_env,
        )
    }
}

/// Why the store cannot be opened or read.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot create the archive directory {dir}")]
    Directory {
        dir: String,
        #[source]
        source: std::io::Error,
    },
    #[error("object store")]
    ObjectStore(#[from] object_store::Error),
}

/// Opens the configured store. Requests time out and are retried a bounded number of times, so
/// an unreachable store surfaces as an error the caller retries later (never a hang).
pub fn open(args: &StoreArgs) -> Result<Arc<dyn ObjectStore>, StoreError> {
    if let Some(rest) = args.url.strip_prefix("s3://") {
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        let mut builder = AmazonS3Builder::from_env()
            .with_bucket_name(bucket)
            .with_region(&args.s3_region)
            .with_client_options(
                ClientOptions::new()
                    .with_timeout(Duration::from_secs(30))
                    .with_connect_timeout(Duration::from_secs(5)),
            )
            .with_retry(RetryConfig {
                max_retries: 3,
                retry_timeout: Duration::from_secs(30),
                ..RetryConfig::default()
            });
        if let Some(endpoint) = &args.s3_endpoint {
            builder = builder
                .with_endpoint(endpoint)
                .with_allow_http(endpoint.starts_with("http://"));
        }
        if let Some(key) = &args.s3_access_key_id {
            builder = builder.with_access_key_id(key);
        }
        if let Some(secret) = args.s3_secret_access_key() {
            builder = builder.with_secret_access_key(secret);
        }
        let s3: Arc<dyn ObjectStore> = Arc::new(builder.build()?);
        let prefix = prefix.trim_matches('/');
        return Ok(if prefix.is_empty() {
            s3
        } else {
            Arc::new(PrefixStore::new(s3, prefix))
        });
    }
    let dir = args.url.strip_prefix("file://").unwrap_or(&args.url);
    std::fs::create_dir_all(dir).map_err(|source| StoreError::Directory {
        dir: dir.to_owned(),
        source,
    })?;
    // Local puts write a staging file and rename it: an object is either whole or absent.
    Ok(Arc::new(LocalFileSystem::new_with_prefix(dir)?))
}

/// A listed object and its size in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Listed {
    pub name: ObjectName,
    pub size: u64,
}

/// Every archive object of `topic`, per partition, in offset order.
pub async fn list_topic(
    store: &dyn ObjectStore,
    topic: &str,
) -> Result<BTreeMap<i32, Vec<Listed>>, object_store::Error> {
    let metas: Vec<_> = store
        .list(Some(&layout::topic_dir(topic)))
        .try_collect()
        .await?;
    let mut by_partition: BTreeMap<i32, Vec<Listed>> = BTreeMap::new();
    for meta in metas {
        if let Some(name) = ObjectName::parse(&meta.location) {
            by_partition
                .entry(name.partition)
                .or_default()
                .push(Listed {
                    name,
                    size: meta.size,
                });
        }
    }
    for objects in by_partition.values_mut() {
        objects.sort_by_key(|listed| (listed.name.first, listed.name.last));
    }
    Ok(by_partition)
}

/// The objects of `partition` whose first offset is at least `offset`, in offset order.
pub async fn list_from(
    store: &dyn ObjectStore,
    topic: &str,
    partition: i32,
    offset: u64,
) -> Result<Vec<ObjectName>, object_store::Error> {
    let metas: Vec<_> = store
        .list_with_offset(
            Some(&layout::partition_dir(topic, partition)),
            &layout::listing_offset(topic, partition, offset),
        )
        .try_collect()
        .await?;
    let mut names: Vec<ObjectName> = metas
        .iter()
        .filter_map(|meta| ObjectName::parse(&meta.location))
        .filter(|name| name.partition == partition && name.first >= offset)
        .collect();
    names.sort();
    Ok(names)
}
