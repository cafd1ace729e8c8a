//! `scripts/stack` itself: a private stack (its own folder and ports) comes up, a second `up`
//! changes nothing, the dev broker serves Kafka on its fixed port, the Redis Cluster holds every
//! slot, the S3-compatible server answers, and `down` leaves no process.

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use rdkafka::consumer::Consumer;
use rdkafka::message::Message;
use rdkafka::producer::FutureRecord;

fn stack(dir: &Path, base_port: u16, verb: &str) -> std::process::Output {
    let output = stack_output(dir, base_port, verb);
    assert!(
        output.status.success() || verb == "status",
        "stack {verb} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    output
}

/// `scripts/stack VERB` on the private stack in `dir`, whose services listen on the 20 ports
/// from `base_port` on.
fn stack_output(dir: &Path, base_port: u16, verb: &str) -> std::process::Output {
    Command::new(common::workspace_root().join("scripts/stack"))
        .arg(verb)
        .env("TOPK_STACK_DIR", dir)
        .env("TOPK_BROKER", "dev")
        .env("TOPK_PARTITIONS", "2")
        .env("TOPK_STACK_REDIS_PORT", base_port.to_string())
        .env("TOPK_STACK_CH_HTTP_PORT", (base_port + 1).to_string())
        .env("TOPK_STACK_CH_TCP_PORT", (base_port + 2).to_string())
        .env("TOPK_STACK_KAFKA_PORT", (base_port + 3).to_string())
        .env(
            "TOPK_STACK_REDIS_CLUSTER_PORTS",
            format!("{} {} {}", base_port + 4, base_port + 5, base_port + 6),
        )
        .env("TOPK_STACK_S3_PORT", (base_port + 7).to_string())
        .env(
            "TOPK_STACK_CH_CLUSTER_HTTP_PORTS",
            format!("{} {}", base_port + 8, base_port + 9),
        )
        .env(
            "TOPK_STACK_CH_CLUSTER_TCP_PORTS",
            format!("{} {}", base_port + 10, base_port + 11),
        )
        .env(
            "TOPK_STACK_CH_REPLICA_HTTP_PORTS",
            format!("{} {}", base_port + 12, base_port + 13),
        )
        .env(
            "TOPK_STACK_CH_REPLICA_TCP_PORTS",
            format!("{} {}", base_port + 14, base_port + 15),
        )
        .env(
            "TOPK_STACK_CH_REPLICA_INTERSERVER_PORTS",
            format!("{} {}", base_port + 16, base_port + 17),
        )
        .env("TOPK_STACK_ZOOKEEPER_PORT", (base_port + 18).to_string())
        .output()
        .expect("scripts/stack runs")
}

fn pids(dir: &Path) -> BTreeMap<String, i32> {
    std::fs::read_dir(dir)
        .expect("stack dir")
        .filter_map(Result::ok)
        .filter_map(|entry| {
            let name = entry.file_name().into_string().ok()?;
            let service = name.strip_suffix(".pid")?.to_owned();
            let pid = std::fs::read_to_string(entry.path())
                .ok()?
                .trim()
                .parse()
                .ok()?;
            Some((service, pid))
        })
        .collect()
}

fn alive(pid: i32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
        && !std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| s.contains(") Z "))
}

/// Brings the private stack down when the test fails half-way, so that its servers do not
/// outlive it on ports a later run may be given.
struct DownOnPanic<'a>(&'a Path, u16);

