//! L2 clipping of a whole update, the bound every DP mode relies on.

use serde::{Deserialize, Serialize};

/// A positive, finite L2 norm bound.
#[derive(Clone, Copy, Debug, PartialEq, PartialOrd, Serialize, Deserialize)]
#[serde(try_from = "f64", into = "f64")]
pub struct ClipNorm(f64);

#[derive(Debug, thiserror::Error)]
#[error("clip norm must be positive and finite, got {0}")]
pub struct InvalidClipNorm(pub f64);

impl ClipNorm {
    pub fn new(value: f64) -> Result<Self, InvalidClipNorm> {
        if value.is_finite() && value > 0.0 {
            Ok(Self(value))
        } else {
            Err(InvalidClipNorm(value))
        }
    }

    pub fn get(self) -> f64 {
        self.0
    }
}

impl TryFrom<f64> for ClipNorm {
    type Error = InvalidClipNorm;
    fn try_from(value: f64) -> Result<Self, Self::Error> {
        Self::new(value)
    }
}

impl From<ClipNorm> for f64 {
    fn from(c: ClipNorm) -> f64 {
        c.0
    }
}

/// L2 norm, accumulated in f64 so long vectors do not lose precision.
pub fn l2_norm(values: &[f32]) -> f64 {
    values
        .iter()
        .map(|&v| f64::from(v) * f64::from(v))
        .sum::<f64>()
        .sqrt()
}

/// Scales `values` so that its L2 norm is at most `bound`; returns the norm
/// before clipping.
///
/// The scale is shrunk until the f32 result provably satisfies the bound,
/// because rounding to f32 can otherwise leave the norm a hair above it.
pub fn clip_l2(values: &mut [f32], bound: ClipNorm) -> f64 {
    let norm = l2_norm(values);
    if norm <= bound.get() {
        return norm;
    }
    let mut scale = bound.get() / norm;
    loop {
        let scaled_norm = values
            .iter()
            .map(|&v| {
                let s = (f64::from(v) * scale) as f32;
                f64::from(s) * f64::from(s)
            })
            .sum::<f64>()
            .sqrt();
        if scaled_norm <= bound.get() {
            break;
        }
        scale *= 1.0 - 1e-7;
    }
    for v in values.iter_mut() {
        *v = (f64::from(*v) * scale) as f32;
    }
    norm
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn bad_bounds_are_refused() {
        for bad in [0.0, -1.0, f64::NAN, f64::INFINITY] {
            assert!(ClipNorm::new(bad).is_err());
        }
    }

    #[test]
    fn short_vectors_are_untouched() {
        let mut v = vec![0.3f32, 0.4];
        let before = clip_l2(&mut v, ClipNorm::new(1.0).unwrap());
        assert!((before - 0.5).abs() < 1e-6);
        assert_eq!(v, vec![0.3, 0.4]);
    }

    proptest! {
        #[test]
        fn clipping_bounds_the_norm_exactly(
            values in proptest::collection::vec(-1e3f32..1e3, 1..300),
            bound in 1e-3f64..10.0,
        ) {
            let mut v = values.clone();
            let bound = ClipNorm::new(bound).unwrap();
            clip_l2(&mut v, bound);
            prop_assert!(l2_norm(&v) <= bound.get());
            // Direction is preserved.
            for (a, b) in values.iter().zip(&v) {
                prop_assert!(a.signum() == b.signum() || *b == 0.0);
            }
        }
    }
}
