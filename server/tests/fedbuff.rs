//! FedBuff on a live server: an aggregate every K updates, a stale update
//! weighted by 1/√(1+τ), and an update too stale refused by name.

mod common;

use common::*;
use covey_protocol::{
    ModelVersion,
    message::{Message, RejectReason, UpdateReceipt},
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn buffered_aggregation_weights_a_stale_update_by_its_staleness() {
    let tmp = tempfile::tempdir().unwrap();
    // K = 1: every accepted update is one version.
    let mut cfg = config("logreg", 2, 1);
    cfg.rounds.mode = "fedbuff".into();
    cfg.rounds.concurrency = 2;
    let state = init(tmp.path(), &cfg);
    let bundles = enroll(&state, &["fast", "slow"]);
    let (addr, server) = start(&state);
    let fast = raw_connection(&bundles[0], addr).await;
    let slow = raw_connection(&bundles[1], addr).await;
    // Both get a task on version 0 from the first buffer.
    let fast_task = selected_task(&fast).await;
    let slow_task = selected_task(&slow).await;
    assert_eq!(fast_task.round, slow_task.round);
    assert_eq!(slow_task.base_version, ModelVersion(0));
    let n = fast_task.spec.param_count();
    let delta_fast: Vec<f32> = (0..n).map(|i| (i % 3) as f32 * 1e-3).collect();
    let delta_slow: Vec<f32> = (0..n).map(|i| 1e-3 - (i % 5) as f32 * 1e-3).collect();
    let receipt = send_update(&fast, &fast_task, &delta_fast, None).await;
    assert_eq!(receipt, Message::UpdateReceipt(UpdateReceipt::Accepted));
    // Version 1 is committed; the slow client's base is now one version old.
    let receipt = send_update(&slow, &slow_task, &delta_slow, None).await;
    assert_eq!(receipt, Message::UpdateReceipt(UpdateReceipt::Accepted));
    let summary = server.await.unwrap();
    assert_eq!(summary.final_version, 2);

    let store = state.open_store().unwrap();
    let w0 = store.model(ModelVersion(0)).unwrap().weights;
    let w2 = store.model(ModelVersion(2)).unwrap().weights;
    let stale = 1.0 / 2f32.sqrt();
    let expected: Vec<f32> = (0..n)
        .map(|i| w0[i] + delta_fast[i] + stale * delta_slow[i])
        .collect();
    assert_close(&w2, &expected, 1e-6);
    let rounds = store.rounds().unwrap();
    assert_eq!(rounds.len(), 2);
    assert!(rounds.iter().all(|r| r.accepted == 1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_update_beyond_max_staleness_is_refused_and_its_client_retasked() {
    let tmp = tempfile::tempdir().unwrap();
    let mut cfg = config("logreg", 3, 1);
    cfg.rounds.mode = "fedbuff".into();
    cfg.rounds.concurrency = 2;
    cfg.rounds.max_staleness = 1;
    let state = init(tmp.path(), &cfg);
    let bundles = enroll(&state, &["fast", "slow"]);
    let (addr, server) = start(&state);
    let fast = raw_connection(&bundles[0], addr).await;
    let slow = raw_connection(&bundles[1], addr).await;
    let slow_task = selected_task(&slow).await;
    let n = slow_task.spec.param_count();
    let delta = vec![1e-3f32; n];
    // Two versions pass while the slow client trains.
    for _ in 0..2 {
        let task = selected_task(&fast).await;
        let receipt = send_update(&fast, &task, &delta, None).await;
        assert_eq!(receipt, Message::UpdateReceipt(UpdateReceipt::Accepted));
    }
    let receipt = send_update(&slow, &slow_task, &delta, None).await;
    assert_eq!(
        receipt,
        Message::UpdateReceipt(UpdateReceipt::Rejected(RejectReason::Stale))
    );
    // Its slot is free: checking in again gets a fresh task on version 2.
    let fresh = selected_task(&slow).await;
    assert_eq!(fresh.base_version, ModelVersion(2));
    let receipt = send_update(&slow, &fresh, &delta, None).await;
    assert_eq!(receipt, Message::UpdateReceipt(UpdateReceipt::Accepted));
    let summary = server.await.unwrap();
    assert_eq!(summary.final_version, 3);
    assert_eq!(summary.rejected.get("base version too stale"), Some(&1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fedbuff_with_central_dp_accounts_each_aggregate_without_sampling_amplification() {
    let tmp = tempfile::tempdir().unwrap();
    let mut cfg = config("logreg", 10, 2);
    cfg.rounds.mode = "fedbuff".into();
    cfg.privacy.mode = "central".into();
    cfg.privacy.population = 4;
    cfg.privacy.noise_multiplier = 5.0;
    // At q = 1 and z = 5: three aggregates spend 1.4456, a fourth 1.6937.
    // Poisson sampling at 2 of 4 would have admitted more; FedBuff claims none.
    cfg.privacy.target_epsilon = 1.5;
    let state = init(tmp.path(), &cfg);
    let bundles = enroll(&state, &["a", "b", "c"]);
    let (addr, server) = start(&state);
    let clients = spawn_scripted(&bundles, addr, std::time::Duration::from_millis(20));
    let summary = server.await.unwrap();
    for c in clients {
        c.await.unwrap();
    }
    assert_eq!(summary.final_version, 3);
    assert_eq!(
        summary.finish_reason.as_deref(),
        Some("privacy budget exhausted")
    );
    let spent = summary.epsilon.unwrap();
    assert!((spent - 1.4456).abs() < 1e-3, "spent {spent}");
    let rounds = state.open_store().unwrap().rounds().unwrap();
    let committed: Vec<_> = rounds.iter().filter(|r| r.epsilon.is_some()).collect();
    assert_eq!(committed.len(), 3);
    assert!(committed.iter().all(|r| r.accepted == 2));
}
