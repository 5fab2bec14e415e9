//! Mutual TLS is the only way in, and incompatible peers are refused clearly.

mod common;

use std::{sync::Arc, time::Duration};

use common::*;
use covey_client::{ClientOptions, SessionError};
use covey_protocol::{ALPN, ModelVersion};

/// A client config that offers no certificate at all.
fn anonymous_config(ca_pem: &str) -> quinn::ClientConfig {
    use rustls::pki_types::{CertificateDer, pem::PemObject};
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_slice(ca_pem.as_bytes()).unwrap())
        .unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    tls.alpn_protocols = vec![ALPN.to_vec()];
    quinn::ClientConfig::new(Arc::new(
        quinn::crypto::rustls::QuicClientConfig::try_from(tls).unwrap(),
    ))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strangers_revoked_forgotten_expired_and_anonymous_clients_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let state = init(&tmp.path().join("server"), &config("logreg", 2, 2));
    let honest = enroll(&state, &["a", "b"]);
    let revoked = enroll(&state, &["gone"]).remove(0);
    let forgotten = enroll(&state, &["erased"]).remove(0);
    let expired = {
        let store = state.open_store().unwrap();
        state.revoke(&store, "gone").unwrap();
        state.forget(&store, "erased").unwrap();
        assert!(state.forget(&store, "erased").is_err());
        state
            .enroll(&store, "short", Duration::from_secs(1), None)
            .unwrap()
    };
    // Let the short-lived certificate lapse; the device then re-enrolls
    // under the same name and the same CA.
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let reenrolled = state
        .enroll(
            &state.open_store().unwrap(),
            "short",
            Duration::from_secs(3600),
            None,
        )
        .unwrap();
    // Same software, other CA.
    let other = init(&tmp.path().join("other"), &config("logreg", 2, 2));
    let stranger = enroll(&other, &["a"]).remove(0);

    let (addr, server) = start(&state);

    for bundle in [stranger, revoked, forgotten, expired] {
        let trainer = Box::new(ScriptedTrainer {
            id: 9,
            pause: Duration::ZERO,
        });
        let err = covey_client::run(&bundle, trainer, options(addr))
            .await
            .unwrap_err();
        assert!(
            matches!(err, SessionError::Refused(_)),
            "expected a refusal, got {err}"
        );
        assert!(
            err.to_string()
                .contains("refused this client at the TLS handshake")
        );
    }

    let mut endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    endpoint.set_default_client_config(anonymous_config(&state.ca_cert_pem().unwrap()));
    let outcome = async {
        let conn = endpoint
            .connect(addr, covey_protocol::SERVER_NAME)
            .unwrap()
            .await?;
        let (_send, mut recv) = conn.open_bi().await?;
        let mut buf = [0u8; 1];
        recv.read(&mut buf).await.map_err(|e| match e {
            quinn::ReadError::ConnectionLost(c) => c,
            other => panic!("unexpected {other}"),
        })?;
        Ok::<_, quinn::ConnectionError>(())
    }
    .await;
    let err = outcome.expect_err("an anonymous client got in");
    assert!(
        err.to_string().contains("certificate"),
        "anonymous refusal: {err}"
    );

    let conn = raw_connection(&reenrolled, addr).await;
    assert!(
        conn.close_reason().is_none(),
        "the re-enrolled device was refused"
    );
    conn.close(0u32.into(), b"bye");

    // The refusals cost the enrolled clients nothing.
    let clients = spawn_scripted(&honest, addr, Duration::from_millis(100));
    assert_eq!(server.await.unwrap().final_version, 2);
    for c in clients {
        assert_eq!(c.await.unwrap().final_version, Some(ModelVersion(2)));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_incompatible_protocol_version_is_refused_on_both_sides() {
    let tmp = tempfile::tempdir().unwrap();
    let state = init(tmp.path(), &config("logreg", 1, 1));
    let bundles = enroll(&state, &["new", "ok"]);
    let (addr, server) = start(&state);
    let options = ClientOptions {
        protocol_version: 99,
        ..options(addr)
    };
    let trainer = Box::new(ScriptedTrainer {
        id: 0,
        pause: Duration::ZERO,
    });
    let err = covey_client::run(&bundles[0], trainer, options)
        .await
        .unwrap_err();
    match err {
        SessionError::Incompatible(detail) => {
            assert!(
                detail.contains(&format!(
                    "server speaks version {}, the client version 99",
                    covey_protocol::PROTOCOL_VERSION
                )),
                "{detail}"
            );
        }
        other => panic!("expected Incompatible, got {other}"),
    }
    // The server keeps serving compatible clients.
    let ok = spawn_scripted(&bundles[1..], addr, Duration::ZERO);
    assert_eq!(server.await.unwrap().final_version, 1);
    ok.into_iter().next().unwrap().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoking_a_connected_client_on_a_live_server_closes_it_and_bars_it() {
    let tmp = tempfile::tempdir().unwrap();
    let state = init(tmp.path(), &config("logreg", 1, 2));
    let mut bundles = enroll(&state, &["a", "b", "victim"]);
    let victim = bundles.pop().unwrap();
    let (addr, server) = start(&state);
    let conn = raw_connection(&victim, addr).await;

    // The server holds the database, so the CLI hands it the request.
    let dir = tmp.path().to_path_buf();
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new(env!("CARGO_BIN_EXE_covey-server"))
            .args(["revoke", "--name", "victim", "--dir"])
            .arg(dir)
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        String::from_utf8_lossy(&out.stdout)
            .contains("the running server applied the revocation of 'victim'")
    );

    // status works while the server holds the database: from its snapshot.
    let dir = tmp.path().to_path_buf();
    let status = tokio::task::spawn_blocking(move || {
        std::process::Command::new(env!("CARGO_BIN_EXE_covey-server"))
            .args(["status", "--json", "--dir"])
            .arg(dir)
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert!(
        status.status.success(),
        "{}",
        String::from_utf8_lossy(&status.stderr)
    );
    assert!(String::from_utf8_lossy(&status.stderr).contains("the server is running"));
    let report: serde_json::Value = serde_json::from_slice(&status.stdout).unwrap();
    assert_eq!(report["current_version"], 0);
    assert_eq!(report["clients"].as_array().unwrap().len(), 3);

    let (code, reason) = close_of(&conn).await;
    assert_eq!(code, covey_protocol::message::CloseCode::Revoked as u64);
    assert_eq!(reason, "enrollment revoked");
    let trainer = Box::new(ScriptedTrainer {
        id: 9,
        pause: Duration::ZERO,
    });
    let err = covey_client::run(&victim, trainer, options(addr))
        .await
        .unwrap_err();
    assert!(matches!(err, SessionError::Refused(_)), "{err}");

    let clients = spawn_scripted(&bundles, addr, Duration::ZERO);
    assert_eq!(server.await.unwrap().final_version, 1);
    for c in clients {
        c.await.unwrap();
    }
    let store = state.open_store().unwrap();
    let victim_state = store
        .enrollments()
        .unwrap()
        .into_iter()
        .find(|e| e.name == "victim")
        .unwrap();
    assert!(victim_state.revoked_unix.is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_enrolled_on_a_live_server_joins_the_run() {
    let tmp = tempfile::tempdir().unwrap();
    let state = init(tmp.path(), &config("logreg", 1, 2));
    let first = enroll(&state, &["first"]);
    let (addr, server) = start(&state);
    let clients = spawn_scripted(&first, addr, Duration::ZERO);

    let dir = tmp.path().to_path_buf();
    let cli = move |name: &str, out: &str| {
        let (dir, name, out) = (dir.clone(), name.to_owned(), out.to_owned());
        tokio::task::spawn_blocking(move || {
            std::process::Command::new(env!("CARGO_BIN_EXE_covey-server"))
                .args(["enroll", "--name", &name, "--out", &out, "--dir"])
                .arg(dir)
                .output()
                .unwrap()
        })
    };
    let path = tmp.path().join("late.identity");
    let out = cli("late", path.to_str().unwrap()).await.unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let dup = cli("first", tmp.path().join("dup").to_str().unwrap())
        .await
        .unwrap();
    assert!(!dup.status.success());
    assert!(
        String::from_utf8_lossy(&dup.stderr).contains("a client named 'first' is already enrolled")
    );
    assert!(
        !tmp.path().join("dup").exists(),
        "a refused enrollment wrote a bundle"
    );

    let late = covey_protocol::identity::IdentityBundle::load(&path).unwrap();
    let trainer = Box::new(ScriptedTrainer {
        id: 1,
        pause: Duration::ZERO,
    });
    let summary = covey_client::run(&late, trainer, options(addr))
        .await
        .unwrap();
    assert_eq!(summary.updates_accepted, 1);
    assert_eq!(server.await.unwrap().final_version, 1);
    for c in clients {
        c.await.unwrap();
    }
}

/// A client that requires secure aggregation refuses a server that asks
/// for plain updates, before it trains or sends anything.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_requiring_secure_aggregation_refuses_a_downgrade() {
    let tmp = tempfile::tempdir().unwrap();
    let state = init(tmp.path(), &config("logreg", 1, 1));
    let bundles = enroll(&state, &["strict"]);
    let (addr, server) = start(&state);
    let options = ClientOptions {
        require_secure_aggregation: true,
        ..options(addr)
    };
    let trainer = Box::new(ScriptedTrainer {
        id: 0,
        pause: Duration::ZERO,
    });
    let err = covey_client::run(&bundles[0], trainer, options)
        .await
        .unwrap_err();
    assert!(matches!(err, SessionError::Downgrade), "{err}");
    assert!(
        err.to_string()
            .contains("refusing to send an unmasked update")
    );
    server.abort();
}
