//! The RDP and PLD accountants against Google's dp_accounting on a spread of
//! (q, z, T, δ). The reference values come from
//! `privacy/reference/rdp_reference.py` and `privacy/reference/pld_reference.py`.

use covey_privacy::accountant::{Delta, NoiseMultiplier, SamplingRate, dp_fedavg_epsilon};
use covey_privacy::pld::pld_epsilon;

/// One reference case: (q, z, T, δ) and dp_accounting's ε.
struct Case {
    q: SamplingRate,
    z: NoiseMultiplier,
    steps: u64,
    delta: Delta,
    epsilon: f64,
}

/// The cases of a committed reference file, at least 150 of them.
fn cases(text: &str) -> Vec<Case> {
    let reference: serde_json::Value = serde_json::from_str(text).unwrap();
    let rows = reference["rows"].as_array().unwrap();
    assert!(rows.len() >= 150, "only {} reference rows", rows.len());
    rows.iter()
        .map(|row| Case {
            q: SamplingRate::new(row["q"].as_f64().unwrap()).unwrap(),
            z: NoiseMultiplier::new(row["z"].as_f64().unwrap()).unwrap(),
            steps: row["steps"].as_u64().unwrap(),
            delta: Delta::new(row["delta"].as_f64().unwrap()).unwrap(),
            epsilon: row["epsilon"].as_f64().unwrap(),
        })
        .collect()
}

#[test]
fn rdp_agrees_with_dp_accounting_within_one_percent_and_never_below() {
    let mut worst = (0.0f64, String::new());
    for Case {
        q,
        z,
        steps,
        delta,
        epsilon: expected,
    } in cases(include_str!("data/rdp_reference.json"))
    {
        let ours = dp_fedavg_epsilon(q, z, steps, delta).get();
        let case = format!(
            "q={} z={} T={steps} δ={}: ours {ours}, dp_accounting {expected}",
            q.get(),
            z.get(),
            delta.get()
        );
        // Both use the same orders. Where dp_accounting's fractional series
        // does not converge it drops the order (and warns), so it can come
        // out a hair larger; ours below it by more than 0.01% would be a bug.
        let gap = ours / expected - 1.0;
        assert!(gap > -1e-4, "below the reference: {case}");
        assert!(gap < 0.01, "{case}");
        if gap.abs() > worst.0 {
            worst = (gap.abs(), case);
        }
    }
    eprintln!("largest gap: {:.4}% ({})", worst.0 * 100.0, worst.1);
}

#[test]
fn pld_agrees_with_dp_accounting_within_one_percent() {
    let mut worst = (0.0f64, String::new());
    for Case {
        q,
        z,
        steps,
        delta,
        epsilon: expected,
    } in cases(include_str!("data/pld_reference.json"))
    {
        let ours = pld_epsilon(q, z, steps, delta)
            .expect("a finite epsilon")
            .get();
        let case = format!(
            "q={} z={} T={steps} δ={}: ours {ours}, dp_accounting {expected}",
            q.get(),
            z.get(),
            delta.get()
        );
        let gap = ours / expected - 1.0;
        assert!(gap.abs() < 0.01, "{case}");
        // PLD is the tighter accountant: never above RDP on the same case.
        let rdp = dp_fedavg_epsilon(q, z, steps, delta).get();
        assert!(ours <= rdp * 1.0001, "PLD above RDP ({rdp}): {case}");
        if gap.abs() > worst.0 {
            worst = (gap.abs(), case);
        }
    }
    eprintln!("largest gap: {:.4}% ({})", worst.0 * 100.0, worst.1);
}
