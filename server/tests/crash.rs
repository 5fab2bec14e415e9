//! SIGKILL the server process in the middle of a round, restart it: the run
//! resumes from the last committed version and finishes, with no version
//! lost, duplicated or half-applied.

mod common;

use std::{
    collections::BTreeSet,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use common::*;
use covey_protocol::ModelVersion;
use covey_server::{operator::status, state::store::RoundOutcome};

/// Kills the child on drop, so a failing test leaves no server behind.
struct ServerProcess(Child);

impl Drop for ServerProcess {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn spawn_server(dir: &std::path::Path) -> ServerProcess {
    ServerProcess(
        Command::new(env!("CARGO_BIN_EXE_covey-server"))
            .args(["run", "--dir"])
            .arg(dir)
            .env("COVEY_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    )
}

fn free_udp_port() -> u16 {
    std::net::UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_server_resumes_from_its_last_commit() {
    let tmp = tempfile::tempdir().unwrap();
    let rounds = 6;
    let mut cfg = config("logreg", rounds, 3);
    let port = free_udp_port();
    cfg.server.listen = format!("127.0.0.1:{port}").parse().unwrap();
    let state = init(tmp.path(), &cfg);
    let bundles = enroll(&state, &["a", "b", "c"]);
    let addr = cfg.server.listen;

    let mut server = spawn_server(tmp.path());
    let clients = spawn_scripted(&bundles, addr, Duration::from_millis(300));

    // Wait until version 2 is committed and the next round is in flight.
    let started = Instant::now();
    loop {
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "the run never reached version 2"
        );
        if let Ok(report) = status::read_snapshot(&state.status_path())
            && report.current_version >= 2
            && report.rounds.iter().any(|r| r.outcome == "in flight")
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    server.0.kill().unwrap();
    server.0.wait().unwrap();

    let mut server = spawn_server(tmp.path());
    let deadline = Instant::now() + Duration::from_secs(180);
    let status = loop {
        if let Some(status) = server.0.try_wait().unwrap() {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "the restarted server never finished"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(status.success(), "restarted server exited with {status}");
    for c in clients {
        assert_eq!(c.await.unwrap().final_version, Some(ModelVersion(rounds)));
    }

    let store = state.open_store().unwrap();
    let versions: Vec<u64> = store.versions().unwrap().into_iter().map(|v| v.0).collect();
    assert_eq!(versions, (0..=rounds).collect::<Vec<_>>());
    let records = store.rounds().unwrap();
    let committed: Vec<u64> = records
        .iter()
        .filter_map(|r| match r.outcome {
            RoundOutcome::Committed { version } => Some(version.0),
            _ => None,
        })
        .collect();
    assert_eq!(
        committed.len() as u64,
        rounds,
        "a version was committed twice: {committed:?}"
    );
    assert_eq!(
        committed.iter().copied().collect::<BTreeSet<_>>(),
        (1..=rounds).collect()
    );
    assert!(
        records.iter().any(|r| r.outcome == RoundOutcome::Abandoned),
        "the killed round should be recorded as abandoned"
    );
    let ids: BTreeSet<u64> = records.iter().map(|r| r.round.0).collect();
    assert_eq!(ids.len(), records.len(), "a round id was reused");
    // Every round's update depends only on its base version, so the final
    // model is exact iff no round was lost, repeated or half-applied.
    let w0 = store.model(ModelVersion(0)).unwrap().weights;
    let last = store.model(ModelVersion(rounds)).unwrap().weights;
    assert_close(&last, &expected_model(&w0, &[0, 1, 2], rounds), 1e-5);
}
