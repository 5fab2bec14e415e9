//! The privacy budget: ε spent before the server stopped counts against the
//! same target afterwards, and the PLD accountant fits more rounds into it.

mod common;

use std::time::Duration;

use common::*;
use covey_protocol::identity::IdentityBundle;
use covey_server::{Server, StateDir};

/// Two enrolled devices, both in every round (q = 1), central DP at z = 5.
fn central_dp_state(
    dir: &std::path::Path,
    target_epsilon: f64,
    accountant: &str,
) -> (StateDir, Vec<IdentityBundle>) {
    let mut cfg = config("logreg", 10, 2);
    cfg.privacy.mode = "central".into();
    cfg.privacy.population = 2;
    cfg.privacy.noise_multiplier = 5.0;
    cfg.privacy.target_epsilon = target_epsilon;
    cfg.privacy.accountant = accountant.into();
    let state = init(dir, &cfg);
    let bundles = enroll(&state, &["a", "b"]);
    (state, bundles)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spent_privacy_is_remembered_across_a_restart() {
    let tmp = tempfile::tempdir().unwrap();
    // At q = 1 and z = 5: three rounds spend 1.4456, a fourth 1.6937.
    let (state, bundles) = central_dp_state(tmp.path(), 1.5, "rdp");

    // First run: stop after the first commit.
    let server = Server::open(&state).unwrap();
    let addr = server.local_addr().unwrap();
    let mut commits = server.subscribe();
    let stopper = server.stopper();
    let running = tokio::spawn(server.run());
    let clients = spawn_scripted(&bundles, addr, Duration::from_millis(50));
    let first = commits.recv().await.unwrap();
    stopper.stop().await;
    let summary = running.await.unwrap().unwrap();
    for c in clients {
        c.await.unwrap();
    }
    assert_eq!(
        summary.finish_reason.as_deref(),
        Some("stopped by the operator")
    );
    let after_first = first.record.epsilon.unwrap();
    let committed = summary.final_version;
    assert!(committed >= 1);

    // Second run: only the rounds the remaining budget admits.
    let (addr, running) = start(&state);
    let clients = spawn_scripted(&bundles, addr, Duration::from_millis(50));
    let summary = running.await.unwrap();
    for c in clients {
        c.await.unwrap();
    }
    assert_eq!(
        summary.final_version, 3,
        "three rounds in all fit the budget"
    );
    assert_eq!(
        summary.finish_reason.as_deref(),
        Some("privacy budget exhausted")
    );
    let spent = summary.epsilon.unwrap();
    assert!(spent <= 1.5 && spent > after_first, "spent {spent}");
    let ledger = state
        .open_store()
        .unwrap()
        .privacy_ledger()
        .unwrap()
        .unwrap();
    assert_eq!(ledger.rounds, 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_pld_accountant_fits_a_round_more_into_the_same_budget() {
    let tmp = tempfile::tempdir().unwrap();
    // At q = 1 and z = 5, RDP: 1.4456 after three rounds, 1.6937 after
    // four; PLD: 1.5550 after four, 1.7601 after five.
    let (state, bundles) = central_dp_state(tmp.path(), 1.6, "pld");
    let (addr, running) = start(&state);
    let clients = spawn_scripted(&bundles, addr, Duration::from_millis(50));
    let summary = running.await.unwrap();
    for c in clients {
        c.await.unwrap();
    }
    assert_eq!(summary.final_version, 4, "four rounds fit by PLD");
    assert_eq!(
        summary.finish_reason.as_deref(),
        Some("privacy budget exhausted")
    );
    let spent = summary.epsilon.unwrap();
    assert!((spent - 1.5550).abs() < 1e-3, "spent {spent}");
    let ledger = state
        .open_store()
        .unwrap()
        .privacy_ledger()
        .unwrap()
        .unwrap();
    assert_eq!(ledger.rounds, 4);
    assert_eq!(ledger.history.len(), 1, "one mechanism throughout");
}
