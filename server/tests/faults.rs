//! Malformed, oversized and wrong-shaped input closes only the sender's
//! connection, with a reason, while the round completes with the others.

mod common;

use std::time::Duration;

use common::*;
use covey_protocol::{
    UpdateEncoding,
    frame::FrameLimits,
    io::{read_message, write_message},
    message::{CloseCode, LocalMetrics, Message, Payload, UpdateHeader},
    tensor::ChunkPlan,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_frames_and_bad_shapes_lose_only_their_sender() {
    let tmp = tempfile::tempdir().unwrap();
    // One round: once the bad client is gone, a second would wait for a
    // third check-in forever (min_clients = 3), as it should.
    let mut cfg = config("logreg", 1, 3);
    cfg.rounds.quorum = 2;
    cfg.server.max_frame_bytes = 1 << 20;
    cfg.training.chunk_len = 4096;
    let state = init(tmp.path(), &cfg);
    let bundles = enroll(&state, &["a", "b", "shape", "garbage", "huge"]);
    let (addr, server) = start(&state);

    // Malformed: a message frame whose body is not a message.
    let garbage = raw_connection(&bundles[3], addr).await;
    let (mut send, _recv) = garbage.open_bi().await.unwrap();
    send.write_all(&[4, 0, 0, 0, 1, 0xff, 0xff, 0xff])
        .await
        .unwrap();
    let (code, reason) = close_of(&garbage).await;
    assert_eq!(code, CloseCode::MalformedFrame as u64);
    assert!(reason.contains("undecodable message"), "{reason}");

    // Oversized: a header announcing 64 MiB against a 1 MiB limit.
    let huge = raw_connection(&bundles[4], addr).await;
    let (mut send, _recv) = huge.open_bi().await.unwrap();
    send.write_all(&[0, 0, 0, 4, 1]).await.unwrap();
    let (code, reason) = close_of(&huge).await;
    assert_eq!(code, CloseCode::FrameTooLarge as u64);
    assert_eq!(
        reason,
        "frame of 67108864 bytes exceeds the 1048576 byte limit"
    );

    // Wrong shape: checks in, gets selected, announces the wrong size.
    let shape = raw_connection(&bundles[2], addr).await;
    let wrong_shape = tokio::spawn(async move {
        let task = selected_task(&shape).await;
        let (mut send, _recv) = shape.open_bi().await.unwrap();
        let header = UpdateHeader {
            round: task.round,
            base_version: task.base_version,
            payload: Payload::Floats(task.update_encoding),
            param_count: 10,
            num_examples: 5,
            metrics: LocalMetrics::default(),
            within_clip: None,
        };
        write_message(&mut send, &Message::Update(header))
            .await
            .unwrap();
        close_of(&shape).await
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    let honest = spawn_scripted(&bundles[..2], addr, Duration::from_millis(50));

    let (code, reason) = wrong_shape.await.unwrap();
    assert_eq!(code, CloseCode::ShapeMismatch as u64);
    assert!(reason.contains("does not match the task"), "{reason}");

    let summary = server.await.unwrap();
    assert_eq!(summary.final_version, 1);
    for c in honest {
        assert_eq!(c.await.unwrap().updates_accepted, 1);
    }
    let store = state.open_store().unwrap();
    let first = &store.rounds().unwrap()[0];
    assert_eq!((first.selected, first.accepted, first.dropped), (3, 2, 1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nan_update_is_rejected_with_a_reason_and_never_aggregated() {
    let tmp = tempfile::tempdir().unwrap();
    let mut cfg = config("logreg", 1, 2);
    cfg.rounds.quorum = 1;
    let state = init(tmp.path(), &cfg);
    let bundles = enroll(&state, &["a", "nan"]);
    let (addr, server) = start(&state);
    let conn = raw_connection(&bundles[1], addr).await;
    let bad = tokio::spawn(async move {
        let task = selected_task(&conn).await;
        let n = task.spec.param_count();
        let plan = ChunkPlan::new(n, task.chunk_len);
        let (mut send, mut recv) = conn.open_bi().await.unwrap();
        let header = UpdateHeader {
            round: task.round,
            base_version: task.base_version,
            payload: Payload::Floats(UpdateEncoding::F32),
            param_count: n as u64,
            num_examples: 1_000_000,
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
        let mut values = vec![0.0f32; n];
        values[5] = f32::NAN;
        let mut rng = <rand_chacha::ChaCha8Rng as rand::SeedableRng>::seed_from_u64(0);
        let _ = covey_protocol::io::write_tensor(
            &mut send,
            &values,
            plan,
            UpdateEncoding::F32,
            &mut rng,
        )
        .await;
        read_message(&mut recv, FrameLimits::default())
            .await
            .unwrap()
    });
    let honest = spawn_scripted(&bundles[..1], addr, std::time::Duration::from_millis(200));
    let receipt = bad.await.unwrap();
    assert_eq!(
        receipt,
        Message::UpdateReceipt(covey_protocol::message::UpdateReceipt::Rejected(
            covey_protocol::message::RejectReason::NonFinite
        ))
    );
    assert_eq!(server.await.unwrap().final_version, 1);
    honest.into_iter().next().unwrap().await.unwrap();
    let store = state.open_store().unwrap();
    let w0 = store
        .model(covey_protocol::ModelVersion(0))
        .unwrap()
        .weights;
    let w1 = store
        .model(covey_protocol::ModelVersion(1))
        .unwrap()
        .weights;
    assert_close(&w1, &expected_model(&w0, &[0], 1), 1e-6);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_central_dp_unclipped_and_unlabelled_updates_are_refused() {
    use covey_protocol::message::{RejectReason, UpdatePrivacy, UpdateReceipt};
    let tmp = tempfile::tempdir().unwrap();
    let mut cfg = config("logreg", 1, 3);
    cfg.rounds.quorum = 1;
    cfg.privacy.mode = "central".into();
    cfg.privacy.population = 3;
    cfg.privacy.clip = 1.0;
    cfg.privacy.noise_multiplier = 1.0;
    let state = init(tmp.path(), &cfg);
    let bundles = enroll(&state, &["honest", "unclipped", "unlabelled"]);
    let (addr, server) = start(&state);

    let mut cheats = Vec::new();
    for (bundle, within_clip) in [(&bundles[1], Some(false)), (&bundles[2], None)] {
        let conn = raw_connection(bundle, addr).await;
        cheats.push(tokio::spawn(async move {
            let task = selected_task(&conn).await;
            let clip = match task.privacy {
                UpdatePrivacy::Clipped { clip } => clip.get(),
                other => panic!("central DP tasks must ask for clipping, got {other:?}"),
            };
            assert_eq!(clip, 1.0);
            // Norm 2: twice the clip.
            let mut values = vec![0.0f32; task.spec.param_count()];
            values[0] = 2.0;
            send_update(&conn, &task, &values, within_clip).await
        }));
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let honest = spawn_scripted(&bundles[..1], addr, Duration::from_millis(200));
    let reject = |r| Message::UpdateReceipt(UpdateReceipt::Rejected(r));
    assert_eq!(
        cheats.remove(0).await.unwrap(),
        reject(RejectReason::ClipExceeded)
    );
    assert_eq!(
        cheats.remove(0).await.unwrap(),
        reject(RejectReason::PrivacyMismatch)
    );
    let summary = server.await.unwrap();
    assert_eq!(summary.final_version, 1);
    assert!(summary.epsilon.unwrap() > 0.0);
    assert_eq!(
        honest
            .into_iter()
            .next()
            .unwrap()
            .await
            .unwrap()
            .updates_accepted,
        1
    );
    let store = state.open_store().unwrap();
    let round = &store.rounds().unwrap()[0];
    assert_eq!((round.selected, round.accepted, round.dropped), (3, 1, 2));
    let counted: Vec<(&str, u32)> = round
        .rejected
        .iter()
        .map(|(k, v)| (k.as_str(), *v))
        .collect();
    assert_eq!(
        counted,
        vec![("norm above clip", 1), ("privacy settings ignored", 1)]
    );
    assert_eq!(summary.rejected.values().sum::<u64>(), 2);
    assert_eq!(round.clip, Some(1.0));
    assert_eq!(round.epsilon, summary.epsilon);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_distributed_dp_an_unnoised_update_is_refused() {
    use covey_protocol::message::{RejectReason, UpdatePrivacy, UpdateReceipt};
    let tmp = tempfile::tempdir().unwrap();
    let mut cfg = config("logreg", 1, 2);
    cfg.rounds.quorum = 1;
    cfg.privacy.mode = "distributed".into();
    cfg.privacy.population = 2;
    let state = init(tmp.path(), &cfg);
    let bundles = enroll(&state, &["honest", "plain"]);
    let (addr, server) = start(&state);
    let conn = raw_connection(&bundles[1], addr).await;
    let cheat = tokio::spawn(async move {
        let task = selected_task(&conn).await;
        assert!(matches!(task.privacy, UpdatePrivacy::Distributed { .. }));
        let values = vec![0.0f32; task.spec.param_count()];
        send_update(&conn, &task, &values, None).await
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    let honest = spawn_scripted(&bundles[..1], addr, Duration::from_millis(200));
    assert_eq!(
        cheat.await.unwrap(),
        Message::UpdateReceipt(UpdateReceipt::Rejected(RejectReason::PrivacyMismatch))
    );
    let summary = server.await.unwrap();
    assert_eq!(summary.final_version, 1);
    assert_eq!(
        honest
            .into_iter()
            .next()
            .unwrap()
            .await
            .unwrap()
            .updates_accepted,
        1
    );
}

/// A UDP relay between one client and the server that black-holes all
/// traffic for `cut_for`, once `cut_after` bytes went towards the server:
/// a network that fails in the middle of an upload.
async fn flaky_relay(
    server: std::net::SocketAddr,
    cut_after: u64,
    cut_for: Duration,
) -> std::net::SocketAddr {
    use std::sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    };
    use tokio::net::UdpSocket;
    let front = Arc::new(UdpSocket::bind("127.0.0.1:0").await.unwrap());
    let addr = front.local_addr().unwrap();
    let upstream_bytes = Arc::new(AtomicU64::new(0));
    let cut: Arc<Mutex<Option<tokio::time::Instant>>> = Arc::new(Mutex::new(None));
    let is_cut = {
        let cut = cut.clone();
        move || {
            cut.lock()
                .unwrap()
                .is_some_and(|from| from.elapsed() < cut_for)
        }
    };
    tokio::spawn(async move {
        let mut upstreams: std::collections::HashMap<std::net::SocketAddr, Arc<UdpSocket>> =
            Default::default();
        let mut buf = vec![0u8; 65536];
        loop {
            let Ok((n, from)) = front.recv_from(&mut buf).await else {
                return;
            };
            let upstream = match upstreams.get(&from) {
                Some(u) => u.clone(),
                None => {
                    let u = Arc::new(UdpSocket::bind("127.0.0.1:0").await.unwrap());
                    u.connect(server).await.unwrap();
                    upstreams.insert(from, u.clone());
                    let (front, u2, is_cut) = (front.clone(), u.clone(), is_cut.clone());
                    tokio::spawn(async move {
                        let mut buf = vec![0u8; 65536];
                        while let Ok(n) = u2.recv(&mut buf).await {
                            if !is_cut() {
                                let _ = front.send_to(&buf[..n], from).await;
                            }
                        }
                    });
                    u
                }
            };
            let total = upstream_bytes.fetch_add(n as u64, Ordering::Relaxed) + n as u64;
            if total > cut_after {
                cut.lock()
                    .unwrap()
                    .get_or_insert_with(tokio::time::Instant::now);
            }
            if !is_cut() {
                let _ = upstream.send(&buf[..n]).await;
            }
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_cut_off_mid_upload_reconnects_and_the_round_completes() {
    let tmp = tempfile::tempdir().unwrap();
    // Every member is needed: the round can only commit if the cut-off
    // update arrives after all.
    let mut config = config("2nn", 2, 3);
    config.server.idle_timeout_secs = 2;
    config.server.keep_alive_secs = 1;
    config.rounds.rejoin_grace_secs = 20.0;
    let state = init(tmp.path(), &config);
    let bundles = enroll(&state, &["a", "b", "c"]);
    let (addr, server) = start(&state);
    // The 2NN update is 797 kB; the handshake, check-in and acknowledgements
    // of the model download send far less than 200 kB towards the server.
    let relay = flaky_relay(addr, 200_000, Duration::from_secs(4)).await;
    let clients = spawn_scripted(&bundles[..2], addr, Duration::ZERO);
    let cut_off = {
        let bundle = bundles[2].clone();
        tokio::spawn(async move {
            let trainer = Box::new(ScriptedTrainer {
                id: 2,
                pause: Duration::ZERO,
            });
            covey_client::run(&bundle, trainer, options(relay))
                .await
                .unwrap()
        })
    };
    let summary = server.await.unwrap();
    assert_eq!(summary.final_version, 2);
    assert_eq!(summary.rounds_aborted, 0);
    let cut_off = cut_off.await.unwrap();
    assert!(cut_off.connections >= 2, "the relay never cut the link");
    assert_eq!(cut_off.updates_accepted, 2);
    for c in clients {
        assert_eq!(c.await.unwrap().updates_accepted, 2);
    }
    let rounds = state.open_store().unwrap().rounds().unwrap();
    assert!(rounds.iter().all(|r| r.accepted == 3), "{rounds:?}");
    // An interruption is not the client's fault: nothing was rejected.
    assert!(summary.rejected.is_empty(), "{:?}", summary.rejected);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_killed_mid_upload_is_dropped_after_the_grace_and_the_round_completes() {
    let tmp = tempfile::tempdir().unwrap();
    let mut config = config("2nn", 1, 3);
    config.rounds.quorum = 2;
    config.server.idle_timeout_secs = 2;
    config.server.keep_alive_secs = 1;
    config.rounds.rejoin_grace_secs = 1.0;
    let state = init(tmp.path(), &config);
    let bundles = enroll(&state, &["a", "b", "killed"]);
    let (addr, server) = start(&state);
    // Its link goes silent mid-upload and never comes back, as when the
    // device loses power: no close, no reset.
    let relay = flaky_relay(addr, 200_000, Duration::from_secs(3600)).await;
    let killed = {
        let bundle = bundles[2].clone();
        tokio::spawn(async move {
            let trainer = Box::new(ScriptedTrainer {
                id: 2,
                pause: Duration::ZERO,
            });
            covey_client::run(&bundle, trainer, options(relay)).await
        })
    };
    let clients = spawn_scripted(&bundles[..2], addr, Duration::from_millis(300));
    let summary = server.await.unwrap();
    killed.abort();
    assert_eq!(summary.final_version, 1);
    for c in clients {
        assert_eq!(c.await.unwrap().updates_accepted, 1);
    }
    let round = &state.open_store().unwrap().rounds().unwrap()[0];
    assert_eq!((round.selected, round.accepted, round.dropped), (3, 2, 1));
    // Losing a device is not a rejection.
    assert!(summary.rejected.is_empty(), "{:?}", summary.rejected);
}
