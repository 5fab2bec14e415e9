//! `covey-client` refuses bad input with a message that names it.

use std::process::Command;

fn client(args: &[&str]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_covey-client"))
        .args(args)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn broken_identities_data_and_devices_are_named() {
    let tmp = tempfile::tempdir().unwrap();
    let identity = tmp.path().join("x.identity");
    let id = identity.to_str().unwrap();

    let (ok, err) = client(&["run", "--data", "/nonexistent", "--identity", id]);
    assert!(!ok && err.contains("cannot read identity bundle"), "{err}");

    std::fs::write(&identity, "server_addr = 1").unwrap();
    let (ok, err) = client(&["run", "--data", "/nonexistent", "--identity", id]);
    assert!(
        !ok && err.contains("identity bundle") && err.contains("is not valid"),
        "{err}"
    );

    let pem = "-----BEGIN X-----\nAA\n-----END X-----\n";
    let bundle = format!(
        "server_addr = \"127.0.0.1:1\"\nserver_name = \"covey-server\"\nca_cert_pem = \"\"\"{pem}\"\"\"\ncert_pem = \"\"\"{pem}\"\"\"\nkey_pem = \"\"\"{pem}\"\"\"\n"
    );
    std::fs::write(&identity, bundle).unwrap();
    let (ok, err) = client(&[
        "run",
        "--device",
        "tpu",
        "--data",
        "/nonexistent",
        "--identity",
        id,
    ]);
    assert!(!ok && err.contains("device 'tpu'"), "{err}");
    let (ok, err) = client(&[
        "run",
        "--device",
        "cpu",
        "--data",
        "/nonexistent",
        "--identity",
        id,
    ]);
    assert!(!ok && err.contains("/nonexistent"), "{err}");
}

#[test]
fn evaluate_and_generate_work_on_a_local_checkpoint() {
    let data = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/lm");
    let tmp = tempfile::tempdir().unwrap();
    std::fs::write(
        tmp.path().join("a.txt"),
        "Shall I compare thee to a summer's day?",
    )
    .unwrap();
    let model = format!("{data}/gpt2");
    let tokenizer = format!("{data}/tokenizer/tokenizer.json");
    let text = tmp.path().to_str().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_covey-client"))
        .args([
            "evaluate",
            "--model",
            &model,
            "--tokenizer",
            &tokenizer,
            "--data",
            text,
            "--json",
        ])
        .args(["--device", "cpu"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(v["tokens"].as_u64().unwrap() > 5);
    let (loss, perplexity) = (
        v["loss"].as_f64().unwrap(),
        v["perplexity"].as_f64().unwrap(),
    );
    assert!((loss.exp() - perplexity).abs() < 1e-3 * perplexity, "{v}");
    // The same with the peft adapter on top: another model, another loss.
    let adapter = format!("{data}/gpt2/adapter");
    let out = Command::new(env!("CARGO_BIN_EXE_covey-client"))
        .args([
            "evaluate",
            "--model",
            &model,
            "--adapter",
            &adapter,
            "--tokenizer",
            &tokenizer,
        ])
        .args(["--data", text, "--json", "--device", "cpu"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let w: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_ne!(w["loss"], v["loss"]);

    let out = Command::new(env!("CARGO_BIN_EXE_covey-client"))
        .args([
            "generate",
            "--model",
            &model,
            "--tokenizer",
            &tokenizer,
            "--prompt",
            "Shall I",
        ])
        .args(["--max-tokens", "5", "--device", "cpu"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("Shall I"));

    let (ok, err) = client(&[
        "evaluate", "--model", text, "--data", text, "--device", "cpu",
    ]);
    assert!(!ok && err.contains("config.json"), "{err}");
}
