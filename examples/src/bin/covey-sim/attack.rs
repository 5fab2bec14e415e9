//! Simulated attacks by virtual clients, against which the robust
//! aggregators are measured.

use covey_privacy::l2_norm;

/// What a malicious virtual client does to its update.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Attack {
    None,
    /// Sends −Δ.
    SignFlip,
    /// Sends F·Δ.
    Scale(f32),
    /// Trains on labels mapped l → 9 − l.
    LabelFlip,
    /// Sends Gaussian noise with Δ's norm.
    Noise,
}

impl std::str::FromStr for Attack {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(match s {
            "none" => Self::None,
            "sign-flip" => Self::SignFlip,
            "label-flip" => Self::LabelFlip,
            "noise" => Self::Noise,
            _ => match s.strip_prefix("scale:").map(str::parse::<f32>) {
                Some(Ok(f)) if f.is_finite() => Self::Scale(f),
                _ => {
                    return Err(format!(
                        "unknown attack '{s}': expected none, sign-flip, scale:F, label-flip or noise"
                    ));
                }
            },
        })
    }
}

impl Attack {
    /// Rewrites an honest update the way this attacker would.
    pub fn apply(self, delta: &mut [f32], rng: &mut impl rand::Rng) {
        match self {
            Self::None | Self::LabelFlip => {}
            Self::SignFlip => delta.iter_mut().for_each(|v| *v = -*v),
            Self::Scale(f) => delta.iter_mut().for_each(|v| *v *= f),
            Self::Noise => {
                let norm = l2_norm(delta);
                let normal = rand_distr::StandardNormal;
                delta
                    .iter_mut()
                    .for_each(|v| *v = rand_distr::Distribution::<f32>::sample(&normal, rng));
                let scale = norm / l2_norm(delta).max(f64::MIN_POSITIVE);
                delta
                    .iter_mut()
                    .for_each(|v| *v = (f64::from(*v) * scale) as f32);
            }
        }
    }
}
