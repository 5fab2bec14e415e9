//! Shamir secret sharing of 32-byte secrets over the prime field 2^61 − 1.
//!
//! Written here because the maintained crates either share byte by byte in
//! GF(256), which caps holders at 255, or pull in an elliptic-curve stack
//! for a field this small.

use rand::RngCore;
use serde::{Deserialize, Serialize};

/// The Mersenne prime 2^61 − 1: reduction is a shift and an add.
const P: u64 = (1 << 61) - 1;
/// Bytes of secret per field element; 7 bytes stay below P.
const LIMB_BYTES: usize = 7;
pub const SECRET_LEN: usize = 32;
const LIMBS: usize = SECRET_LEN.div_ceil(LIMB_BYTES);

/// One holder's share: the polynomials evaluated at `x` (never 0).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Share {
    pub x: u32,
    pub y: [u64; LIMBS],
}

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum ShamirError {
    #[error("threshold {threshold} must be between 1 and the {holders} holders")]
    Threshold { threshold: usize, holders: usize },
    #[error("share coordinates must be non-zero and distinct")]
    BadCoordinates,
    #[error("{got} shares cannot reconstruct a secret of threshold {threshold}")]
    TooFewShares { got: usize, threshold: usize },
    #[error("the shares do not lie on one polynomial: some are corrupt")]
    Inconsistent,
}

fn add(a: u64, b: u64) -> u64 {
    let s = a + b;
    if s >= P { s - P } else { s }
}

fn sub(a: u64, b: u64) -> u64 {
    if a >= b { a - b } else { a + P - b }
}

fn mul(a: u64, b: u64) -> u64 {
    let t = u128::from(a) * u128::from(b);
    let r = (t as u64 & P) + (t >> 61) as u64;
    if r >= P { r - P } else { r }
}

fn pow(mut a: u64, mut e: u64) -> u64 {
    let mut r = 1;
    while e > 0 {
        if e & 1 == 1 {
            r = mul(r, a);
        }
        a = mul(a, a);
        e >>= 1;
    }
    r
}

fn inv(a: u64) -> u64 {
    pow(a, P - 2)
}

fn random_element(rng: &mut impl RngCore) -> u64 {
    loop {
        let v = rng.next_u64() & P;
        if v < P {
            return v;
        }
    }
}

fn to_limbs(secret: &[u8; SECRET_LEN]) -> [u64; LIMBS] {
    let mut limbs = [0u64; LIMBS];
    for (limb, chunk) in limbs.iter_mut().zip(secret.chunks(LIMB_BYTES)) {
        let mut bytes = [0u8; 8];
        bytes[..chunk.len()].copy_from_slice(chunk);
        *limb = u64::from_le_bytes(bytes);
    }
    limbs
}

fn from_limbs(limbs: &[u64; LIMBS]) -> Result<[u8; SECRET_LEN], ShamirError> {
    let mut secret = [0u8; SECRET_LEN];
    for (limb, chunk) in limbs.iter().zip(secret.chunks_mut(LIMB_BYTES)) {
        if *limb >> (8 * chunk.len()) != 0 {
            return Err(ShamirError::Inconsistent);
        }
        chunk.copy_from_slice(&limb.to_le_bytes()[..chunk.len()]);
    }
    Ok(secret)
}

fn check_coordinates(xs: impl Iterator<Item = u32>) -> Result<(), ShamirError> {
    let mut seen = std::collections::BTreeSet::new();
    for x in xs {
        if x == 0 || !seen.insert(x) {
            return Err(ShamirError::BadCoordinates);
        }
    }
    Ok(())
}

/// Splits `secret` so that any `threshold` of the shares at `xs` rebuild
/// it and fewer reveal nothing.
pub fn split(
    secret: &[u8; SECRET_LEN],
    threshold: usize,
    xs: &[u32],
    rng: &mut impl RngCore,
) -> Result<Vec<Share>, ShamirError> {
    if threshold == 0 || threshold > xs.len() {
        return Err(ShamirError::Threshold {
            threshold,
            holders: xs.len(),
        });
    }
    check_coordinates(xs.iter().copied())?;
    let secret = to_limbs(secret);
    // coefficients[l][0] is the secret limb l; the rest are random.
    let coefficients: Vec<Vec<u64>> = secret
        .iter()
        .map(|&s| {
            std::iter::once(s)
                .chain((1..threshold).map(|_| random_element(rng)))
                .collect()
        })
        .collect();
    Ok(xs
        .iter()
        .map(|&x| {
            let xf = u64::from(x);
            let mut y = [0u64; LIMBS];
            for (yl, coeffs) in y.iter_mut().zip(&coefficients) {
                *yl = coeffs.iter().rev().fold(0, |acc, &c| add(mul(acc, xf), c));
            }
            Share { x, y }
        })
        .collect())
}

