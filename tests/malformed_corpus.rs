//! The checked-in corpus of malformed play events (`tests/corpus/malformed/<reason>/<case>.bin`)
//! through the real aggregator, a real broker and the real ClickHouse: every malformed message
//! lands in `<topic>.dlq` exactly once with exactly its reason, none is counted, and the
//! partition never stalls behind one.
//!
//! Every message carries the Kafka timestamp `CORPUS_NOW_MS`: validation depends only on the
//! message (its bytes and that timestamp), so the corpus is byte-exact and the time-dependent
//! reasons (`future_timestamp`, `too_old`) are the same on every run.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{Offset, TopicPartitionList};
use tokio_util::sync::CancellationToken;
use topk::event::{MAX_FUTURE_MS, Rejection, Validator};

/// 2025-11-29T16:00:00Z: the Kafka timestamp of every message (see `tests/corpus/generate.py`).
const CORPUS_NOW_MS: i64 = 1_764_432_000_000;
/// The size of the largest cases of the corpus: 900 KiB, what a dead letter can carry (see
/// `a_1_mib_malformed_message_does_not_stall_its_partition`).
const LARGE: usize = 900 << 10;
const ONE_MIB: usize = 1 << 20;

/// One malformed message and the reason it must be dead-lettered with.
#[derive(Debug, Clone)]
struct Case {
    name: String,
    reason: String,
    /// `None`: a message without a value (a tombstone).
    payload: Option<Vec<u8>>,
}

/// The checked-in corpus, plus the cases too big (900 KiB) or impossible (no value) to be files.
fn corpus() -> Vec<Case> {
    let root = common::workspace_root().join("tests/corpus/malformed");
    let mut cases = Vec::new();
    for reason in sorted_entries(&root) {
        for file in sorted_entries(&reason) {
            cases.push(Case {
                name: file.file_stem().unwrap().to_string_lossy().into_owned(),
                reason: reason.file_name().unwrap().to_string_lossy().into_owned(),
                payload: Some(std::fs::read(&file).expect("corpus file")),
            });
        }
    }
    cases.extend(generated_cases(LARGE));
    cases
}

fn sorted_entries(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|entry| entry.expect("entry").path())
        .collect();
    entries.sort();
    entries
}

