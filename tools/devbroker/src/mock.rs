//! A safe wrapper over the few librdkafka mock-cluster calls that `rdkafka::mocking` does not
//! expose (advertised address, initial rebalance delay). All `unsafe` of the project is here.
#![allow(unsafe_code)]

use std::ffi::{CStr, CString};
use std::net::SocketAddr;
use std::path::PathBuf;

use rdkafka::ClientConfig;
use rdkafka::error::KafkaError;
use rdkafka::producer::{BaseProducer, Producer};
use rdkafka_sys as rdsys;

/// Errors of the development broker.
#[derive(Debug, thiserror::Error)]
pub enum DevBrokerError {
    #[error("cannot create the mock cluster")]
    Create(#[source] KafkaError),
    #[error("the client did not create a mock cluster")]
    NoCluster,
    #[error("cannot create topic {topic}: {code:?}")]
    CreateTopic {
        topic: String,
        code: rdsys::RDKafkaErrorCode,
    },
    #[error("topic name {0:?} contains a NUL byte")]
    TopicName(String),
    #[error("cannot listen on {addr}")]
    Listen {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot write the address file {path}")]
    AddrFile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// An in-memory single-broker Kafka cluster, alive as long as this value.
pub struct DevBroker {
    cluster: *mut rdsys::rd_kafka_mock_cluster_t,
    // Owns the cluster: librdkafka destroys the mock cluster together with this client, so it
    // is declared after `cluster` and outlives every use of the pointer.
    _owner: BaseProducer,
}

// SAFETY: librdkafka's mock-cluster functions are thread-safe (each one is either an operation
// queued to the cluster's own thread or guarded by the cluster's lock), and the pointer stays
// valid for as long as `_owner` lives, which is as long as `self`.
unsafe impl Send for DevBroker {}
unsafe impl Sync for DevBroker {}

impl std::fmt::Debug for DevBroker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DevBroker")
            .field("bootstrap", &self.bootstrap_servers())
            .finish()
    }
}

impl DevBroker {
    /// Starts a one-broker cluster on an ephemeral loopback port.
    pub fn start(rebalance_delay_ms: i32) -> Result<Self, DevBrokerError> {
        let owner: BaseProducer = ClientConfig::new()
            .set("test.mock.num.brokers", "1")
            .set("log_level", "3")
            .create()
            .map_err(DevBrokerError::Create)?;
        // SAFETY: `native_ptr` is a live client handle for the duration of the call.
        let cluster = unsafe { rdsys::rd_kafka_handle_mock_cluster(owner.client().native_ptr()) };
        if cluster.is_null() {
            return Err(DevBrokerError::NoCluster);
        }
        // SAFETY: `cluster` was just checked non-null and is owned by `owner`.
        unsafe {
            rdsys::rd_kafka_mock_group_initial_rebalance_delay_ms(cluster, rebalance_delay_ms)
        };
        Ok(DevBroker {
            cluster,
            _owner: owner,
        })
    }

    /// The `bootstrap.servers` value that reaches the broker.
    pub fn bootstrap_servers(&self) -> String {
        // SAFETY: the cluster is alive; the returned string is owned by the cluster and copied
        // before this function returns.
        unsafe {
            CStr::from_ptr(rdsys::rd_kafka_mock_cluster_bootstraps(self.cluster))
                .to_string_lossy()
                .into_owned()
        }
    }

    /// Creates the plays topic `topic` with its dead-letter and touches topics
    /// ([`topk::config::all_topics`]), `partitions` partitions each.
    pub fn create_plays_topics(&self, topic: &str, partitions: i32) -> Result<(), DevBrokerError> {
        topk::config::all_topics(topic)
            .iter()
            .try_for_each(|name| self.create_topic(name, partitions))
    }

    /// Creates `topic` with `partitions` partitions (a no-op error-free call if it exists).
    pub fn create_topic(&self, topic: &str, partitions: i32) -> Result<(), DevBrokerError> {
        let name = CString::new(topic).map_err(|_| DevBrokerError::TopicName(topic.to_owned()))?;
        // SAFETY: the cluster is alive and `name` is a valid C string for the call.
        let code = unsafe {
            rdsys::rd_kafka_mock_topic_create(self.cluster, name.as_ptr(), partitions, 1)
        };
        match rdsys::RDKafkaErrorCode::from(code) {
            rdsys::RDKafkaErrorCode::NoError | rdsys::RDKafkaErrorCode::TopicAlreadyExists => {
                Ok(())
            }
            code => Err(DevBrokerError::CreateTopic {
                topic: topic.to_owned(),
                code,
            }),
        }
    }

    /// Makes the broker advertise `host:port` in metadata instead of its real listener.
    pub fn advertise(&self, host: &str, port: u16) {
        let host = CString::new(host).unwrap_or_default();
        // SAFETY: the cluster is alive; librdkafka copies `host` into its own buffer.
        unsafe {
            rdsys::rd_kafka_mock_broker_set_host_port(
                self.cluster,
                1,
                host.as_ptr(),
                i32::from(port),
            )
        };
    }
}
