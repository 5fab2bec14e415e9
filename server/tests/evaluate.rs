//! Federated evaluation on a live run: clients evaluate versions on their
//! own held-out data; the operator sees only example-weighted means.

mod common;

use std::{process::Command, time::Duration};

use common::*;
use covey_protocol::ModelVersion;
use covey_server::{Server, operator::control::EvalOutcome};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn evaluate(dir: &std::path::Path, versions: &str) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_covey-server"))
        .args([
            "evaluate",
            "--json",
            "--timeout",
            "20",
            "--versions",
            versions,
            "--dir",
        ])
        .arg(dir)
        .output()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_clients_evaluate_and_the_server_weights_by_examples() {
    let tmp = tempfile::tempdir().unwrap();
    let mut cfg = config("logreg", 1, 3);
    // Four check-ins are needed to start a round, so three clients stay idle.
    cfg.rounds.min_clients = 4;
    let state = init(tmp.path(), &cfg);
    let bundles = enroll(&state, &["a", "b", "c"]);
    let out = evaluate(tmp.path(), "0");
    assert!(String::from_utf8_lossy(&out.stderr).contains("needs a running server"));

    let server = Server::open(&state).unwrap();
    let addr = server.local_addr().unwrap();
    let stopper = server.stopper();
    let running = tokio::spawn(server.run());
    let clients = spawn_scripted(&bundles, addr, Duration::ZERO);
    // Until all three clients have checked in, fewer are idle to ask.
    let mut found: Option<EvalOutcome> = None;
    for _ in 0..60 {
        let dir = tmp.path().to_path_buf();
        let out = tokio::task::spawn_blocking(move || evaluate(&dir, "0"))
            .await
            .unwrap();
        if out.status.success() {
            let o: EvalOutcome = serde_json::from_slice(&out.stdout).unwrap();
            if o.asked == 3 {
                found = Some(o);
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let outcome = found.expect("three idle clients were never asked");
    assert_eq!(
        (outcome.asked, outcome.answered, outcome.clients_with_data),
        (3, 3, 3)
    );
    assert_eq!(outcome.examples, 30);
    // Reads of the stored model happen only after the server stops; use
    // the initial weights from a fresh spec with the same seed.
    let w0 = cfg
        .settings()
        .unwrap()
        .spec
        .initial_weights(cfg.model.init_seed)[0];
    let expected_loss =
        (5.0 * (0.0 + w0 as f64) + 10.0 * (1.0 + w0 as f64) + 15.0 * (2.0 + w0 as f64)) / 30.0;
    let v = &outcome.versions[0];
    assert_eq!(v.version, 0);
    assert!((v.accuracy - 7.0 / 30.0).abs() < 1e-6, "{}", v.accuracy);
    assert!(
        (v.loss - expected_loss).abs() < 1e-5,
        "{} vs {expected_loss}",
        v.loss
    );

    // The dashboard charts it against the version.
    let url = std::fs::read_to_string(tmp.path().join("dashboard.url")).unwrap();
    let web = url
        .trim()
        .trim_start_matches("http://")
        .trim_end_matches('/')
        .to_owned();
    let mut stream = tokio::net::TcpStream::connect(&web).await.unwrap();
    let request = format!("GET /api/state HTTP/1.1\r\nHost: {web}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut reply = String::new();
    stream.read_to_string(&mut reply).await.unwrap();
    let body = reply.split_once("\r\n\r\n").unwrap().1;
    let view: serde_json::Value = serde_json::from_str(body).unwrap();
    let charted = &view["live"]["federated_evaluations"][0]["versions"][0];
    assert_eq!(charted["version"], 0);
    assert!((charted["accuracy"].as_f64().unwrap() - 7.0 / 30.0).abs() < 1e-6);

    let dir = tmp.path().to_path_buf();
    let out = tokio::task::spawn_blocking(move || evaluate(&dir, "9"))
        .await
        .unwrap();
    let outcome: EvalOutcome = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        outcome.error.as_deref(),
        Some("model version 9 is not stored")
    );

    stopper.stop().await;
    let summary = running.await.unwrap().unwrap();
    assert_eq!(summary.final_version, 0);
    for c in clients {
        assert_eq!(c.await.unwrap().final_version, Some(ModelVersion(0)));
    }
}
