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
        (&["--dp", "local"][..], "privacy.mode"),
        (&["--aggregator", "krum:9"][..], "raise rounds.quorum"),
        (&["--attack", "scale:x"][..], "unknown attack 'scale:x'"),
        (
            &["--attack", "sign-flip", "--attackers", "2"][..],
            "--attackers is a fraction",
        ),
        (
            &["--aggregator", "median", "--dp", "central"][..],
            "sensitivity",
        ),
        (&["--dp", "central", "--clip=-1"][..], "privacy.clip"),
        (
            &["--dp", "central", "--clip", "big"][..],
            "--clip must be a number",
        ),
        (
            &["--dp", "central", "--target-epsilon", "0"][..],
            "privacy.target_epsilon",
        ),
        // One round costs ε ≈ 10.7 against the default target of 8: a run that
        // could never commit is refused, with the noise that would fit.
        (
            &[
                "--dp",
                "distributed",
                "--clip",
                "1",
                "--noise-multiplier",
                "0.5",
            ][..],
            "one round costs ε = 10.72, over target_epsilon = 8, so no round could commit; noise_multiplier = 0.638 or more",
        ),
        (
            &["--dp", "central", "--secagg"][..],
            "secure_aggregation.enabled",
        ),
        (
            &["--dp", "distributed", "--secagg", "--threshold", "0.5"][..],
            "secure_aggregation.threshold",
        ),
        (&["--dropout-phase", "train"][..], "unknown phase 'train'"),
        (&["--parallel", "0"][..], "--parallel must be at least 1"),
        (
            &["--lr-decay", "step:0:0.5"][..],
            "training.learning_rate_decay: 'step:0:0.5': EVERY must be at least 1",
        ),
        (
            &["--dp", "distributed", "--secagg", "--dropout", "1.5"][..],
            "--dropout is a probability",
        ),
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

/// Mean and std over coordinates of version 1 − version 0 in `state`.
fn released_noise(state: &std::path::Path) -> (f64, f64, covey_server::state::store::Store) {
    let store = covey_server::StateDir::new(state).open_store().unwrap();
    let before = store
        .model(covey_protocol::ModelVersion(0))
        .unwrap()
        .weights;
    let after = store
        .model(covey_protocol::ModelVersion(1))
        .unwrap()
        .weights;
    let n = before.len() as f64;
    let diffs: Vec<f64> = after
        .iter()
        .zip(&before)
        .map(|(a, b)| f64::from(*a) - f64::from(*b))
        .collect();
    let mean = diffs.iter().sum::<f64>() / n;
    let std = (diffs.iter().map(|d| (d - mean).powi(2)).sum::<f64>() / n).sqrt();
    (mean, std, store)
}

/// The claim of central DP checked through the whole system: with a zero
/// learning rate every true update is zero, so the two global models differ
/// by the server's noise alone, whose per-coordinate std must be z·C/n.
#[test]
fn central_dp_noise_on_the_released_model_has_std_z_c_over_n() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let rounds = zero_update_run("central", &state, &[]);
    assert_eq!(rounds.len(), 1);
    assert_eq!(rounds[0]["participants"], 10);
    let epsilon = rounds[0]["epsilon"].as_f64().unwrap();
    assert!(epsilon > 0.0);

    let (mean, std, store) = released_noise(&state);
    // 199,210 coordinates: the estimate's own error is about 0.2%.
    assert!(
        (std / 0.1 - 1.0).abs() < 0.02,
        "noise std {std}, expected 0.1"
    );
    assert!(mean.abs() < 0.002, "noise mean {mean}");
    // ε stored with the round is what the accountant gives for one round
    // at q = 1, z = 1, δ = 1e-5.
    let ledger = store.privacy_ledger().unwrap().unwrap();
    assert_eq!(ledger.rounds, 1);
    let expected = covey_privacy::accountant::dp_fedavg_epsilon(
        covey_privacy::accountant::SamplingRate::new(1.0).unwrap(),
        covey_privacy::accountant::NoiseMultiplier::new(1.0).unwrap(),
        1,
        covey_privacy::accountant::Delta::new(1e-5).unwrap(),
    );
    assert!((epsilon - expected.get()).abs() < 1e-9);
}

