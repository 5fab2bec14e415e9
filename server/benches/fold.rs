//! The aggregation fold `acc += w · update` for CNN-sized updates
//! (1,663,370 f32 parameters), in bytes of update folded per second.

use covey_server::fold::aggregate::{WeightedSum, fold_into};
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use std::hint::black_box;

const PARAMS: usize = 1_663_370;

fn fold(c: &mut Criterion) {
    let update: Vec<f32> = (0..PARAMS).map(|i| (i % 97) as f32 * 1e-3).collect();
    let mut group = c.benchmark_group("fold");
    group.throughput(Throughput::Bytes((PARAMS * 4) as u64));
    let mut acc = vec![0.0f32; PARAMS];
    group.bench_function("fold_into 1663370 f32", |b| {
        b.iter(|| fold_into(black_box(&mut acc), black_box(&update), 0.5))
    });
    let mut sum = WeightedSum::new(PARAMS);
    group.bench_function("WeightedSum::fold 1663370 f32", |b| {
        b.iter(|| sum.fold(black_box(&update), 30.0))
    });
    group.finish();
}

criterion_group!(benches, fold);
criterion_main!(benches);
