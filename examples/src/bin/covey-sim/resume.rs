//! `--resume`: a long run kept in --state-dir goes on from its last
//! committed round, with the same settings.

use anyhow::{Context, Result, bail};
use covey_server::{ServerConfig, StateDir};

/// Checks that `state` holds an unfinished run made with `wanted`'s
/// settings, and lets it run to `wanted`'s round count. Returns the round
/// it stopped at.
pub fn resume(state: &StateDir, wanted: &ServerConfig) -> Result<u64> {
    let root = state.root().display();
    let stored = state
        .config()
        .with_context(|| format!("--resume: no run to resume in {root}"))?;
    let mut same_length = wanted.clone();
    same_length.rounds.rounds = stored.rounds.rounds;
    if let Some((kept, asked)) = first_difference(&stored, &same_length) {
        bail!(
            "--resume: the run in {root} was made with other settings: it has `{kept}`, these flags give `{asked}`"
        );
    }
    let version = state.open_store()?.current_version()?.0;
    if version >= wanted.rounds.rounds {
        bail!(
            "--resume: the run in {root} is already at round {version}; pass a --rounds above it to go on"
        );
    }
    if stored.rounds.rounds != wanted.rounds.rounds {
        state
            .replace_config(wanted)
            .context("--resume: updating the round count")?;
    }
    Ok(version)
}

/// The first setting, as `[section] key = value`, where two configs differ
/// as written to config.toml (what the server reads).
pub fn first_difference(a: &ServerConfig, b: &ServerConfig) -> Option<(String, String)> {
    let (a, b) = (a.to_documented_toml(), b.to_documented_toml());
    let (mut a, mut b) = (a.lines(), b.lines());
    let mut section = "";
    loop {
        match (a.next(), b.next()) {
            (None, None) => return None,
            (Some(x), Some(y)) if x == y => {
                if x.starts_with('[') {
                    section = x;
                }
            }
            (x, y) => {
                let show = |l: Option<&str>| format!("{section} {}", l.unwrap_or("(nothing)"));
                return Some((show(x), show(y)));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_different_setting_is_named_with_its_section() {
        let a = ServerConfig::default();
        assert_eq!(first_difference(&a, &a.clone()), None);
        let mut b = a.clone();
        b.training.learning_rate = 0.3;
        let (kept, asked) = first_difference(&a, &b).unwrap();
        assert!(kept.starts_with("[training] learning_rate"), "{kept}");
        assert!(
            asked.starts_with("[training] learning_rate = 0.3"),
            "{asked}"
        );
    }
}