#[test]
fn a_run_stops_cleanly_before_it_exceeds_its_privacy_budget() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let out = Command::new(env!("CARGO_BIN_EXE_covey-sim"))
        .current_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
        .args([
            "--model",
            "logreg",
            "--clients",
            "4",
            "--rounds",
            "20",
            "--epochs",
            "1",
            "--dp",
            "central",
            "--clip",
            "1",
            "--noise-multiplier",
            "5",
            "--target-epsilon",
            "1.5",
            "--state-dir",
        ])
        .arg(&state)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stdout.contains("privacy budget exhausted"), "{stdout}");
    assert!(
        stderr.contains("one more round would exceed the target epsilon"),
        "{stderr}"
    );
    let report = covey_server::operator::status::Report::from_store(
        &covey_server::StateDir::new(&state).open_store().unwrap(),
        false,
    )
    .unwrap();
    let spent = report.epsilon_spent.unwrap();
    // z = 5 at q = 1: three rounds spend 1.4456, a fourth would reach 1.6937.
    assert!(spent <= 1.5, "spent {spent}");
    assert_eq!(report.current_version, 3);
    // Every committed round carries the ε spent so far, never above target.
    let eps: Vec<f64> = report.rounds.iter().filter_map(|r| r.epsilon).collect();
    assert_eq!(eps.len() as u64, report.current_version);
    assert!(eps.windows(2).all(|w| w[0] < w[1]) && eps.iter().all(|e| *e <= 1.5));
}

/// Distributed DP through the whole system: clients quantize, rotate and
/// noise their (zero) updates; the server decodes only the modular sum. The
/// released noise per coordinate must be γ·σᵢ·√10 / 10, σᵢ being each
/// client's share for a minimum cohort of 5 (the simulator's quorum).
#[test]
fn distributed_dp_noise_on_the_released_model_has_the_planned_std() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let rounds = zero_update_run("distributed", &state, &[]);
    assert_eq!(rounds[0]["participants"], 10);
    let plan = zero_update_plan();
    let expected = planned_std(10.0);
    // z·C/n·√(10/5), give or take the rounding slack in Δ₂.
    assert!(
        (expected / (0.1 * 2f64.sqrt()) - 1.0).abs() < 0.02,
        "{expected}"
    );

    let (mean, std, _) = released_noise(&state);
    assert!(
        (std / expected - 1.0).abs() < 0.02,
        "noise std {std}, expected {expected}"
    );
    assert!(mean.abs() < 0.003, "noise mean {mean}");
    // One round of zCDP ρ, converted: what the JSON line reported.
    let epsilon = rounds[0]["epsilon"].as_f64().unwrap();
    let mut acc = covey_privacy::accountant::RdpAccountant::new();
    acc.compose_zcdp(plan.rho).unwrap();
    let converted = acc
        .epsilon(
            covey_privacy::accountant::Delta::new(1e-5).unwrap(),
            covey_privacy::accountant::Conversion::Improved,
        )
        .0
        .get();
    assert!(
        (epsilon - converted).abs() < 1e-9,
        "{epsilon} vs {converted}"
    );
}