impl Drop for DownOnPanic<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            // Not `stack`: an assertion failing inside a panic would abort the process.
            let _ = stack_output(self.0, self.1, "down");
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn up_twice_then_down_leaves_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    // Ports of its own, away from the shared stack's. A Redis Cluster node also listens on its
    // port + 10,000 (the cluster bus), which must stay below the kernel's ephemeral range
    // (32,768 on): there any client connection of the tests beside this one could hold it, and
    // the node exits at start (seen once in CI: bus port 33,234). So base + 6 + 10,000 < 32,768.
    let base: u16 = 21_000 + (std::process::id() % 85) as u16 * 20;

    let _down = DownOnPanic(dir.path(), base);
    stack(dir.path(), base, "up");
    let first = pids(dir.path());
    assert_eq!(
        first.keys().collect::<Vec<_>>(),
        [
            "clickhouse",
            "clickhouse-cluster",
            "clickhouse-replica-1",
            "clickhouse-replica-2",
            "clickhouse-replicas",
            "clickhouse-shard-1",
            "clickhouse-shard-2",
            "devbroker",
            "redis",
            "redis-cluster",
            &format!("redis-cluster-{}", base + 4),
            &format!("redis-cluster-{}", base + 5),
            &format!("redis-cluster-{}", base + 6),
            "s3",
            "zookeeper",
        ]
    );
    for (service, &pid) in &first {
        assert!(
            alive(pid),
            "{service} (pid {pid}) is not running after up: {first:?}"
        );
    }
    assert!(stack(dir.path(), base, "status").status.success());

    stack(dir.path(), base, "up");
    assert_eq!(pids(dir.path()), first, "a second up starts nothing new");

    // The dev broker answers on its fixed port, with the topics the stack created.
    let brokers = format!("127.0.0.1:{}", base + 3);
    let producer = topk::kafka::producer(&brokers).expect("producer");
    producer
        .send(
            FutureRecord::to("plays").key("7").payload("hello"),
            Duration::from_secs(30),
        )
        .await
        .expect("delivered through the fixed port");
    let consumer = topk::kafka::consumer(&brokers, "stack-test").expect("consumer");
    consumer.subscribe(&["plays"]).expect("subscribe");
    let message = tokio::time::timeout(Duration::from_secs(30), consumer.recv())
        .await
        .expect("message within 30 s")
        .expect("no error");
    assert_eq!(message.payload(), Some(&b"hello"[..]));
    let metadata = consumer
        .fetch_metadata(Some("plays.dlq"), Duration::from_secs(10))
        .expect("metadata");
    assert_eq!(metadata.topics()[0].partitions().len(), 2);
    assert_eq!(
        metadata.brokers()[0].port(),
        i32::from(base + 3),
        "advertises the fixed port"
    );
    drop(message);
    drop(consumer);

    // The Redis Cluster's three masters hold every slot.
    let cluster = Command::new("redis-cli")
        .args(["-p", &(base + 4).to_string(), "cluster", "info"])
        .output()
        .expect("redis-cli runs");
    let info = String::from_utf8_lossy(&cluster.stdout);
    assert!(info.contains("cluster_state:ok"), "{info}");
    assert!(info.contains("cluster_known_nodes:3"), "{info}");

    // Each shard of the ClickHouse cluster knows both: a query over the cluster reaches two
    // servers.
    for http_port in [base + 8, base + 9] {
        let shard = clickhouse::Client::default()
            .with_url(format!("http://127.0.0.1:{http_port}"))
            .with_validation(false);
        let servers: u64 = shard
            .query("SELECT count() FROM cluster('topk', system.one)")
            .fetch_one()
            .await
            .expect("a query over the cluster");
        assert_eq!(servers, 2, "shard on port {http_port}");
    }

    // The replicas share one shard through the private ZooKeeper: each sees its macros and
    // the other replica's row in the shard of `topk_replicated`.
    for (http_port, replica) in [(base + 12, "r1"), (base + 13, "r2")] {
        let server = clickhouse::Client::default()
            .with_url(format!("http://127.0.0.1:{http_port}"))
            .with_validation(false);
        let name: String = server
            .query("SELECT substitution FROM system.macros WHERE macro = 'replica'")
            .fetch_one()
            .await
            .expect("macros");
        let zookeeper: u64 = server
            .query("SELECT count() FROM system.zookeeper WHERE path = '/'")
            .fetch_one()
            .await
            .expect("ZooKeeper");
        assert_eq!(name, replica);
        assert!(zookeeper > 0, "ZooKeeper answers on port {http_port}");
        let replicas: u64 = server
            .query("SELECT count() FROM system.clusters WHERE cluster = 'topk_replicated'")
            .fetch_one()
            .await
            .expect("clusters");
        assert_eq!(replicas, 2);
    }

    stack(dir.path(), base, "down");
    assert!(pids(dir.path()).is_empty(), "pid files removed");
    for (service, pid) in first {
        assert!(
            !alive(pid),
            "{service} (pid {pid}) still running after down"
        );
    }
    assert!(
        !stack(dir.path(), base, "status").status.success(),
        "status reports the stack down"
    );
}
