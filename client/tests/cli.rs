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