/// Lagrange weights of `xs` for evaluating at `at`.
fn lagrange(xs: &[u64], at: u64) -> Vec<u64> {
    xs.iter()
        .enumerate()
        .map(|(i, &xi)| {
            let (mut num, mut den) = (1, 1);
            for (j, &xj) in xs.iter().enumerate() {
                if i != j {
                    num = mul(num, sub(at, xj));
                    den = mul(den, sub(xi, xj));
                }
            }
            mul(num, inv(den))
        })
        .collect()
}

/// Rebuilds the secret from at least `threshold` shares. Shares beyond the
/// threshold are checked against the polynomial the first ones define, so
/// a corrupt share is an error rather than a wrong secret.
pub fn combine(shares: &[Share], threshold: usize) -> Result<[u8; SECRET_LEN], ShamirError> {
    if threshold == 0 || shares.len() < threshold {
        return Err(ShamirError::TooFewShares {
            got: shares.len(),
            threshold,
        });
    }
    check_coordinates(shares.iter().map(|s| s.x))?;
    let (basis, extra) = shares.split_at(threshold);
    let xs: Vec<u64> = basis.iter().map(|s| u64::from(s.x)).collect();
    let interpolate = |at: u64| -> [u64; LIMBS] {
        let weights = lagrange(&xs, at);
        let mut out = [0u64; LIMBS];
        for (l, o) in out.iter_mut().enumerate() {
            *o = basis
                .iter()
                .zip(&weights)
                .fold(0, |acc, (s, &w)| add(acc, mul(s.y[l], w)));
        }
        out
    };
    for share in extra {
        if interpolate(u64::from(share.x)) != share.y {
            return Err(ShamirError::Inconsistent);
        }
    }
    from_limbs(&interpolate(0))
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;
    use rand::RngCore;
    use rand::{SeedableRng, seq::SliceRandom};
    use rand_chacha::ChaCha20Rng;

    use super::*;

    proptest! {
        #[test]
        fn any_threshold_subset_rebuilds_the_secret(
            secret in any::<[u8; 32]>(),
            holders in 1usize..40,
            threshold_frac in 0.0f64..1.0,
            seed in any::<u64>(),
        ) {
            let threshold = 1 + ((holders - 1) as f64 * threshold_frac) as usize;
            let mut rng = ChaCha20Rng::seed_from_u64(seed);
            let xs: Vec<u32> = (1..=holders as u32).map(|i| i * 7).collect();
            let mut shares = split(&secret, threshold, &xs, &mut rng).unwrap();
            shares.shuffle(&mut rng);
            let extra = rng.next_u32() as usize % (holders - threshold + 1);
            prop_assert_eq!(combine(&shares[..threshold + extra], threshold).unwrap(), secret);
            if threshold > 1 {
                prop_assert!(combine(&shares[..threshold - 1], threshold).is_err());
            }
        }

        #[test]
        fn a_corrupt_share_is_caught_when_there_is_a_spare(
            secret in any::<[u8; 32]>(),
            seed in any::<u64>(),
            limb in 0usize..LIMBS,
        ) {
            let mut rng = ChaCha20Rng::seed_from_u64(seed);
            let mut shares = split(&secret, 3, &[1, 2, 3, 4], &mut rng).unwrap();
            shares[3].y[limb] = add(shares[3].y[limb], 1);
            prop_assert_eq!(combine(&shares, 3), Err(ShamirError::Inconsistent));
        }
    }

    #[test]
    fn bad_parameters_are_named() {
        let mut rng = ChaCha20Rng::seed_from_u64(1);
        assert_eq!(
            split(&[1; 32], 3, &[1, 2], &mut rng),
            Err(ShamirError::Threshold {
                threshold: 3,
                holders: 2
            })
        );
        assert_eq!(
            split(&[1; 32], 1, &[0, 2], &mut rng),
            Err(ShamirError::BadCoordinates)
        );
        let shares = split(&[1; 32], 2, &[1, 2], &mut rng).unwrap();
        assert_eq!(
            combine(&[shares[0].clone(), shares[0].clone()], 2),
            Err(ShamirError::BadCoordinates)
        );
    }

    #[test]
    fn field_arithmetic_holds() {
        for a in [1, 2, P - 1, 123_456_789_012_345] {
            assert_eq!(mul(a, inv(a)), 1);
            assert_eq!(add(a, sub(0, a)), 0);
        }
    }
}