/// The cases too big to keep in git, `size` bytes each, or impossible to keep as a file.
fn generated_cases(size: usize) -> Vec<Case> {
    // A well-formed play whose event id makes the value exactly `size` bytes.
    let frame = format!(r#"{{"event_id":"","user_id":1,"song_id":2,"timestamp":{CORPUS_NOW_MS}}}"#);
    let id = "x".repeat(size - frame.len());
    let huge_id =
        format!(r#"{{"event_id":"{id}","user_id":1,"song_id":2,"timestamp":{CORPUS_NOW_MS}}}"#);
    assert_eq!(huge_id.len(), size);
    vec![
        Case {
            name: format!("event_id_of_{size}_bytes"),
            reason: "bad_event_id".into(),
            payload: Some(huge_id.into_bytes()),
        },
        Case {
            name: format!("{size}_bytes_of_nested_arrays"),
            reason: "invalid_json".into(),
            payload: Some([vec![b'['; size / 2], vec![b']'; size / 2]].concat()),
        },
        Case {
            name: "no_value".into(),
            reason: "invalid_json".into(),
            payload: None,
        },
    ]
}

/// Without any service: the corpus names every reason the aggregator has, several cases each,
/// and the validator gives each case the reason of its directory.
#[test]
fn corpus_covers_every_reason_and_each_case_has_its_reason() {
    let cases = corpus();
    let mut per_reason: BTreeMap<&str, usize> = BTreeMap::new();
    for case in &cases {
        *per_reason.entry(case.reason.as_str()).or_default() += 1;
    }
    let all: BTreeSet<&str> = Rejection::ALL.iter().map(|r| r.as_str()).collect();
    assert_eq!(per_reason.keys().copied().collect::<BTreeSet<_>>(), all);
    assert!(
        per_reason.values().all(|&n| n >= 5),
        "at least 5 cases per reason: {per_reason:?}"
    );
    let validator = Validator::default();
    for case in &cases {
        let Some(payload) = &case.payload else {
            continue;
        };
        let got = validator.validate(payload, CORPUS_NOW_MS);
        assert_eq!(
            got.map_err(Rejection::as_str),
            Err(case.reason.as_str()),
            "{}/{}",
            case.reason,
            case.name
        );
    }
}

/// A message to produce: a valid play, or a malformed case.
struct Outgoing {
    key: Vec<u8>,
    payload: Option<Vec<u8>>,
    malformed: Option<Case>,
}

/// Found by `fuzz/fuzz_targets/event.rs`: serde derives read a JSON array as a struct, so an
/// array of the four fields in order was accepted as a play.
#[test]
fn a_json_array_is_not_a_play() {
    let payload = format!(r#"["a",42,7,{CORPUS_NOW_MS}]"#);
    assert_eq!(
        Validator::default().validate(payload.as_bytes(), CORPUS_NOW_MS),
        Err(Rejection::InvalidJson)
    );
}

/// Found by `fuzz/fuzz_targets/event.rs`: serde_json skips an unknown field's string without
/// checking its UTF-8, so a value that is not JSON was accepted.
#[test]
fn invalid_utf8_in_an_unknown_field_is_invalid_json() {
    let payload = [
        br#"{"event_id":"a","user_id":1,"song_id":2,"client":""#.as_slice(),
        b"\xff\xfe",
        format!(r#"","timestamp":{CORPUS_NOW_MS}}}"#).as_bytes(),
    ]
    .concat();
    assert_eq!(
        Validator::default().validate(&payload, CORPUS_NOW_MS),
        Err(Rejection::InvalidJson)
    );
}

/// Found by the fuzzer: past 2106-02-07 a minute no longer fits the u32 seconds of
/// `PlayEvent::minute` (and of ClickHouse's `DateTime`), which answers 0, yet an event that late
/// was accepted when its message's Kafka timestamp (set by the producer) was that late too: it
/// would have been counted in the minute of 1970-01-01T00:00.
#[test]
fn an_event_past_2106_is_not_bucketed_in_1970() {
    let late_ms = (i64::from(u32::MAX) + 60) * 1000;
    let payload = format!(r#"{{"event_id":"a","user_id":1,"song_id":2,"timestamp":{late_ms}}}"#);
    match Validator::default().validate(payload.as_bytes(), late_ms) {
        Ok(event) => assert_eq!(i64::from(event.minute()) * 1000, late_ms),
        Err(reason) => assert_eq!(reason, Rejection::BadTimestamp),
    }
}

/// What the test produced at one offset.
#[derive(Debug)]
enum Sent {
    Valid,
    Malformed(Case, Vec<u8>),
}

fn big_message_producer(brokers: &str) -> FutureProducer {
    topk::kafka::base_config(brokers)
        .set("acks", "all")
        .set("max.in.flight.requests.per.connection", "1")
        .set("message.timeout.ms", "30000")
        // Room for the 1 MiB cases (the default, 1,000,000 bytes, is just under 1 MiB).
        .set("message.max.bytes", "4000000")
        .create()
        .expect("producer")
}

/// A broker with a fresh one-partition topic and its dead-letter topic.
struct Broker {
    /// The in-process dev broker (alive as long as the value), or `None` on tansu.
    _dev: Option<topk_devbroker::DevBroker>,
    brokers: String,
    topic: String,
}

fn dev_broker() -> Broker {
    let (broker, topic) = common::dev_broker(1);
    Broker {
        brokers: broker.bootstrap_servers(),
        _dev: Some(broker),
        topic,
    }
}

/// The durable broker of the test stack (tansu), as in tests/aggregator.rs.
async fn tansu() -> Broker {
    let (brokers, topic) = common::tansu_topics(1).await;
    Broker {
        _dev: None,
        brokers,
        topic,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_corpus_is_dead_lettered_once_with_its_reason_and_never_stalls() {
    through_the_aggregator(dev_broker(), corpus()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_corpus_on_tansu() {
    through_the_aggregator(tansu().await, corpus()).await;
}

/// Found by this corpus: a malformed message of 1 MiB fits `plays` (Kafka's default
/// `max.message.bytes` is 1,048,588) but its dead letter (value, key and four headers) was
/// refused with `MessageSizeTooLarge` by the aggregator's producer (librdkafka's
/// `message.max.bytes` defaulted to 1,000,000): the flush failed, was retried forever, and the
/// partition never committed again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_1_mib_malformed_message_does_not_stall_its_partition() {
    let mut cases = generated_cases(ONE_MIB);
    cases.retain(|case| case.payload.is_some());
    through_the_aggregator(dev_broker(), cases).await;
}

/// Produces `cases` interleaved with valid plays on one partition, runs the aggregator until it
/// commits the end, and checks the dead letters, the counts and the commit.
async fn through_the_aggregator(broker: Broker, cases: Vec<Case>) {
    // The aggregator's warnings (a failing flush says why) in the test's output.
    let _ = tracing_subscriber::fmt()
        .with_env_filter("warn")
        .with_test_writer()
        .try_init();
    let (brokers, topic) = (broker.brokers.as_str(), broker.topic.as_str());
    let clickhouse = common::migrated_database().await;
    let validator = Validator::default();

    // valid, malformed, valid, malformed, …, valid: each malformed message is followed by a
    // valid one, which is counted only if the partition moved past the malformed one.
    let mut truth: BTreeMap<(u64, u64), u64> = BTreeMap::new();
    let mut messages: Vec<Outgoing> = Vec::new();
    for (i, case) in cases.iter().map(Some).chain([None]).enumerate() {
        let i = i as u64;
        let (user, song) = (1 + i % 7, 1 + i % 3);
        // Timestamps across the whole accepted range, both bounds included.
        let timestamp = match i % 4 {
            0 => CORPUS_NOW_MS + MAX_FUTURE_MS,
            1 => CORPUS_NOW_MS - validator.retention_ms,
            _ => CORPUS_NOW_MS - (i as i64) * 61_000,
        };
        // Unknown fields are part of the contract (ignored), nested junk included.
        let extra = if i % 5 == 2 {
            format!(
                r#","client":{}1{}"#,
                r#"{"a":"#.repeat(200),
                "}".repeat(200)
            )
        } else {
            String::new()
        };
        let value = format!(
            r#"{{"event_id":"ok-{i}","user_id":{user},"song_id":{song},"timestamp":{timestamp}{extra}}}"#
        );
        messages.push(Outgoing {
            key: user.to_string().into_bytes(),
            payload: Some(value.into_bytes()),
            malformed: None,
        });
        *truth.entry((user, song)).or_default() += 1;
        if let Some(case) = case {
            let key = format!("bad-{}-{}", case.reason, case.name).into_bytes();
            messages.push(Outgoing {
                key,
                payload: case.payload.clone(),
                malformed: Some(case.clone()),
            });
        }
    }

    let producer = big_message_producer(brokers);
    let mut sent: BTreeMap<i64, Sent> = BTreeMap::new();
    // One at a time: the offsets are the order of `messages`.
    for Outgoing {
        key,
        payload,
        malformed: case,
    } in messages
    {
        let mut record = FutureRecord::<[u8], [u8]>::to(topic)
            .key(&key)
            .timestamp(CORPUS_NOW_MS);
        if let Some(payload) = &payload {
            record = record.payload(payload);
        }
        let delivery = producer
            .send(record, Duration::from_secs(60))
            .await
            .unwrap_or_else(|(e, _)| panic!("produce {case:?}: {e}"));
        assert_eq!(delivery.partition, 0);
        let entry = match case {
            Some(case) => Sent::Malformed(case, key),
            None => Sent::Valid,
        };
        sent.insert(delivery.offset, entry);
    }
    let end = *sent.keys().last().unwrap() + 1;
    let malformed = sent
        .values()
        .filter(|s| matches!(s, Sent::Malformed(..)))
        .count();
    assert_eq!(malformed, cases.len());

    let group = common::unique("malformed");
    let args = common::aggregator_args(
        brokers,
        topic,
        &clickhouse,
        &[&format!("--group={group}"), "--flush-interval=300ms"],
    );
    let shutdown = CancellationToken::new();
    let worker = tokio::spawn(topk_aggregator::run(args, shutdown.clone()));

    // The committed offset reaches the end of the partition: nothing stalled it.
    let committed = common::group::wait_for_commit(brokers, &group, topic, end).await;
    shutdown.cancel();
    worker.await.expect("joins").expect("clean shutdown");
    assert_eq!(committed, end);

    // Every valid play counted exactly once, no malformed one counted at all.
    common::workload::assert_same_totals(&common::workload::totals(&clickhouse).await, &truth);

    // Every malformed message in the DLQ exactly once, with its reason, bytes and key.
    let letters = read_all(brokers, &topk::config::dlq_topic(topic)).await;
    let mut seen = BTreeSet::new();
    for letter in &letters {
        let offset: i64 = letter.header("source_offset").parse().expect("offset");
        assert!(seen.insert(offset), "offset {offset} dead-lettered twice");
        let Some(Sent::Malformed(case, key)) = sent.get(&offset) else {
            panic!(
                "offset {offset} is not a malformed message: {:?}",
                sent.get(&offset)
            );
        };
        let what = format!("{}/{} at offset {offset}", case.reason, case.name);
        assert_eq!(letter.header("reason"), case.reason, "{what}");
        assert_eq!(letter.header("source_topic"), topic, "{what}");
        assert_eq!(letter.header("source_partition"), "0", "{what}");
        assert_eq!(
            letter.payload,
            case.payload.clone().unwrap_or_default(),
            "{what}"
        );
        assert_eq!(letter.key.as_deref(), Some(key.as_slice()), "{what}");
    }
    assert_eq!(letters.len(), malformed);

    drop(broker);
    common::drop_database(&clickhouse).await;
}

struct Letter {
    key: Option<Vec<u8>>,
    payload: Vec<u8>,
    headers: BTreeMap<String, String>,
}

impl Letter {
    fn header(&self, name: &str) -> &str {
        self.headers
            .get(name)
            .unwrap_or_else(|| panic!("header {name} missing"))
    }
}

/// Every message of partition 0 of `topic`, from its start to its high watermark.
async fn read_all(brokers: &str, topic: &str) -> Vec<Letter> {
    let consumer: BaseConsumer = topk::kafka::consumer_config(brokers, &common::unique("dlq"))
        .create()
        .expect("consumer");
    let (low, high) = consumer
        .fetch_watermarks(topic, 0, Duration::from_secs(10))
        .expect("watermarks");
    let mut partitions = TopicPartitionList::new();
    partitions
        .add_partition_offset(topic, 0, Offset::Offset(low))
        .expect("offset");
    consumer.assign(&partitions).expect("assign");
    let mut letters = Vec::new();
    let mut next = low;
    while next < high {
        let message = tokio::task::block_in_place(|| consumer.poll(Duration::from_secs(60)))
            .unwrap_or_else(|| panic!("dead letters stop at offset {next} of {high}"))
            .expect("no consumer error");
        next = message.offset() + 1;
        let headers = message
            .headers()
            .map(|h| {
                h.iter()
                    .map(|h| {
                        let value = String::from_utf8_lossy(h.value.unwrap_or_default());
                        (h.key.to_owned(), value.into_owned())
                    })
                    .collect()
            })
            .unwrap_or_default();
        letters.push(Letter {
            key: message.key().map(<[u8]>::to_vec),
            payload: message.payload().map(<[u8]>::to_vec).unwrap_or_default(),
            headers,
        });
    }
    letters
}
