//! The device's path from the README: `covey-client run --identity --data`
//! as real processes against a server on loopback.

use std::{path::PathBuf, process::Command, time::Duration};

use covey_server::{Server, ServerConfig, StateDir};

/// The covey-client binary that `cargo test --workspace` builds beside
/// this test's own executable (client/tests needs it, so it is built).
fn client_bin() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let dir = exe.parent().and_then(|d| d.parent()).unwrap();
    let bin = dir.join("covey-client");
    assert!(
        bin.exists(),
        "{} missing: run `cargo test --workspace`",
        bin.display()
    );
    bin
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_devices_train_with_the_client_binary() {
    let tmp = tempfile::tempdir().unwrap();
    let mut config = ServerConfig::default();
    config.server.listen = "127.0.0.1:0".parse().unwrap();
    config.model.architecture = "logreg".into();
    config.rounds.rounds = 2;
    let state = StateDir::new(tmp.path().join("state"));
    state.init(&config).unwrap();
    let store = state.open_store().unwrap();
    let bundles: Vec<PathBuf> = ["phone", "watch"]
        .iter()
        .map(|name| {
            let bundle = state
                .enroll(&store, name, Duration::from_secs(3600), None)
                .unwrap();
            let path = tmp.path().join(format!("{name}.identity"));
            std::fs::write(&path, bundle.to_toml()).unwrap();
            path
        })
        .collect();
    drop(store);
    let server = Server::open(&state).unwrap();
    let addr = server.local_addr().unwrap().to_string();
    let running = tokio::spawn(server.run());

    let data = concat!(env!("CARGO_MANIFEST_DIR"), "/data/mnist");
    let devices: Vec<_> = bundles
        .iter()
        .map(|identity| {
            let (identity, addr) = (identity.clone(), addr.clone());
            tokio::task::spawn_blocking(move || {
                Command::new(client_bin())
                    .args([
                        "run",
                        "--device",
                        "cpu",
                        "--give-up-after",
                        "60",
                        "--server",
                        &addr,
                    ])
                    .arg("--identity")
                    .arg(identity)
                    .arg("--data")
                    .arg(data)
                    .output()
                    .unwrap()
            })
        })
        .collect();
    let summary = running.await.unwrap().unwrap();
    assert_eq!(summary.final_version, 2);
    for d in devices {
        let out = d.await.unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            stdout.contains("trained 2 rounds, 2 updates accepted, final global version 2"),
            "{stdout}"
        );
    }
}
