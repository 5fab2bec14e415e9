//! The operator's path through the real `covey-server` binary.

mod common;

use std::{
    path::Path,
    process::{Command, Output, Stdio},
    time::Duration,
};

use common::*;
use covey_protocol::identity::IdentityBundle;

fn server(args: &[&str], dir: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_covey-server"))
        .args(args)
        .arg("--dir")
        .arg(dir)
        .env("COVEY_LOG", "info")
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

/// Every byte of every file under `dir`.
fn files_under(dir: &Path) -> Vec<u8> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        let path = entry.path();
        if path.is_dir() {
            out.extend(files_under(&path));
        } else {
            out.extend(std::fs::read(&path).unwrap());
        }
    }
    out
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

fn fails_with(out: &Output, needle: &str) {
    assert!(!out.status.success(), "should have failed");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(needle), "stderr lacks {needle:?}: {err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn init_enroll_run_status_export_revoke() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("state");
    let port = std::net::UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let listen = format!("127.0.0.1:{port}");
    ok(&server(
        &[
            "init",
            "--listen",
            &listen,
            "--model",
            "logreg",
            "--rounds",
            "2",
            "--clients-per-round",
            "2",
        ],
        &dir,
    ));
    let config = std::fs::read_to_string(dir.join("config.toml")).unwrap();
    assert!(config.contains("# Fewest accepted updates a round may commit with"));
    fails_with(&server(&["init"], &dir), "refusing to overwrite");

    let mut bundles = Vec::new();
    for name in ["alice-device", "bob-device"] {
        let out = dir.join(format!("{name}.identity"));
        ok(&server(
            &["enroll", "--name", name, "--out", out.to_str().unwrap()],
            &dir,
        ));
        bundles.push(IdentityBundle::load(&out).unwrap());
    }
    fails_with(
        &server(
            &["enroll", "--name", "alice-device", "--out", "/dev/null"],
            &dir,
        ),
        "already enrolled",
    );
    fails_with(
        &server(
            &["enroll", "--name", "bad name!", "--out", "/dev/null"],
            &dir,
        ),
        "enrollment name",
    );

    let run = Command::new(env!("CARGO_BIN_EXE_covey-server"))
        .args(["run", "--json", "--dir"])
        .arg(&dir)
        .env(
            "COVEY_LOG",
            "debug,quinn=warn,quinn_proto=warn,rustls=warn,sled=warn",
        )
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let addr = listen.parse().unwrap();
    let clients = spawn_scripted(&bundles, addr, Duration::from_millis(20));
    let out = tokio::task::spawn_blocking(move || run.wait_with_output())
        .await
        .unwrap()
        .unwrap();
    let summary: serde_json::Value = serde_json::from_str(&ok(&out)).unwrap();
    assert_eq!(summary["final_version"], 2);
    for c in clients {
        c.await.unwrap();
    }
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(log.contains("round committed"), "{log}");
    for secret in ["alice-device", "bob-device", "127.0.0.1"] {
        assert!(
            !log.contains(secret),
            "the server log contains {secret:?}:\n{log}"
        );
    }

    let text = ok(&server(&["status"], &dir));
    assert!(text.contains("current version: 2"), "{text}");
    assert!(text.contains("committed v2"), "{text}");
    let json: serde_json::Value =
        serde_json::from_str(&ok(&server(&["status", "--json"], &dir))).unwrap();
    assert_eq!(json["current_version"], 2);
    assert_eq!(json["rounds"].as_array().unwrap().len(), 2);
    assert_eq!(json["clients"].as_array().unwrap().len(), 2);

    let model = tmp.path().join("v2.safetensors");
    ok(&server(
        &["export", "--version", "2", "--out", model.to_str().unwrap()],
        &dir,
    ));
    let bytes = std::fs::read(&model).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    assert_eq!(st.tensor("fc.weight").unwrap().shape(), &[10, 784]);
    fails_with(
        &server(
            &["export", "--version", "9", "--out", model.to_str().unwrap()],
            &dir,
        ),
        "model version 9 is not stored",
    );

    // At rest: no plaintext weights, names or addresses in the database
    // files, and the audit export names no one either.
    let weights = &bytes[bytes.len() - 256..];
    let audit_file = tmp.path().join("audit.jsonl");
    ok(&Command::new(env!("CARGO_BIN_EXE_covey-server"))
        .args([
            "audit",
            "export",
            "--out",
            audit_file.to_str().unwrap(),
            "--dir",
        ])
        .arg(&dir)
        .output()
        .unwrap());
    let audit_text = std::fs::read(&audit_file).unwrap();
    let db = files_under(&dir.join("db"));
    for (what, needle) in [
        ("weights", weights),
        ("a name", b"alice-device".as_slice()),
        ("an address", b"127.0.0.1".as_slice()),
    ] {
        assert!(
            !contains(&db, needle),
            "the database holds {what} in plaintext"
        );
        assert!(
            !contains(&audit_text, needle),
            "the audit export holds {what}"
        );
    }

    // A wrong key-encryption key is refused by name; rotation moves to a
    // new one and the old one stops working.
    let config_path = dir.join("config.toml");
    let original = std::fs::read_to_string(&config_path).unwrap();
    std::fs::write(
        &config_path,
        original.replace(
            "kek = \"file:kek.key\"",
            "kek = \"env:COVEY_TEST_WRONG_KEK\"",
        ),
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_covey-server"))
        .args(["status", "--dir"])
        .arg(&dir)
        .env("COVEY_TEST_WRONG_KEK", "11".repeat(32))
        .output()
        .unwrap();
    fails_with(&out, "env:COVEY_TEST_WRONG_KEK does not unwrap");
    std::fs::write(&config_path, &original).unwrap();
    let rotated = ok(&server(&["rotate-key", "--to", "file:next.key"], &dir));
    assert!(rotated.contains("file:next.key"), "{rotated}");
    assert!(ok(&server(&["status"], &dir)).contains("current version: 2"));
    let rotated_config = std::fs::read_to_string(&config_path).unwrap();
    assert!(rotated_config.contains("kek = \"file:next.key\""));
    std::fs::write(&config_path, &original).unwrap();
    fails_with(&server(&["status"], &dir), "file:kek.key does not unwrap");
    std::fs::write(&config_path, &rotated_config).unwrap();

    ok(&server(&["revoke", "--name", "bob-device"], &dir));
    fails_with(
        &server(&["revoke", "--name", "bob-device"], &dir),
        "no active enrollment named 'bob-device'",
    );
    let text = ok(&server(&["status"], &dir));
    assert!(text.contains("revoked"), "{text}");

    // Erasure: the name is gone from the registry, the pseudonym stays in
    // the trail, and the chain still verifies.
    let said = ok(&server(&["forget", "--name", "bob-device"], &dir));
    assert!(said.contains("forgot 'bob-device'"), "{said}");
    fails_with(
        &server(&["forget", "--name", "bob-device"], &dir),
        "no enrollment named 'bob-device'",
    );
    let text = ok(&server(&["status"], &dir));
    assert!(!text.contains("bob-device"), "{text}");
    assert!(text.contains("alice-device"), "{text}");
    ok(&Command::new(env!("CARGO_BIN_EXE_covey-server"))
        .args([
            "audit",
            "export",
            "--out",
            audit_file.to_str().unwrap(),
            "--dir",
        ])
        .arg(&dir)
        .output()
        .unwrap());
    let verified = ok(&Command::new(env!("CARGO_BIN_EXE_covey-server"))
        .args(["audit", "verify", "--json", "--public-key"])
        .arg(dir.join("audit.pub"))
        .arg(&audit_file)
        .output()
        .unwrap());
    let verified: serde_json::Value = serde_json::from_str(&verified).unwrap();
    assert_eq!(verified["events"]["forgotten"], 1, "{verified}");
    assert_eq!(verified["events"]["key_rotated"], 1, "{verified}");
    assert_eq!(verified["events"]["model_exported"], 1, "{verified}");
}

#[test]
fn missing_and_broken_state_directories_are_named() {
    let tmp = tempfile::tempdir().unwrap();
    fails_with(
        &server(&["status"], &tmp.path().join("nothing")),
        "covey-server init",
    );
    fails_with(
        &server(
            &["init", "--test-data", "/no/such/dir"],
            &tmp.path().join("t"),
        ),
        "test data directory /no/such/dir",
    );
    let with_test = tmp.path().join("t");
    let data = concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/data/mnist");
    ok(&server(&["init", "--test-data", data], &with_test));
    let config = std::fs::read_to_string(with_test.join("config.toml")).unwrap();
    let absolute = std::fs::canonicalize(data).unwrap();
    assert!(
        config.contains(&format!("test_data = \"{}\"", absolute.display())),
        "{config}"
    );

    let dir = tmp.path().join("s");
    ok(&server(&["init"], &dir));
    let config = std::fs::read_to_string(dir.join("config.toml")).unwrap();
    std::fs::write(
        dir.join("config.toml"),
        config.replace("test_data = \"\"", "test_data = \"/no/such/dir\""),
    )
    .unwrap();
    fails_with(
        &server(&["run"], &dir),
        "evaluation test set: no image file in /no/such/dir",
    );
    std::fs::write(dir.join("config.toml"), "[server]\nlisten = 5\n").unwrap();
    fails_with(&server(&["run"], &dir), "config.toml is not valid");
}

#[test]
fn privacy_epsilon_and_noise_match_published_values() {
    let run = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_covey-server"))
            .args(args)
            .output()
            .unwrap()
    };
    let out = run(&[
        "privacy",
        "epsilon",
        "--noise-multiplier",
        "4",
        "--sampling-rate",
        "0.01",
        "--rounds",
        "40000",
        "--delta",
        "1e-5",
        "--json",
    ]);
    let json: serde_json::Value = serde_json::from_str(&ok(&out)).unwrap();
    // Abadi et al. 2016 with the improved RDP conversion: about 2.21.
    let eps = json["epsilon"].as_f64().unwrap();
    assert!((eps - 2.21).abs() < 0.03, "{eps}");
    let out = run(&[
        "privacy",
        "noise",
        "--epsilon",
        "2.21",
        "--delta",
        "1e-5",
        "--sampling-rate",
        "0.01",
        "--rounds",
        "40000",
        "--json",
    ]);
    let json: serde_json::Value = serde_json::from_str(&ok(&out)).unwrap();
    let z = json["noise_multiplier"].as_f64().unwrap();
    assert!((z - 4.0).abs() < 0.1, "{z}");
    fails_with(
        &run(&[
            "privacy",
            "epsilon",
            "--noise-multiplier",
            "1",
            "--sampling-rate",
            "2",
            "--rounds",
            "1",
            "--delta",
            "1e-5",
        ]),
        "sampling rate must be in (0, 1], got 2",
    );
    // The PLD accountant on the same setting: tighter than RDP's 2.21, and
    // dp_accounting's PLDAccountant gives 2.0334.
    let abadi = |accountant: &str| {
        let out = run(&[
            "privacy",
            "epsilon",
            "--noise-multiplier",
            "4",
            "--sampling-rate",
            "0.01",
            "--rounds",
            "40000",
            "--delta",
            "1e-5",
            "--accountant",
            accountant,
            "--json",
        ]);
        let json: serde_json::Value = serde_json::from_str(&ok(&out)).unwrap();
        assert_eq!(json["accountant"], accountant);
        json["epsilon"].as_f64().unwrap()
    };
    let pld = abadi("pld");
    assert!((pld / 2.0334 - 1.0).abs() < 0.01, "{pld}");
    assert!(pld < abadi("rdp"));
    // Less noise meets the same target under the tighter accountant.
    let out = run(&[
        "privacy",
        "noise",
        "--epsilon",
        "2.21",
        "--delta",
        "1e-5",
        "--sampling-rate",
        "0.01",
        "--rounds",
        "40000",
        "--accountant",
        "pld",
        "--json",
    ]);
    let json: serde_json::Value = serde_json::from_str(&ok(&out)).unwrap();
    let z_pld = json["noise_multiplier"].as_f64().unwrap();
    assert!(z_pld < z && z_pld > 3.0, "{z_pld} against rdp's {z}");
    fails_with(
        &run(&[
            "privacy",
            "epsilon",
            "--noise-multiplier",
            "1",
            "--sampling-rate",
            "0.1",
            "--rounds",
            "1",
            "--delta",
            "1e-5",
            "--accountant",
            "moments",
        ]),
        "invalid value 'moments'",
    );
}

