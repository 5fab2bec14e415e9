//! The root lease and the object store against a real three-node NATS
//! JetStream cluster on loopback (`common/nats.rs`): one root leads, a
//! standby takes over when it dies, a paused old root's writes are refused,
//! commits go on with a node down, models come back checked, and the
//! audit trail comes back sealed and in order.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

#[path = "common/nats.rs"]
mod nats;

use covey_protocol::{ModelVersion, RoundId};
use covey_server::cluster::{
    jetstream::{Cluster, ProposeError, Replica},
    lease::{Lease, Outcome, Refused, Timing},
    objects::{ModelRef, ObjectError},
    route::LeafId,
};
use covey_server::state::sealing::DataKey;
use covey_server::state::store::{ModelHeader, StoredModel};

fn timing() -> Timing {
    Timing::new(Duration::from_secs(3), Duration::from_millis(400)).unwrap()
}

async fn until_leading(replica: &Replica, within: Duration) -> u64 {
    let mut standing = replica.standing();
    let found = tokio::time::timeout(within, async {
        loop {
            if let Some(term) = standing.borrow_and_update().leading {
                return term;
            }
            standing.changed().await.unwrap();
        }
    })
    .await;
    found.expect("no replica took the lease in time")
}

/// Proposes until the state is committed (a node's loss may cost a few
/// tries while JetStream elects new leaders).
async fn commit(replica: &Replica, state: &[u8]) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match replica.propose(state.to_vec()).await {
            Ok(revision) => return revision,
            Err(e @ (ProposeError::NotCommitted | ProposeError::NotLeader(_)))
                if Instant::now() < deadline =>
            {
                eprintln!("retrying a commit: {e}");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => panic!("commit failed: {e}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_root_leads_and_a_standby_takes_over_with_its_state_when_it_dies() {
    let nats = nats::Nats::start();
    let a = Replica::start(nats.key().await, Lease::new("root-a/1", timing()));
    assert_eq!(until_leading(&a, Duration::from_secs(10)).await, 1);
    let b = Replica::start(nats.key().await, Lease::new("root-b/1", timing()));
    for round in 1..=3u8 {
        commit(&a, &[round]).await;
    }
    // The standby has read the state but does not lead, and cannot commit.
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(b.standing().borrow().leading, None);
    assert_eq!(b.standing().borrow().state.as_deref(), Some(&[3u8][..]));
    assert!(matches!(
        b.propose(vec![9]).await,
        Err(ProposeError::NotLeader(_))
    ));

    // The leader dies without a word; the standby takes over in the next
    // term, from the last committed state.
    let died = Instant::now();
    a.kill();
    let term = until_leading(&b, Duration::from_secs(10)).await;
    assert_eq!(term, 2);
    assert!(
        died.elapsed() >= Duration::from_secs(2),
        "took over too early"
    );
    assert_eq!(b.standing().borrow().state.as_deref(), Some(&[3u8][..]));
    commit(&b, &[4]).await;
    let (_, record) = nats.key().await.read().await.unwrap().unwrap();
    assert_eq!((record.holder.as_str(), record.term), ("root-b/1", 2));
    assert_eq!(record.state, vec![4]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_old_roots_writes_are_refused_after_a_takeover() {
    let nats = nats::Nats::start();
    let key = nats.key().await;
    let mut old = Lease::new("root-a/1", timing());
    old.observed(key.read().await.unwrap(), Instant::now());
    let request = old.poll(Instant::now()).unwrap();
    let elected = old.written(key.write(&request).await, Instant::now());
    assert_eq!(elected, Outcome::Elected { term: 1 });
    // It decides to commit version 8, then stalls before the write leaves.
    old.propose(b"version 8".to_vec(), Instant::now()).unwrap();
    let stalled = old.poll(Instant::now()).unwrap();

    let standby = Replica::start(nats.key().await, Lease::new("root-b/1", timing()));
    assert_eq!(until_leading(&standby, Duration::from_secs(10)).await, 2);
    commit(&standby, b"version 8 (b)").await;

    // The old root comes back and sends what it had prepared: refused.
    assert_eq!(key.write(&stalled).await, Err(Refused::Conflict));
    assert_eq!(
        old.written(Err(Refused::Conflict), Instant::now()),
        Outcome::NotCommitted
    );
    assert_eq!(old.leading(Instant::now()), None);
    let (_, record) = key.read().await.unwrap().unwrap();
    assert_eq!(record.holder, "root-b/1");
    assert_eq!(record.state, b"version 8 (b)".to_vec());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commits_go_on_when_one_of_three_nats_nodes_is_killed() {
    let mut nats = nats::Nats::start();
    let root = Replica::start(nats.key().await, Lease::new("root-a/1", timing()));
    until_leading(&root, Duration::from_secs(10)).await;
    commit(&root, &[1]).await;
    // The worst node to lose: the one leading the bucket's stream, whose
    // loss stalls writes until the other two elect a new leader.
    let leader = nats.stream_leader().await;
    nats.kill(leader);
    let mut last = 0;
    for round in 2..=4u8 {
        let revision = commit(&root, &[round]).await;
        assert!(revision > last);
        last = revision;
    }
    let (_, record) = nats.key().await.read().await.unwrap().unwrap();
    assert_eq!(record.state, vec![4]);
    // However the node's loss went, one replica has led throughout.
    assert_eq!(record.holder, "root-a/1");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn models_and_partial_sums_round_trip_checked_and_survive_a_node() {
    let mut nats = nats::Nats::start();
    nats.key().await; // the cluster is up
    let cluster = Cluster::connect(&nats.config(), DataKey::generate().unwrap())
        .await
        .unwrap();
    let objects = cluster.objects().await.unwrap();
    // McMahan's CNN (6.65 MB): many chunks, in the store's own record.
    let cnn = covey_protocol::model::ModelSpec::mnist(covey_protocol::model::Architecture::Cnn);
    let weights: Vec<f32> = (0..cnn.param_count()).map(|i| (i as f32).sin()).collect();
    let stored = |version: u64| StoredModel {
        header: ModelHeader {
            version: ModelVersion(version),
            spec: cnn.clone(),
            round: Some(RoundId(version)),
            created_unix_ms: 1,
        },
        weights: weights.clone(),
    };
    let model = objects.put_model(&stored(7)).await.unwrap();
    assert_eq!(objects.get_model(&model).await.unwrap(), stored(7));

    // A reference the store does not match is refused by name.
    let mut forged = model.clone();
    forged.sha256[0] ^= 1;
    let err = objects.get_model(&forged).await.unwrap_err();
    assert!(matches!(err, ObjectError::Mismatch { .. }), "{err}");
    assert!(err.to_string().contains("SHA-256"), "{err}");
    let short = ModelRef {
        bytes: 10,
        ..model.clone()
    };
    let err = objects.get_model(&short).await.unwrap_err();
    assert!(err.to_string().contains("larger than"), "{err}");
    let missing = ModelRef {
        version: ModelVersion(8),
        ..model.clone()
    };
    assert!(objects.get_model(&missing).await.is_err());

    let leaf = LeafId("leaf-0".into());
    objects
        .put_partial(RoundId(3), &leaf, b"partial bytes")
        .await
        .unwrap();
    assert_eq!(
        objects.get_partial(RoundId(3), &leaf, 1024).await.unwrap(),
        b"partial bytes"
    );
    assert!(objects.get_partial(RoundId(3), &leaf, 4).await.is_err());

    // Replicated three ways: the model is still there with a node gone.
    nats.kill(0);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match objects.get_model(&model).await {
            Ok(read) => {
                assert_eq!(read, stored(7));
                break;
            }
            Err(e) if Instant::now() < deadline => {
                eprintln!("waiting for the store after a node's loss: {e}");
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            Err(e) => panic!("the model was lost with one node: {e}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revocation_on_one_node_is_refused_on_every_other() {
    use covey_privacy::Pseudonym;
    use covey_protocol::admin::Role;
    use covey_server::admission::pki::Admitted;

    let nats = nats::Nats::start();
    nats.key().await; // the cluster is up
    let on_node = |i: usize| {
        let mut config = nats.config();
        config.urls = vec![nats.urls[i].clone()];
        config
    };
    let key = DataKey::generate().unwrap();
    let root = Cluster::connect(&on_node(0), key.clone()).await.unwrap();
    let leaf = Cluster::connect(&on_node(2), key).await.unwrap();
    let (early, late, kept) = (
        Pseudonym::from_bytes([1; 8]),
        Pseudonym::from_bytes([2; 8]),
        Pseudonym::from_bytes([3; 8]),
    );
    let admitted = Arc::new(Admitted::new([
        (early, Role::Device),
        (late, Role::Device),
        (kept, Role::Device),
    ]));
    // One revoked before the leaf starts following, one after.
    let registry = root.registry().await.unwrap();
    registry.revoke(&early, 1).await.unwrap();
    let (follower, mut applied) = leaf
        .registry()
        .await
        .unwrap()
        .follow(admitted.clone())
        .await
        .unwrap();
    let revoked = Instant::now();
    registry.revoke(&late, 2).await.unwrap();
    tokio::time::timeout(Duration::from_secs(10), applied.wait_for(|n| *n >= 2))
        .await
        .expect("the revocations never reached the other node")
        .unwrap();
    eprintln!(
        "revocation reached the other node in {:?}",
        revoked.elapsed()
    );
    assert!(!admitted.contains(&early));
    assert!(!admitted.contains(&late));
    assert!(admitted.contains(&kept));
    follower.abort();
}

/// The trail's bucket gives back exactly the entries stored, sealed: a
/// missing entry and one sealed under another directory's key are named,
/// and an export with no root to close the trail says so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trail_entries_come_back_in_order_and_gaps_and_strangers_are_named() {
    use covey_server::{
        cluster::trail::{self, TrailError},
        state::audit::{AuditEvent, AuditSigner, ChainHead},
    };
    let nats = nats::Nats::start();
    nats.key().await; // the cluster is up
    let key = DataKey::generate().unwrap();
    let cluster = Cluster::connect(&nats.config(), key.clone()).await.unwrap();
    let trail = cluster
        .patiently(|c| async move { c.trail().await })
        .await
        .unwrap();
    let signer = AuditSigner::from_pkcs8(&AuditSigner::generate().unwrap()).unwrap();
    let events = (1..=3).map(|round| AuditEvent::RoundStarted {
        round,
        base_version: round - 1,
        selected: 5,
    });
    let (entries, head) = signer.seal(ChainHead::EMPTY, 1, events);
    // In two writes, the second twice, as a root and its successor would.
    trail
        .store(ChainHead::after(&entries[0], 0), &entries[..1])
        .await
        .unwrap();
    trail.store(head, &entries[1..]).await.unwrap();
    trail.store(head, &entries[1..]).await.unwrap();
    assert_eq!(trail.read(3).await.unwrap(), entries);
    assert!(matches!(trail.read(4).await, Err(TrailError::Missing(3))));

    let stranger = Cluster::connect(&nats.config(), DataKey::generate().unwrap())
        .await
        .unwrap()
        .trail()
        .await
        .unwrap();
    assert!(matches!(
        stranger.read(1).await,
        Err(TrailError::Unreadable { seq: 0, .. })
    ));

    let mut out = Vec::new();
    let err = trail::export(&trail, &mut out, Duration::from_secs(1))
        .await
        .unwrap_err();
    assert!(matches!(err, TrailError::NoRoot(_)), "{err}");
    assert!(out.is_empty());
}
