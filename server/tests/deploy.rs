//! The Kubernetes manifests in `server/deploy/kubernetes` start the binary
//! this repository builds: every role's arguments, as the pods pass them,
//! parse with the real command line, so a renamed flag cannot ship a
//! manifest that crash-loops. (`.ci/run` validates the manifests against
//! Kubernetes' schemas with kubernetes-validate.)

use std::{path::Path, process::Command};

/// The `args:` list of the container named `container` in `file`, with the
/// pod's name substituted as Kubernetes would.
fn container_args(file: &str, container: &str) -> Vec<String> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("deploy/kubernetes")
        .join(file);
    let text = std::fs::read_to_string(&path).unwrap();
    let mut lines = text
        .lines()
        .skip_while(|l| l.trim() != format!("- name: {container}"))
        .skip_while(|l| l.trim() != "args:")
        .skip(1);
    let mut args = Vec::new();
    for line in lines.by_ref() {
        let Some(arg) = line.trim().strip_prefix("- ") else {
            break;
        };
        args.push(arg.replace("$(POD_NAME)", "covey-leaf-0"));
    }
    assert!(!args.is_empty(), "no args for {container} in {file}");
    args
}

#[test]
fn every_role_in_the_manifests_parses_with_this_binary() {
    for (file, container, role) in [
        ("root.yaml", "coordinator", "coordinator"),
        ("leaves.yaml", "aggregator", "aggregator"),
    ] {
        let mut args = container_args(file, container);
        assert_eq!(args[0], role);
        // A directory with no config.toml: the binary gets past parsing its
        // arguments and stops at the state directory, naming it.
        let empty = tempfile::tempdir().unwrap();
        for a in &mut args {
            if a == "--dir=/state" {
                *a = format!("--dir={}", empty.path().display());
            }
        }
        let out = Command::new(env!("CARGO_BIN_EXE_covey-server"))
            .args(&args)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_ne!(out.status.code(), Some(2), "{file}: {stderr}");
        assert!(!out.status.success());
        assert!(stderr.contains("config.toml"), "{file}: {stderr}");
    }
}
