//! Encryption at rest: sealing and opening one CNN model version
//! (1,663,370 f32 parameters, 6.65 MB) under the data key, and signing one
//! audit entry.

use covey_server::{
    state::audit::{AuditEvent, AuditSigner, ChainHead},
    state::sealing::DataKey,
};
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use std::hint::black_box;

const PARAMS: usize = 1_663_370;

fn at_rest(c: &mut Criterion) {
    let model: Vec<u8> = (0..PARAMS * 4).map(|i| (i % 251) as u8).collect();
    let key = DataKey::generate().unwrap();
    let sealed = key.seal(b"models/1", &model).unwrap();
    let mut group = c.benchmark_group("at_rest");
    group.throughput(Throughput::Bytes(model.len() as u64));
    group.bench_function("seal CNN version", |b| {
        b.iter(|| key.seal(b"models/1", black_box(&model)).unwrap())
    });
    group.bench_function("open CNN version", |b| {
        b.iter(|| key.open(b"models/1", black_box(&sealed)).unwrap())
    });
    group.finish();

    let signer = AuditSigner::from_pkcs8(&AuditSigner::generate().unwrap()).unwrap();
    c.bench_function("audit: seal one round_committed entry", |b| {
        b.iter(|| {
            signer.seal(
                ChainHead::EMPTY,
                1,
                [AuditEvent::RoundCommitted {
                    round: 7,
                    version: 7,
                    cohort: 100,
                    epsilon: Some(1.25),
                    rejected: Default::default(),
                }],
            )
        })
    });
}

criterion_group!(benches, at_rest);
criterion_main!(benches);
