//! How the devices' learning rate falls as the model's versions grow.
//!
//! Devices restart their optimizer every round, so a rate that suits the
//! first rounds keeps pulling each device as far toward its own data late in
//! the run, and the average stops improving (client drift). Lowering the rate
//! the server sends is how FedAvg anneals (BENCHMARKS.md, "Shakespeare").
//! The rate is a function of the base version a device trains from, not of
//! the round id, so aborted rounds and a restart do not move it.

use std::fmt;

use covey_protocol::ModelVersion;

/// `training.learning_rate_decay`, parsed.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Decay {
    /// The configured rate throughout.
    None,
    /// The rate times `factor` once per `every` versions: η·factor^⌊v/every⌋.
    Step { every: u64, factor: f32 },
    /// From the rate down to `floor` times it along half a cosine over the
    /// run's `rounds` versions (Loshchilov & Hutter), then `floor` times it.
    Cosine { floor: f32, rounds: u64 },
}

/// Why a `learning_rate_decay` setting was refused.
#[derive(Debug, thiserror::Error, PartialEq)]
#[error(
    "'{given}': {why}; expected none, step:EVERY:FACTOR (e.g. step:40:0.25) or cosine:FLOOR (e.g. cosine:0.1)"
)]
pub struct DecayError {
    given: String,
    why: &'static str,
}

impl Decay {
    /// Parses `none`, `step:EVERY:FACTOR` or `cosine:FLOOR`; `rounds` is the
    /// run's length, which a cosine spans.
    pub fn parse(given: &str, rounds: u64) -> Result<Self, DecayError> {
        let refuse = |why| DecayError {
            given: given.to_owned(),
            why,
        };
        let mut parts = given.split(':');
        let decay = match (parts.next(), parts.next(), parts.next(), parts.next()) {
            (Some("none"), None, None, None) => Self::None,
            (Some("step"), Some(every), Some(factor), None) => {
                let every: u64 = every
                    .parse()
                    .map_err(|_| refuse("EVERY must be a whole number of versions"))?;
                let factor: f32 = factor
                    .parse()
                    .map_err(|_| refuse("FACTOR must be a number"))?;
                if every == 0 {
                    return Err(refuse("EVERY must be at least 1"));
                }
                if !(factor > 0.0 && factor <= 1.0) {
                    return Err(refuse("FACTOR must be in (0, 1]"));
                }
                Self::Step { every, factor }
            }
            (Some("cosine"), Some(floor), None, None) => {
                let floor: f32 = floor
                    .parse()
                    .map_err(|_| refuse("FLOOR must be a number"))?;
                if !(0.0..=1.0).contains(&floor) {
                    return Err(refuse("FLOOR must be in [0, 1]"));
                }
                Self::Cosine {
                    floor,
                    rounds: rounds.max(1),
                }
            }
            _ => return Err(refuse("unknown form")),
        };
        Ok(decay)
    }

    /// The rate for a device training from `base`, given the configured one.
    pub fn rate(&self, rate: f32, base: ModelVersion) -> f32 {
        match *self {
            Self::None => rate,
            Self::Step { every, factor } => {
                let steps = i32::try_from(base.0 / every).unwrap_or(i32::MAX);
                rate * factor.powi(steps)
            }
            Self::Cosine { floor, rounds } => {
                let done = (base.0 as f64 / rounds as f64).min(1.0);
                let cosine = 0.5 * (1.0 + (std::f64::consts::PI * done).cos());
                rate * (f64::from(floor) + (1.0 - f64::from(floor)) * cosine) as f32
            }
        }
    }
}

impl fmt::Display for Decay {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::None => write!(f, "none"),
            Self::Step { every, factor } => write!(f, "step:{every}:{factor}"),
            Self::Cosine { floor, .. } => write!(f, "cosine:{floor}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(d: &Decay, v: u64) -> f32 {
        d.rate(0.5, ModelVersion(v))
    }

    #[test]
    fn step_multiplies_once_per_period() {
        let d = Decay::parse("step:40:0.25", 100).unwrap();
        assert_eq!(
            d,
            Decay::Step {
                every: 40,
                factor: 0.25
            }
        );
        assert_eq!([at(&d, 0), at(&d, 39)], [0.5, 0.5]);
        assert_eq!([at(&d, 40), at(&d, 79)], [0.125, 0.125]);
        assert_eq!(at(&d, 80), 0.03125);
        // Far past any run's length the rate underflows to 0, never NaN.
        assert_eq!(at(&d, u64::MAX), 0.0);
    }

    #[test]
    fn cosine_runs_from_the_rate_to_its_floor_over_the_run() {
        let d = Decay::parse("cosine:0.1", 100).unwrap();
        assert_eq!(at(&d, 0), 0.5);
        assert!((at(&d, 50) - 0.5 * 0.55).abs() < 1e-6, "{}", at(&d, 50));
        assert!((at(&d, 100) - 0.05).abs() < 1e-7);
        // Versions past the planned rounds (a resumed, longer run) stay at
        // the floor.
        assert!((at(&d, 500) - 0.05).abs() < 1e-7);
        // It only falls.
        let rates: Vec<f32> = (0..=100).map(|v| at(&d, v)).collect();
        assert!(rates.windows(2).all(|w| w[1] <= w[0]));
    }

    #[test]
    fn none_keeps_the_rate_and_every_form_prints_as_written() {
        let d = Decay::parse("none", 10).unwrap();
        assert_eq!(at(&d, 1_000_000), 0.5);
        for s in ["none", "step:40:0.25", "cosine:0.1"] {
            assert_eq!(Decay::parse(s, 10).unwrap().to_string(), s);
        }
    }

    #[test]
    fn bad_settings_are_refused_with_the_reason() {
        for (given, why) in [
            ("linear", "unknown form"),
            ("step:0:0.5", "EVERY must be at least 1"),
            ("step:ten:0.5", "EVERY must be a whole number"),
            ("step:10:1.5", "FACTOR must be in (0, 1]"),
            ("step:10:NaN", "FACTOR must be in (0, 1]"),
            ("step:10", "unknown form"),
            ("cosine:-0.1", "FLOOR must be in [0, 1]"),
            ("cosine:0.1:3", "unknown form"),
        ] {
            let e = Decay::parse(given, 10).unwrap_err().to_string();
            assert!(e.contains(why) && e.contains(given), "{given}: {e}");
        }
    }
}
