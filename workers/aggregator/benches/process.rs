//! The aggregator's per-message hot path (validate, dedup, count) without I/O, against the
//! cost of only parsing the JSON, in the same run: `cargo bench -p topk-aggregator`.

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use std::hint::black_box;
use topk::counting::partition::{Message, PartitionState};
use topk::event::Validator;

const T0: i64 = 1_764_432_000_000;

fn payloads(n: u64) -> Vec<Vec<u8>> {
    (0..n)
        .map(|i| {
            let user = (i * 7_919) % 100_000 + 1;
            let song = (i * 104_729) % 10_000 + 1;
            let ts = T0 - ((i % 3_600) as i64) * 1000;
            format!(r#"{{"event_id":"e{i}","user_id":{user},"song_id":{song},"timestamp":{ts}}}"#)
                .into_bytes()
        })
        .collect()
}

fn hot_path(c: &mut Criterion) {
    let n = 100_000u64;
    let messages = payloads(n);
    let mut group = c.benchmark_group("aggregator");
    group.throughput(Throughput::Elements(n));
    group.sample_size(20);
    group.bench_function("baseline: parse JSON only", |b| {
        b.iter(|| {
            for payload in &messages {
                black_box(serde_json::from_slice::<serde_json::Value>(payload).ok());
            }
        })
    });
    group.bench_function("validate", |b| {
        let validator = Validator::default();
        b.iter(|| {
            for payload in &messages {
                black_box(validator.validate(payload, T0).ok());
            }
        })
    });
    group.bench_function("process (validate + dedup + count)", |b| {
        b.iter(|| {
            let mut state = PartitionState::new(0, Validator::default(), 600_000, None, Vec::new());
            for (offset, payload) in messages.iter().enumerate() {
                black_box(state.process(Message {
                    offset: offset as u64,
                    timestamp: Some(T0),
                    key: None,
                    payload: Some(payload),
                }));
            }
            state.seal();
            black_box(state.take_sealed());
        })
    });
    group.finish();
}

criterion_group!(benches, hot_path);
criterion_main!(benches);