/// Adaptive clipping through the whole system: the first round uses the
/// configured clip, later rounds the clip the server moved towards the
/// median update norm, and every round records the clip it used.
#[test]
fn adaptive_clipping_moves_the_clip_between_rounds() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let rounds = sim(&[
        "--model",
        "logreg",
        "--clients",
        "4",
        "--rounds",
        "3",
        "--epochs",
        "1",
        "--dp",
        "central",
        "--clip",
        "adaptive",
        "--noise-multiplier",
        "1",
        "--target-epsilon",
        "100",
        "--state-dir",
        state.to_str().unwrap(),
    ]);
    assert_eq!(rounds.len(), 3);
    let store = covey_server::StateDir::new(&state).open_store().unwrap();
    let clips: Vec<f64> = store
        .rounds()
        .unwrap()
        .iter()
        .filter_map(|r| r.clip)
        .collect();
    assert_eq!(clips.len(), 3, "{clips:?}");
    assert_eq!(clips[0], 1.0);
    assert!(
        clips.windows(2).all(|w| w[0] != w[1]),
        "the clip never moved: {clips:?}"
    );
    let ledger = store.privacy_ledger().unwrap().unwrap();
    assert!(
        ledger.clip.get() != clips[2],
        "the next round's clip is stored"
    );

    // The auditor's report of the same run.
    let out = dir.path().join("report");
    let report =
        covey_server::operator::report::write(&covey_server::StateDir::new(&state), &store, &out)
            .unwrap();
    assert!(report.audit.valid, "{:?}", report.audit.problem);
    assert_eq!(report.privacy.mode, "central");
    assert_eq!(report.cohorts.committed_rounds, 3);
    assert_eq!(report.cohorts.committed_below_k, 0);
    let last = rounds.last().unwrap()["epsilon"].as_f64().unwrap();
    assert!((report.privacy.epsilon_spent.unwrap() - last).abs() < 1e-9);
    let per_round: f64 = report.rounds.iter().filter_map(|r| r.epsilon_round).sum();
    assert!((per_round - last).abs() < 1e-9, "{per_round} vs {last}");
    assert_eq!(report.enrollments.enrolled_total, 4);
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("report.json")).unwrap()).unwrap();
    assert_eq!(json["audit"]["head"], report.audit.head.clone().unwrap());
    let html = std::fs::read_to_string(out.join("report.html")).unwrap();
    assert_eq!(html.matches("<svg").count(), 3, "three plots");
    assert!(html.contains("Verified: the hash chain"));
    assert!(html.contains("Cumulative privacy loss"));
}

/// The plan of [`zero_update_run`] under distributed DP: the 2NN, C = 1, z = 1, a
/// minimum cohort of 5 (the quorum) out of 10, 20 bits.
fn zero_update_plan() -> covey_privacy::distributed::DistributedPlan {
    use covey_privacy::{ClipNorm, accountant::NoiseMultiplier, distributed::DistributedPlan};
    DistributedPlan::new(
        199_210,
        ClipNorm::new(1.0).unwrap(),
        NoiseMultiplier::new(1.0).unwrap(),
        5,
        10,
        20,
        0,
    )
    .unwrap()
}

/// The planned per-coordinate noise std of those runs, for `participants`
/// clients out of an expected cohort of 10.
fn planned_std(participants: f64) -> f64 {
    let plan = zero_update_plan();
    plan.quantizer.gamma * plan.client_sigma * participants.sqrt() / 10.0
}

/// One round of 10 clients training the 2NN with learning rate 0, so every
/// true update is zero and the released model moves by noise alone: DP
/// `dp` with C = 1, z = 1, 20 bits, state kept in `state`, plus `extra`.
fn zero_update_run(dp: &str, state: &std::path::Path, extra: &[&str]) -> Vec<serde_json::Value> {
    let mut args = vec![
        "--model",
        "2nn",
        "--clients",
        "10",
        "--rounds",
        "1",
        "--epochs",
        "1",
        "--lr",
        "0",
        "--dp",
        dp,
        "--clip",
        "1",
        "--noise-multiplier",
        "1",
        "--bits",
        "20",
        "--state-dir",
        state.to_str().unwrap(),
    ];
    args.extend(extra);
    sim(&args)
}

/// Secure aggregation through the whole system: the server only ever holds
/// masked words, yet the released model carries exactly the clients'
/// summed noise. A mask left in the sum would make it uniform garbage.
#[test]
fn secure_aggregation_removes_every_mask_from_the_released_sum() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let rounds = zero_update_run("distributed", &state, &["--secagg", "--neighbors", "4"]);
    assert_eq!(rounds[0]["participants"], 10);
    let (mean, std, _) = released_noise(&state);
    let expected = planned_std(10.0);
    assert!(
        (std / expected - 1.0).abs() < 0.02,
        "noise std {std}, expected {expected}"
    );
    assert!(mean.abs() < 0.003, "noise mean {mean}");
}

