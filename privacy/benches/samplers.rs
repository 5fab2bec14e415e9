//! Exact noise throughput: ours, opendp's reference, and an insecure float
//! sampler for contrast. `cargo bench -p covey-privacy --bench samplers`
use covey_privacy::noise::{DiscreteGaussian, NoiseRng};
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use rand::SeedableRng;
use rand_distr::{Distribution, Normal};

const N: usize = 100_000;

fn samplers(c: &mut Criterion) {
    let mut group = c.benchmark_group("samplers");
    group.sample_size(10);
    group.throughput(Throughput::Elements(N as u64));
    for sigma in [10.0, 1024.0] {
        let g = DiscreteGaussian::new(sigma).expect("valid sigma");
        let mut rng = NoiseRng::from_os().expect("entropy");
        let mut out = vec![0i64; N];
        group.bench_function(format!("covey discrete gaussian σ={sigma}"), |b| {
            b.iter(|| g.fill(&mut rng, &mut out))
        });
    }
    let scale = dashu::rational::RBig::try_from(10.0).expect("finite");
    group.throughput(Throughput::Elements(1_000));
    group.bench_function("opendp discrete gaussian σ=10", |b| {
        b.iter(|| {
            for _ in 0..1_000 {
                std::hint::black_box(
                    opendp::traits::samplers::sample_discrete_gaussian(scale.clone())
                        .expect("sample"),
                );
            }
        })
    });
    group.throughput(Throughput::Elements(N as u64));
    let normal = Normal::new(0.0f32, 1.0).expect("valid");
    let mut fast = rand::rngs::SmallRng::seed_from_u64(1);
    let mut floats = vec![0f32; N];
    group.bench_function("insecure rand_distr Normal f32", |b| {
        b.iter(|| {
            floats
                .iter_mut()
                .for_each(|v| *v = normal.sample(&mut fast))
        })
    });
    group.finish();
}

criterion_group!(benches, samplers);
criterion_main!(benches);
