//! The operator API: roles bound to certificates decide who may read and
//! who may change, devices cannot use it, operators cannot train, and
//! every request is on the record.

mod common;

use std::time::Duration;

use common::*;
use covey_protocol::identity::IdentityBundle;
use covey_server::{
    Server,
    operator::admin::{AdminClientError, AdminReply, AdminRequest, Role, call},
    state::audit::AuditEvent,
};

async fn refused(identity: &IdentityBundle, request: AdminRequest) -> String {
    match call(identity, &request).await {
        Err(AdminClientError::Refused(reason)) => reason,
        other => panic!("expected a refusal of {request:?}, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn roles_decide_what_each_certificate_may_do() {
    let tmp = tempfile::tempdir().unwrap();
    let mut cfg = config("logreg", 1, 3);
    // Three check-ins start a round: the run stays idle while we talk to it.
    cfg.rounds.min_clients = 3;
    let state = init(tmp.path(), &cfg);
    let devices = enroll(&state, &["a", "b"]);
    let [auditor, operator, admin] = {
        let store = state.open_store().unwrap();
        [
            ("aud", Role::Auditor),
            ("op", Role::Operator),
            ("adm", Role::Admin),
        ]
        .map(|(name, role)| {
            state
                .enroll_as(&store, name, Duration::from_secs(3600), None, role)
                .unwrap()
                .0
        })
    };
    let server = Server::open(&state).unwrap();
    let addr = server.local_addr().unwrap();
    let stopper = server.stopper();
    let running = tokio::spawn(server.run());
    let at = |b: &IdentityBundle| IdentityBundle {
        server_addr: addr.to_string(),
        ..b.clone()
    };
    let (auditor, operator, admin) = (at(&auditor), at(&operator), at(&admin));

    // The auditor reads, under pseudonyms only, and changes nothing.
    match call(&auditor, &AdminRequest::Status).await.unwrap() {
        AdminReply::Status(report) => {
            assert_eq!(report.clients.len(), 5);
            assert!(report.clients.iter().all(|c| c.name.is_none()));
        }
        other => panic!("{other:?}"),
    }
    match call(&auditor, &AdminRequest::Report).await.unwrap() {
        AdminReply::Report { json, html } => {
            let json: serde_json::Value = serde_json::from_str(&json).unwrap();
            assert_eq!(json["audit"]["valid"], true);
            assert_eq!(html.matches("<svg").count(), 3);
        }
        other => panic!("{other:?}"),
    }
    let reason = refused(&auditor, AdminRequest::Revoke { name: "a".into() }).await;
    assert!(reason.contains("auditor role may not revoke"), "{reason}");
    let device_enroll = AdminRequest::Enroll {
        name: "c".into(),
        days: 1,
        role: Role::Device,
    };
    refused(&auditor, device_enroll.clone()).await;

    // The operator manages devices, but grants no roles and erases nothing.
    let c = match call(&operator, &device_enroll).await.unwrap() {
        AdminReply::Enrolled { identity } => IdentityBundle::parse(&identity).unwrap(),
        other => panic!("{other:?}"),
    };
    let grant = AdminRequest::Enroll {
        name: "aud2".into(),
        days: 1,
        role: Role::Auditor,
    };
    assert!(
        refused(&operator, grant.clone())
            .await
            .contains("needs the admin role")
    );
    refused(&operator, AdminRequest::Forget { name: "b".into() }).await;
    assert_eq!(
        call(&operator, &AdminRequest::Revoke { name: "b".into() })
            .await
            .unwrap(),
        AdminReply::Revoked { certificates: 1 }
    );

    // The admin grants and erases.
    assert!(matches!(
        call(&admin, &grant).await.unwrap(),
        AdminReply::Enrolled { .. }
    ));
    assert_eq!(
        call(&admin, &AdminRequest::Forget { name: "b".into() })
            .await
            .unwrap(),
        AdminReply::Forgotten { enrollments: 1 }
    );

    // A device has no API; an operator certificate cannot train; the
    // device the operator enrolled is admitted at once.
    let reason = refused(&at(&devices[0]), AdminRequest::Status).await;
    assert!(reason.contains("no operator role"), "{reason}");
    let trainer = Box::new(ScriptedTrainer {
        id: 9,
        pause: Duration::ZERO,
    });
    let err = covey_client::run(&auditor, trainer, options(addr))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("cannot train"), "{err}");
    let conn = raw_connection(&c, addr).await;
    assert!(conn.close_reason().is_none());
    conn.close(0u32.into(), b"bye");

    // The same through the binary, from an identity file.
    let file = tmp.path().join("aud.identity");
    std::fs::write(&file, auditor.to_toml()).unwrap();
    let cli = |args: &'static [&'static str]| {
        let file = file.clone();
        tokio::task::spawn_blocking(move || {
            std::process::Command::new(env!("CARGO_BIN_EXE_covey-server"))
                .arg("remote")
                .arg("--identity")
                .arg(&file)
                .args(args)
                .output()
                .unwrap()
        })
    };
    let out = cli(&["status", "--json"]).await.unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(status["current_version"], 0);
    let out = cli(&["revoke", "--name", "a"]).await.unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("auditor role may not revoke"));

    stopper.stop().await;
    running.await.unwrap().unwrap();
    let store = state.open_store().unwrap();
    let requests: Vec<(Role, String, bool)> = store
        .audit_entries()
        .unwrap()
        .iter()
        .filter_map(|e| match e.entry().unwrap().event {
            AuditEvent::AdminRequest {
                role,
                action,
                allowed,
                ..
            } => Some((role, action, allowed)),
            _ => None,
        })
        .collect();
    assert!(requests.contains(&(Role::Auditor, "revoke an enrollment".into(), false)));
    assert!(requests.contains(&(Role::Admin, "erase an enrollment".into(), true)));
    assert_eq!(requests.iter().filter(|r| !r.2).count(), 5, "{requests:?}");
}