/// Clients vanish at random phases of secure aggregation; rounds that lose
/// too many abort, and the first one that commits still releases exactly
/// its survivors' noise.
#[test]
fn secure_aggregation_survives_dropouts_at_random_phases() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let rounds = zero_update_run(
        "distributed",
        &state,
        &["--secagg", "--neighbors", "8", "--dropout", "0.2"],
    );
    let participants = rounds[0]["participants"].as_f64().unwrap();
    assert!((5.0..=10.0).contains(&participants), "{participants}");
    let (_, std, _) = released_noise(&state);
    let expected = planned_std(participants);
    assert!(
        (std / expected - 1.0).abs() < 0.02,
        "noise std {std}, expected {expected} for {participants} survivors"
    );
}

/// LoRA under secure aggregation and distributed DP: clipping, noise,
/// quantization and masks cover the adapters' trainable B alone (32,768
/// values of gpt2-bytes at r = 8), never the 3.3 M-value frozen base. With
/// a zero learning rate the released adapters are exactly the clients'
/// summed noise, sized for that length.
#[test]
fn lora_under_secure_aggregation_and_distributed_dp_noises_the_adapters_alone() {
    use covey_privacy::{ClipNorm, accountant::NoiseMultiplier, distributed::DistributedPlan};
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let rounds = sim(&[
        "--model",
        "gpt2-bytes",
        "--lora-rank",
        "8",
        "--context",
        "32",
        "--clients",
        "5",
        "--rounds",
        "1",
        "--epochs",
        "1",
        "--lr",
        "0",
        "--dp",
        "distributed",
        "--clip",
        "1",
        "--noise-multiplier",
        "1",
        "--bits",
        "20",
        "--secagg",
        "--neighbors",
        "4",
        "--state-dir",
        state.to_str().unwrap(),
    ]);
    assert_eq!(rounds.len(), 1);
    assert_eq!(rounds[0]["participants"], 5);
    assert!(rounds[0]["epsilon"].as_f64().unwrap() > 0.0);
    let (mean, std, store) = released_noise(&state);
    let weights = store
        .model(covey_protocol::ModelVersion(1))
        .unwrap()
        .weights;
    // B of c_attn (768 × 8) and attn.c_proj (256 × 8) in each of 4 layers.
    let trainable = 4 * (768 + 256) * 8;
    assert_eq!(weights.len(), trainable);
    // Quorum 3 (half of 5, rounded up) out of at most 5 clients.
    let plan = DistributedPlan::new(
        trainable as u64,
        ClipNorm::new(1.0).unwrap(),
        NoiseMultiplier::new(1.0).unwrap(),
        3,
        5,
        20,
        0,
    )
    .unwrap();
    let expected = plan.quantizer.gamma * plan.client_sigma * 5f64.sqrt() / 5.0;
    // 32,768 coordinates: the estimate's own error is about 0.4%.
    assert!(
        (std / expected - 1.0).abs() < 0.03,
        "noise std {std}, expected {expected}"
    );
    assert!(mean.abs() < 0.05 * expected, "noise mean {mean}");
    // Each client sent ring words for the adapters, not the base: 4 bytes a
    // value (32,768 is already a power of two, so no rotation padding).
    let up = rounds[0]["bytes_up"].as_f64().unwrap() / 5.0;
    let words = 4.0 * trainable as f64;
    assert!(
        up >= words && up < 1.25 * words,
        "{up} bytes up per client for {trainable} values"
    );
}

/// Secure aggregation without DP: updates clipped to --clip, quantized and
/// masked; the server applies the survivors' plain mean and the model
/// learns as it does without masks.
#[test]
fn secure_aggregation_without_dp_trains_like_plain_fedavg() {
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
        "--secagg",
        "--neighbors",
        "4",
        "--clip",
        "20",
    ]);
    assert_eq!(rounds.len(), 4);
    assert!(rounds.iter().all(|r| r["participants"] == 5));
    let best = rounds
        .iter()
        .map(|r| r["accuracy"].as_f64().unwrap())
        .fold(0.0, f64::max);
    assert!(best >= 0.90, "best test accuracy {best}");
}

