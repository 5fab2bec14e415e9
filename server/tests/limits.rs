//! Limits and metrics on a live server: floods of connections, requests and
//! garbage leave honest clients training, and the Prometheus endpoint shows
//! what happened.

mod common;

use std::{net::SocketAddr, time::Duration};

use common::*;
use covey_protocol::{
    ModelVersion, RoundId, UpdateEncoding,
    frame::FrameLimits,
    io::{read_message, write_message},
    message::{
        CloseCode, LocalMetrics, Message, Payload, RejectReason, UpdateHeader, UpdateReceipt,
    },
};
use covey_server::Server;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// One scrape of `GET /metrics`, as Prometheus would do it.
async fn scrape(addr: SocketAddr) -> String {
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: covey\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    let (head, body) = response.split_once("\r\n\r\n").unwrap();
    assert!(head.starts_with("HTTP/1.1 200"), "scrape answered {head}");
    assert!(head.contains("application/openmetrics-text"), "{head}");
    body.to_owned()
}

/// The value of one series (name with labels, exactly as exported).
fn value(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .map(|v| v.trim().parse().unwrap())
        .unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_metrics_endpoint_shows_rounds_bytes_rejections_and_connections_moving() {
    let tmp = tempfile::tempdir().unwrap();
    let mut config = config("logreg", 3, 2);
    config.metrics.listen = Some("127.0.0.1:0".parse().unwrap());
    let state = init(&tmp.path().join("server"), &config);
    let honest = enroll(&state, &["a", "b"]);
    let odd = enroll(&state, &["odd"]).remove(0);
    let stranger = enroll(&init(&tmp.path().join("other"), &config), &["a"]).remove(0);

    let server = Server::open(&state).unwrap();
    let addr = server.local_addr().unwrap();
    let metrics = server.metrics_addr().expect("metrics endpoint configured");
    let mut commits = server.subscribe();
    let run = tokio::spawn(server.run());

    let before = scrape(metrics).await;
    assert_eq!(
        value(&before, "covey_rounds_total{outcome=\"committed\"}"),
        0.0
    );
    assert_eq!(value(&before, "covey_model_version"), 0.0);
    assert_eq!(value(&before, "covey_epsilon_spent"), 0.0);

    // A certificate from another CA fails the handshake.
    assert!(try_connect(&stranger, addr).await.is_err());
    // An enrolled client announces an update for a round that does not exist.
    let conn = raw_connection(&odd, addr).await;
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    let header = UpdateHeader {
        round: RoundId(99),
        base_version: ModelVersion(0),
        payload: Payload::Floats(UpdateEncoding::F32),
        param_count: 7850,
        num_examples: 1,
        metrics: LocalMetrics::default(),
        within_clip: None,
    };
    write_message(&mut send, &Message::Update(header))
        .await
        .unwrap();
    let receipt = read_message(&mut recv, FrameLimits::default())
        .await
        .unwrap();
    assert!(matches!(
        receipt,
        Message::UpdateReceipt(UpdateReceipt::Rejected(RejectReason::WrongRound))
    ));

    let clients = spawn_scripted(&honest, addr, Duration::from_millis(200));
    commits.recv().await.unwrap();
    let during = scrape(metrics).await;
    commits.recv().await.unwrap();
    let later = scrape(metrics).await;
    conn.close(0u32.into(), b"bye");
    let summary = run.await.unwrap().unwrap();
    for c in clients {
        c.await.unwrap();
    }

    let committed = "covey_rounds_total{outcome=\"committed\"}";
    assert!(value(&during, committed) >= 1.0, "{during}");
    assert!(
        value(&later, committed) > value(&during, committed),
        "the round counter did not move:\n{later}"
    );
    assert!(value(&later, "covey_model_version") >= 2.0);
    assert!(value(&later, "covey_updates_accepted_total") >= 4.0);
    assert_eq!(value(&later, "covey_round_participants"), 2.0);
    assert_eq!(value(&later, "covey_round_selected"), 2.0);
    let received = "covey_received_bytes_total";
    assert!(value(&during, received) > 0.0);
    assert!(value(&later, received) > value(&during, received));
    // Round 2's downloads may land before or after the first scrape; round
    // 2's uploads always land between the two.
    let sent = "covey_sent_bytes_total";
    assert_eq!(value(&before, sent), 0.0);
    assert!(value(&during, sent) > 0.0);
    assert!(value(&later, sent) >= value(&during, sent));
    assert!(value(&later, "covey_phase_seconds_count{phase=\"collect\"}") >= 2.0);
    assert!(value(&later, "covey_phase_seconds_count{phase=\"commit\"}") >= 2.0);
    assert_eq!(
        value(
            &later,
            "covey_updates_rejected_total{reason=\"wrong round\"}"
        ),
        1.0
    );
    assert!(
        value(
            &later,
            "covey_connections_refused_total{reason=\"handshake failed\"}"
        ) >= 1.0
    );
    // Two trainers and the odd client are connected mid-run.
    assert!(value(&during, "covey_connections_open") >= 3.0, "{during}");
    assert!(value(&later, "covey_connections_accepted_total") >= 3.0);
    // The endpoint agrees with the run's own bookkeeping.
    assert!(summary.bytes_up as f64 >= value(&later, received));
    // Nothing names a client.
    for name in ["\"a\"", "\"b\"", "odd", "127.0.0.1"] {
        assert!(!later.contains(name), "metrics mention {name}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn floods_of_connections_requests_and_garbage_do_not_starve_honest_clients() {
    let tmp = tempfile::tempdir().unwrap();
    // Long enough (12 rounds of 300 ms) for every flood to overlap the run.
    let mut config = config("logreg", 12, 2);
    config.server.max_connections = 12;
    config.server.max_connections_per_client = 2;
    config.server.client_requests_per_sec = 5.0;
    config.server.client_request_burst = 10;
    config.metrics.listen = Some("127.0.0.1:0".parse().unwrap());
    let state = init(&tmp.path().join("server"), &config);
    let honest = enroll(&state, &["a", "b"]);
    let greedy = enroll(&state, &["greedy"]).remove(0);
    let stranger = enroll(&init(&tmp.path().join("other"), &config), &["x"]).remove(0);

    let server = Server::open(&state).unwrap();
    let addr = server.local_addr().unwrap();
    let metrics = server.metrics_addr().unwrap();
    let run = tokio::spawn(server.run());
    let clients = spawn_scripted(&honest, addr, Duration::from_millis(300));

    // Garbage datagrams: quinn drops them without state.
    let socket = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    for i in 0..2000u32 {
        let junk: Vec<u8> = (0..1200).map(|j| (i ^ j) as u8).collect();
        let _ = socket.send_to(&junk, addr).await;
    }
    // An enrolled client holds more connections than it may...
    let mut held = Vec::new();
    for _ in 0..4 {
        held.push(try_connect(&greedy, addr).await.unwrap());
    }
    // The server refuses right after the handshake; allow a loaded machine
    // time to get there, then check nothing else was refused.
    let closed =
        |held: &[quinn::Connection]| held.iter().filter(|c| c.close_reason().is_some()).count();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while closed(&held) < 2 && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut busy = 0;
    for conn in &held {
        if let Some(quinn::ConnectionError::ApplicationClosed(c)) = conn.close_reason() {
            assert_eq!(c.error_code.into_inner(), CloseCode::Busy as u64, "{c:?}");
            busy += 1;
        }
    }
    assert_eq!(busy, 2, "two of four connections should be refused");
    // ...and floods the server with requests on a connection of its own.
    drop(held);
    tokio::time::sleep(Duration::from_millis(100)).await;
    let flooded = raw_connection(&greedy, addr).await;
    for _ in 0..40 {
        match flooded.open_bi().await {
            Ok((mut send, _recv)) => {
                // A harmless request: a report for no evaluation.
                let report = Message::EvalReport(covey_protocol::message::EvalReport {
                    id: 0,
                    examples: 0,
                    results: Vec::new(),
                });
                let _ = write_message(&mut send, &report).await;
                let _ = send.finish();
            }
            Err(_) => break,
        }
    }
    let (code, reason) = close_of(&flooded).await;
    assert_eq!(code, CloseCode::Busy as u64);
    assert!(reason.contains("rate limit"), "{reason}");
    // A stranger's connection storm, 60 handshakes at once.
    let storm: Vec<_> = (0..60)
        .map(|_| {
            let stranger = stranger.clone();
            tokio::spawn(async move {
                let attempt = try_connect(&stranger, addr);
                let _ = tokio::time::timeout(Duration::from_secs(10), attempt).await;
            })
        })
        .collect();
    for s in storm {
        s.await.unwrap();
    }

    // The server may still be turning the storm's last handshakes away when
    // the clients give up on them: read the counters until they settle.
    let storm_refused = |scraped: &str| {
        value(
            scraped,
            "covey_connections_refused_total{reason=\"server full\"}",
        ) + value(
            scraped,
            "covey_connections_refused_total{reason=\"handshake failed\"}",
        )
    };
    let mut scraped = scrape(metrics).await;
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while storm_refused(&scraped) < 60.0 && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(200)).await;
        // The run may end meanwhile, and its endpoint with it.
        if tokio::net::TcpStream::connect(metrics).await.is_err() {
            break;
        }
        scraped = scrape(metrics).await;
    }
    let summary = run.await.unwrap().unwrap();
    assert_eq!(summary.final_version, 12, "the honest run did not finish");
    for c in clients {
        assert_eq!(c.await.unwrap().final_version, Some(ModelVersion(12)));
    }
    assert!(
        value(
            &scraped,
            "covey_connections_refused_total{reason=\"too many connections from one client\"}"
        ) >= 2.0,
        "{scraped}"
    );
    assert!(
        value(
            &scraped,
            "covey_connections_refused_total{reason=\"client over its rate limit\"}"
        ) >= 1.0
    );
    // The storm met the connection cap or address validation.
    assert!(storm_refused(&scraped) >= 60.0, "{scraped}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_upload_cannot_hold_the_only_upload_slot() {
    let tmp = tempfile::tempdir().unwrap();
    let mut config = config("logreg", 1, 3);
    config.rounds.quorum = 2;
    config.server.max_concurrent_uploads = 1;
    config.server.transfer_timeout_secs = 1.0;
    let state = init(tmp.path(), &config);
    let bundles = enroll(&state, &["a", "b", "staller"]);
    let (addr, server) = start(&state);
    let staller = raw_connection(&bundles[2], addr).await;
    let honest = spawn_scripted(&bundles[..2], addr, Duration::from_millis(300));
    // Takes the only upload slot, then sends nothing.
    let task = selected_task(&staller).await;
    let (mut send, mut recv) = staller.open_bi().await.unwrap();
    let header = UpdateHeader {
        round: task.round,
        base_version: task.base_version,
        payload: Payload::Floats(UpdateEncoding::F32),
        param_count: task.spec.param_count() as u64,
        num_examples: 1,
        metrics: LocalMetrics::default(),
        within_clip: None,
    };
    write_message(&mut send, &Message::Update(header))
        .await
        .unwrap();
    assert_eq!(
        read_message(&mut recv, FrameLimits::default())
            .await
            .unwrap(),
        Message::SendUpdate
    );
    let (code, reason) = close_of(&staller).await;
    assert_eq!(code, CloseCode::ProtocolViolation as u64);
    assert!(reason.contains("update not sent within 1s"), "{reason}");

    let summary = server.await.unwrap();
    assert_eq!(summary.final_version, 1);
    for c in honest {
        assert_eq!(c.await.unwrap().updates_accepted, 1);
    }
    let round = &state.open_store().unwrap().rounds().unwrap()[0];
    assert_eq!((round.accepted, round.dropped), (2, 1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_that_stops_reading_its_model_is_cut_off() {
    let tmp = tempfile::tempdir().unwrap();
    // The CNN (6.65 MB) is larger than what flow control lets the server
    // push into a device that does not read.
    let mut config = config("cnn", 1, 1);
    config.server.transfer_timeout_secs = 1.0;
    let state = init(tmp.path(), &config);
    let bundle = enroll(&state, &["reader"]).remove(0);
    let (addr, server) = start(&state);
    let conn = raw_connection(&bundle, addr).await;
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    write_message(&mut send, &Message::CheckIn).await.unwrap();
    send.finish().unwrap();
    let first = read_message(&mut recv, FrameLimits::default())
        .await
        .unwrap();
    assert!(matches!(first, Message::Task(_)), "got {}", first.kind());
    // ...and reads no further.
    let (code, reason) = close_of(&conn).await;
    assert_eq!(code, CloseCode::ProtocolViolation as u64);
    assert!(reason.contains("model not received within 1s"), "{reason}");
    server.abort();
}
