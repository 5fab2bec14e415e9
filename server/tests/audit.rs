//! The audit trail through the real binary: exported live and offline,
//! verified without the database, and any edit, deletion, reordering or
//! truncation named by line.

mod common;

use std::{
    path::{Path, PathBuf},
    process::{Command, Output},
    time::Duration,
};

use common::*;

fn covey(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_covey-server"))
        .args(args)
        .output()
        .unwrap()
}

fn ok(out: &Output) -> String {
    assert!(
        out.status.success(),
        "failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

async fn export(dir: PathBuf, out: PathBuf) -> String {
    tokio::task::spawn_blocking(move || {
        ok(&covey(&[
            "audit",
            "export",
            "--dir",
            s(&dir),
            "--out",
            s(&out),
        ]))
    })
    .await
    .unwrap()
}

fn verify(file: &Path, key: &Path, checkpoints: &[&str]) -> Output {
    let mut args = vec!["audit", "verify", s(file), "--public-key", s(key), "--json"];
    for c in checkpoints {
        args.extend(["--checkpoint", c]);
    }
    covey(&args)
}

fn verified(file: &Path, key: &Path, checkpoints: &[&str]) -> serde_json::Value {
    serde_json::from_str(&ok(&verify(file, key, checkpoints))).unwrap()
}

fn refused(file: &Path, key: &Path, needle: &str) {
    let out = verify(file, key, &[]);
    assert!(!out.status.success(), "a tampered trail verified");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(needle), "stderr lacks {needle:?}: {err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_trail_records_a_run_and_any_tampering_is_named() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("state");
    let state = init(&root, &config("logreg", 2, 2));
    let bundles = enroll(&state, &["alice-device", "bob-device"]);

    // Live: the server holds the database and answers through its inbox.
    let (addr, running) = start(&state);
    let live = tmp.path().join("live.jsonl");
    let said = export(root.clone(), live.clone()).await;
    assert!(said.contains("wrote 6 audit entries"), "{said}");
    let published = root.join("audit.pub");
    let live_check = verified(&live, &published, &[]);
    assert_eq!(live_check["entries"], 6);
    for (kind, n) in [
        ("initialised", 1),
        ("enrolled", 2),
        ("config_changed", 1),
        ("server_started", 1),
        ("audit_exported", 1),
    ] {
        assert_eq!(live_check["events"][kind], n, "{live_check}");
    }

    let clients = spawn_scripted(&bundles, addr, Duration::ZERO);
    assert_eq!(running.await.unwrap().final_version, 2);
    for c in clients {
        c.await.unwrap();
    }

    // Offline: every later event is appended after the live export's head.
    ok(&covey(&[
        "revoke",
        "--dir",
        s(&root),
        "--name",
        "bob-device",
    ]));
    let key = tmp.path().join("audit.pub");
    ok(&covey(&[
        "audit",
        "public-key",
        "--dir",
        s(&root),
        "--out",
        s(&key),
    ]));
    assert_eq!(
        std::fs::read_to_string(&key).unwrap(),
        std::fs::read_to_string(&published).unwrap()
    );
    let trail = tmp.path().join("audit.jsonl");
    export(root.clone(), trail.clone()).await;
    let head = live_check["head"].as_str().unwrap();
    let full = verified(&trail, &key, &[head]);
    for (kind, n) in [
        ("round_started", 2),
        ("round_committed", 2),
        ("revoked", 1),
        ("audit_exported", 2),
    ] {
        assert_eq!(full["events"][kind], n, "{full}");
    }
    let text = std::fs::read_to_string(&trail).unwrap();
    for secret in ["alice-device", "bob-device", "127.0.0.1", "CN="] {
        assert!(!text.contains(secret), "the trail names {secret:?}");
    }
    assert!(text.contains("\"client\":\"c-"), "{text}");

    let lines: Vec<&str> = text.lines().collect();
    let write = |name: &str, lines: &[String]| {
        let path = tmp.path().join(name);
        std::fs::write(&path, lines.join("\n")).unwrap();
        path
    };
    let owned = |v: &[&str]| v.iter().map(|l| l.to_string()).collect::<Vec<_>>();

    let mut edited = owned(&lines);
    let committed = edited
        .iter()
        .position(|l| l.contains("round_committed"))
        .unwrap();
    edited[committed] = edited[committed].replace("\"cohort\":2", "\"cohort\":20");
    refused(
        &write("edited.jsonl", &edited),
        &key,
        &format!("line {} (entry {committed})", committed + 1),
    );

    let mut deleted = owned(&lines);
    deleted.remove(3);
    refused(
        &write("deleted.jsonl", &deleted),
        &key,
        "line 4 (entry 4): expected entry 3",
    );

    let mut reordered = owned(&lines);
    reordered.swap(5, 6);
    refused(&write("reordered.jsonl", &reordered), &key, "line 6");

    let truncated = owned(&lines[..lines.len() - 1]);
    refused(
        &write("truncated.jsonl", &truncated),
        &key,
        "entries after this one were removed",
    );

    // Another server's key cannot vouch for this trail.
    let other = tmp.path().join("other");
    init(&other, &config("logreg", 1, 1));
    refused(
        &trail,
        &other.join("audit.pub"),
        "signature does not verify",
    );
    let out = verify(&trail, &key, &["00"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("--checkpoint"));
}
