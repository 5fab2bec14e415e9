//! What a compliance audit checks on a real server: no aggregate below k,
//! and no identifying data in what the server keeps.

mod common;

use std::time::Duration;

use common::*;
use covey_server::{
    Server,
    state::audit::AuditEvent,
    state::store::{RoundOutcome, Store},
};

fn audit_events(store: &Store) -> Vec<AuditEvent> {
    store
        .audit_entries()
        .unwrap()
        .iter()
        .map(|e| e.entry().unwrap().event)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_round_below_k_commits_nothing_and_is_on_the_record() {
    let tmp = tempfile::tempdir().unwrap();
    let mut cfg = config("logreg", 1, 3);
    cfg.compliance.min_cohort = 3;
    let state = init(tmp.path(), &cfg);
    let bundles = enroll(&state, &["a", "b", "leaver"]);
    let server = Server::open(&state).unwrap();
    let addr = server.local_addr().unwrap();
    let stopper = server.stopper();
    let mut commits = server.subscribe();
    let running = tokio::spawn(server.run());

    // The third member takes its task and leaves: two updates arrive.
    let leaver = raw_connection(&bundles[2], addr).await;
    let left = tokio::spawn(async move {
        selected_task(&leaver).await;
        leaver.close(0u32.into(), b"gone");
    });
    let honest = spawn_scripted(&bundles[..2], addr, Duration::from_millis(50));
    left.await.unwrap();

    // Wait until the round is recorded as aborted, then stop.
    let mut aborted = false;
    for _ in 0..100 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let snapshot = covey_server::operator::status::read_snapshot(&state.status_path());
        if let Ok(report) = snapshot
            && report
                .rounds
                .iter()
                .any(|r| r.outcome.starts_with("aborted"))
        {
            aborted = true;
            break;
        }
    }
    assert!(aborted, "the round below k was never aborted");
    assert!(commits.try_recv().is_err(), "a model was released below k");
    stopper.stop().await;
    let summary = running.await.unwrap().unwrap();
    assert_eq!(summary.final_version, 0);
    for c in honest {
        c.abort();
    }

    let store = state.open_store().unwrap();
    assert_eq!(store.current_version().unwrap().0, 0);
    assert_eq!(store.versions().unwrap().len(), 1);
    let first = &store.rounds().unwrap()[0];
    assert!(matches!(first.outcome, RoundOutcome::Aborted { .. }));
    assert!(first.accepted < 3, "{first:?}");
    let events = audit_events(&store);
    assert!(
        events.iter().any(|e| matches!(
            e,
            AuditEvent::RoundAborted { round: 1, cohort, .. } if *cohort < 3
        )),
        "{events:?}"
    );
    assert!(
        !events
            .iter()
            .any(|e| matches!(e, AuditEvent::RoundCommitted { .. }))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_keeps_only_the_newest_versions_during_a_run_and_says_so() {
    let tmp = tempfile::tempdir().unwrap();
    let mut cfg = config("logreg", 3, 2);
    cfg.compliance.keep_versions = 2;
    let state = init(tmp.path(), &cfg);
    let bundles = enroll(&state, &["a", "b"]);
    let (addr, server) = start(&state);
    let clients = spawn_scripted(&bundles, addr, Duration::ZERO);
    assert_eq!(server.await.unwrap().final_version, 3);
    for c in clients {
        c.await.unwrap();
    }
    let store = state.open_store().unwrap();
    let versions: Vec<u64> = store.versions().unwrap().iter().map(|v| v.0).collect();
    assert_eq!(versions, vec![2, 3]);
    // All three round records stay: only versions have a limit here.
    assert_eq!(store.rounds().unwrap().len(), 3);
    let purged: Vec<u64> = audit_events(&store)
        .into_iter()
        .flat_map(|e| match e {
            AuditEvent::Purged { rounds, versions } => {
                assert!(rounds.is_empty());
                versions
            }
            _ => Vec::new(),
        })
        .collect();
    assert_eq!(purged, vec![0, 1]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_renews_its_short_lived_certificate_before_it_expires() {
    let tmp = tempfile::tempdir().unwrap();
    let state = init(tmp.path(), &config("logreg", 1, 1));
    let bundle = state
        .enroll(
            &state.open_store().unwrap(),
            "brief",
            Duration::from_secs(9),
            None,
        )
        .unwrap();
    let path = tmp.path().join("brief.identity");
    std::fs::write(&path, bundle.to_toml()).unwrap();
    // Two thirds of its nine-second life, leaving three seconds for a slow,
    // shared machine to connect before it expires.
    tokio::time::sleep(Duration::from_millis(6100)).await;
    assert!(bundle.renewal_due(time::OffsetDateTime::now_utc().unix_timestamp()));

    let (addr, server) = start(&state);
    let trainer = Box::new(ScriptedTrainer {
        id: 0,
        pause: Duration::ZERO,
    });
    let options = covey_client::ClientOptions {
        identity_path: Some(path.clone()),
        ..options(addr)
    };
    let summary = covey_client::run(&bundle, trainer, options).await.unwrap();
    assert_eq!(summary.updates_accepted, 1);
    assert_eq!(server.await.unwrap().final_version, 1);

    // The saved identity holds a new key and a certificate that outlives the old one.
    let renewed = covey_protocol::identity::IdentityBundle::load(&path).unwrap();
    assert_ne!(renewed.key_pem, bundle.key_pem);
    assert_ne!(renewed.cert_pem, bundle.cert_pem);
    assert!(renewed.not_after_unix.unwrap() > bundle.not_after_unix.unwrap());
    let store = state.open_store().unwrap();
    let events = audit_events(&store);
    assert!(
        events
            .iter()
            .any(|e| matches!(e, AuditEvent::Renewed { .. })),
        "{events:?}"
    );
    let names: Vec<_> = store.enrollments().unwrap();
    assert_eq!(names.len(), 2);
    assert!(names.iter().all(|e| e.name == "brief"));
}
