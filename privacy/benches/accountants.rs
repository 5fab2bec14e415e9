//! What one ε costs: RDP against PLD on the settings an operator plans with.
//! `cargo bench -p covey-privacy --bench accountants`
use covey_privacy::accountant::{Delta, NoiseMultiplier, SamplingRate, dp_fedavg_epsilon};
use covey_privacy::pld::pld_epsilon;
use criterion::{Criterion, criterion_group, criterion_main};

fn accountants(c: &mut Criterion) {
    let mut group = c.benchmark_group("accountants");
    group.sample_size(10);
    let delta = Delta::new(1e-5).expect("valid");
    for (q, z, rounds) in [(0.01, 4.0, 10_000u64), (0.1, 1.0, 1_000), (1.0, 5.0, 100)] {
        let (q, z) = (
            SamplingRate::new(q).expect("valid"),
            NoiseMultiplier::new(z).expect("valid"),
        );
        let case = format!("q={} z={} T={rounds}", q.get(), z.get());
        group.bench_function(format!("rdp {case}"), |b| {
            b.iter(|| dp_fedavg_epsilon(q, z, rounds, delta))
        });
        group.bench_function(format!("pld {case}"), |b| {
            b.iter(|| pld_epsilon(q, z, rounds, delta))
        });
    }
    group.finish();
}

criterion_group!(benches, accountants);
criterion_main!(benches);