/// covey-sim with `args`; its exit status, stdout and stderr.
fn sim_raw(args: &[&str], state: &std::path::Path) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_covey-sim"))
        .current_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
        .args(args)
        .arg("--state-dir")
        .arg(state)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn a_stopped_run_resumes_from_its_last_round() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let run = |extra: &[&str]| {
        let mut args = vec![
            "--model",
            "logreg",
            "--clients",
            "4",
            "--epochs",
            "1",
            "--seed",
            "2",
            "--json",
        ];
        args.extend_from_slice(extra);
        sim_raw(&args, &state)
    };
    let (ok, stdout, stderr) = run(&["--rounds", "2"]);
    assert!(ok, "{stderr}");
    assert_eq!(stdout.lines().count(), 2, "{stdout}");
    let version_2 = |state: &std::path::Path| {
        let store = covey_server::StateDir::new(state).open_store().unwrap();
        let model = store.model(covey_protocol::ids::ModelVersion(2)).unwrap();
        (store.current_version().unwrap().0, model.weights)
    };
    let (at, weights) = version_2(&state);
    assert_eq!(at, 2);

    // Refusals leave the stored run as it was.
    for (extra, needle) in [
        (
            &["--rounds", "3", "--resume", "--lr", "0.5"][..],
            "learning_rate = 0.5",
        ),
        (
            &["--rounds", "3", "--resume", "--fraction", "0.5"][..],
            "[rounds]",
        ),
        (&["--rounds", "2", "--resume"][..], "already at round 2"),
        (&["--rounds", "3"][..], "refusing to overwrite"),
    ] {
        let (ok, _, stderr) = run(extra);
        assert!(!ok, "{extra:?} was accepted");
        assert!(stderr.contains(needle), "{extra:?}: {stderr}");
    }
    assert_eq!(version_2(&state), (2, weights.clone()));

    let (ok, stdout, stderr) = run(&["--rounds", "3", "--resume"]);
    assert!(ok, "{stderr}");
    let rounds: Vec<serde_json::Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(rounds.len(), 1, "{stdout}");
    assert_eq!(rounds[0]["round"], 3);
    assert_eq!(rounds[0]["participants"], 4);
    let store = covey_server::StateDir::new(&state).open_store().unwrap();
    assert_eq!(store.current_version().unwrap().0, 3);
    assert_eq!(
        store
            .model(covey_protocol::ids::ModelVersion(2))
            .unwrap()
            .weights,
        weights
    );
}

#[test]
fn resume_needs_a_stored_run() {
    let dir = tempfile::tempdir().unwrap();
    let (ok, _, stderr) = sim_raw(&["--resume"], &dir.path().join("none"));
    assert!(!ok);
    assert!(stderr.contains("no run to resume"), "{stderr}");
    let out = Command::new(env!("CARGO_BIN_EXE_covey-sim"))
        .arg("--resume")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("--state-dir"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn a_byte_level_gpt_learns_shakespeare_roles_and_reports_perplexity() {
    let rounds = sim(&[
        "--model",
        "gpt2-bytes",
        "--clients",
        "3",
        "--rounds",
        "2",
        "--epochs",
        "1",
        "--batch",
        "8",
        "--context",
        "32",
        "--local-optimizer",
        "adam",
        "--lr",
        "0.003",
        "--seed",
        "2",
    ]);
    assert_eq!(rounds.len(), 2);
    for r in &rounds {
        assert_eq!(r["participants"], 3);
        let p = r["perplexity"].as_f64().unwrap();
        // Uniform over 256 bytes is 256; anything learnt is below it.
        assert!(p.is_finite() && p < 100.0, "perplexity {p} in {r}");
    }
    let (first, last) = (&rounds[0], &rounds[1]);
    assert!(
        last["loss"].as_f64() < first["loss"].as_f64(),
        "test loss did not fall: {first} then {last}"
    );
}

#[test]
fn language_flags_are_checked_against_the_data() {
    let out = Command::new(env!("CARGO_BIN_EXE_covey-sim"))
        .current_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
        .args(["--model", "gpt2-bytes", "--data", "examples/data/mnist"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("a language model trains on text"), "{err}");
    let out = Command::new(env!("CARGO_BIN_EXE_covey-sim"))
        .current_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
        .args(["--model", "gpt2-bytes", "--partition", "iid"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("natural"), "{err}");
    let out = Command::new(env!("CARGO_BIN_EXE_covey-sim"))
        .current_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
        .args(["--model", "cnn", "--lora-rank", "4"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("image classifier"),
        "{err}"
    );
}
