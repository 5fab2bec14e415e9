//! A robust aggregator on a real server: an attacker's huge update does not
//! move the coordinate-wise median the honest clients determine.

mod common;

use std::time::Duration;

use common::*;
use covey_protocol::{
    ModelVersion,
    message::{Message, UpdateReceipt},
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_median_ignores_an_attacker_the_mean_would_follow() {
    let tmp = tempfile::tempdir().unwrap();
    let mut cfg = config("logreg", 1, 5);
    cfg.aggregation.aggregator = "median".into();
    let state = init(tmp.path(), &cfg);
    let bundles = enroll(&state, &["h0", "h1", "h2", "h3", "attacker"]);
    let (addr, server) = start(&state);

    let conn = raw_connection(&bundles[4], addr).await;
    let attacker = tokio::spawn(async move {
        let task = selected_task(&conn).await;
        send_update(&conn, &task, &vec![1e6f32; task.spec.param_count()], None).await
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    let honest = spawn_scripted(&bundles[..4], addr, Duration::ZERO);
    assert_eq!(
        attacker.await.unwrap(),
        Message::UpdateReceipt(UpdateReceipt::Accepted)
    );
    assert_eq!(server.await.unwrap().final_version, 1);
    for c in honest {
        c.await.unwrap();
    }

    // Honest deltas are k·1e-3·(id+1) per coordinate (k = (i mod 7) − 3);
    // with +1e6 as the fifth value, the median is the third smallest:
    // 3k·1e-3 where k > 0, 2k·1e-3 where k < 0, 0 where k = 0.
    let store = state.open_store().unwrap();
    let w0 = store.model(ModelVersion(0)).unwrap().weights;
    let w1 = store.model(ModelVersion(1)).unwrap().weights;
    for (i, (a, b)) in w1.iter().zip(&w0).enumerate() {
        let k = (i % 7) as f32 - 3.0;
        let rank = if k > 0.0 { 3.0 } else { 2.0 };
        let expected = k * 1e-3 * rank;
        assert!(
            (a - b - expected).abs() < 1e-6,
            "coordinate {i}: {} vs {expected}",
            a - b
        );
    }
}
