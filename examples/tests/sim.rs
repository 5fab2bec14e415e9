//! covey-sim end to end: a real server and virtual clients on loopback.

use std::process::Command;

fn sim(args: &[&str]) -> Vec<serde_json::Value> {
    let out = Command::new(env!("CARGO_BIN_EXE_covey-sim"))
        .current_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
        .args(args)
        .arg("--json")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "covey-sim failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[test]
fn five_clients_train_a_2nn_past_90_percent_on_the_shipped_subset() {
    let rounds = sim(&[
        "--model",
        "2nn",
        "--clients",
        "5",
        "--rounds",
        "4",
        "--epochs",
        "2",
        "--seed",
        "1",
    ]);
    assert!(!rounds.is_empty());
    for (i, r) in rounds.iter().enumerate() {
        assert_eq!(r["round"], i as u64 + 1);
        assert_eq!(r["participants"], 5);
        for field in ["accuracy", "loss", "bytes_up", "bytes_down", "seconds"] {
            assert!(r[field].is_number(), "{field} missing in {r}");
        }
    }
    let best = rounds
        .iter()
        .map(|r| r["accuracy"].as_f64().unwrap())
        .fold(0.0, f64::max);
    assert!(best >= 0.90, "best test accuracy {best}");
}

#[test]
fn the_target_accuracy_stops_the_run_early() {
    let rounds = sim(&[
        "--model",
        "logreg",
        "--clients",
        "4",
        "--fraction",
        "0.5",
        "--rounds",
        "50",
        "--epochs",
        "1",
        "--target-accuracy",
        "0.8",
        "--update-encoding",
        "int8",
    ]);
    let last = rounds.last().unwrap();
    assert!(last["accuracy"].as_f64().unwrap() >= 0.8);
    assert!(rounds.len() < 50, "ran all {} rounds", rounds.len());
    assert_eq!(last["participants"], 2);
}

#[test]
fn bad_flags_are_refused_with_a_reason() {
    for (args, needle) in [
        (&["--partition", "random"][..], "unknown partition 'random'"),
        (&["--fraction", "0"][..], "--fraction must be in (0, 1]"),
        (&["--model", "resnet"][..], "unknown model 'resnet'"),
        (&["--data", "/nonexistent"][..], "/nonexistent"),
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_covey-sim"))
            .args(args)
            .output()
            .unwrap();
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(needle), "{args:?}: {err}");
    }
}