#[test]
fn init_builds_a_language_model_from_a_checkpoint_and_names_what_it_refuses() {
    let tmp = tempfile::tempdir().unwrap();
    let data = format!("{}/../client/tests/data/lm", env!("CARGO_MANIFEST_DIR"));
    let tokenizer = format!("{data}/tokenizer/tokenizer.json");
    let dir = tmp.path().join("state");
    let init = |dir: &Path, model: &str, extra: &[&str]| {
        let mut args = vec!["init", "--model", model];
        args.extend_from_slice(extra);
        server(&args, dir)
    };
    let out = ok(&init(
        &dir,
        &format!("hf:{data}/llama"),
        &[
            "--lora-rank",
            "2",
            "--context",
            "16",
            "--tokenizer",
            &tokenizer,
        ],
    ));
    assert!(out.contains("llama (2 layers, width 32"), "{out}");
    assert!(out.contains("FFA-LoRA"), "{out}");
    let config = std::fs::read_to_string(dir.join("config.toml")).unwrap();
    assert!(config.contains("architecture = \"llama\""), "{config}");
    assert!(config.contains("language = "), "{config}");
    // Devices fine-tune it with local Adam, not the classifiers' SGD.
    assert!(config.contains("local_optimizer = \"adam\""), "{config}");
    assert!(config.contains("learning_rate = 0.0005"), "{config}");
    // The base and the tokenizer, by hash.
    assert_eq!(std::fs::read_dir(dir.join("assets")).unwrap().count(), 2);
    let out = ok(&server(&["status"], &dir));
    assert!(out.contains("llama"), "{out}");

    // A checkpoint missing a tensor is refused before any state exists.
    let broken = tmp.path().join("broken");
    std::fs::create_dir(&broken).unwrap();
    std::fs::copy(
        format!("{data}/gpt2/model.safetensors"),
        broken.join("model.safetensors"),
    )
    .unwrap();
    let config = std::fs::read_to_string(format!("{data}/gpt2/config.json")).unwrap();
    std::fs::write(
        broken.join("config.json"),
        config.replace("\"n_layer\": 2", "\"n_layer\": 3"),
    )
    .unwrap();
    let fresh = tmp.path().join("fresh");
    let out = init(
        &fresh,
        &format!("hf:{}", broken.display()),
        &["--tokenizer", &tokenizer],
    );
    fails_with(&out, "tensor h.2.ln_1.weight is missing");
    assert!(!fresh.join("config.toml").exists());
    fails_with(
        &init(
            &fresh,
            "gpt2-bytes",
            &["--lora-rank", "0", "--context", "999"],
        ),
        "context",
    );
    fails_with(
        &init(&fresh, "cnn", &["--lora-rank", "4"]),
        "image classifier",
    );
    fails_with(&init(&fresh, "bert-base", &[]), "unknown model 'bert-base'");
}
