//! A few trials of the crash soak in CI: the server is SIGKILLed at random
//! moments and restarted, devices are killed and restarted too, and every run must finish with each model version
//! committed exactly once and the exact final model. The full soak (20
//! trials) is `covey-soak --trials 20`; its results are in BENCHMARKS.md.

use std::process::Command;

#[test]
fn runs_survive_random_sigkills_of_the_server() {
    let out = Command::new(env!("CARGO_BIN_EXE_covey-soak"))
        .args([
            "--trials", "3", "--kills", "2", "--rounds", "6", "--seed", "7",
        ])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "soak failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("3 of 3 trials passed"), "{stdout}");
    // The kills happened: each trial reports when it killed.
    assert_eq!(stdout.matches("killed at [").count(), 3, "{stdout}");
    assert!(
        !stdout.contains("killed at []"),
        "a trial finished before any kill:\n{stdout}"
    );
}
