//! Update encodings: how an update's f32 values become bytes on the wire.
//!
//! The task names the encoding, so the server decides the trade between
//! bandwidth and precision for the whole cohort.

use std::{fmt, str::FromStr};

use half::{bf16, f16};
use rand::Rng;
use serde::{Deserialize, Serialize};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum UpdateEncoding {
    /// 4 bytes a value, exact.
    F32,
    /// IEEE half precision, 2 bytes a value.
    F16,
    /// bfloat16: f32's range with 8 bits of mantissa, 2 bytes a value.
    Bf16,
    /// One signed byte a value plus an f32 scale per chunk; stochastic
    /// rounding keeps each value unbiased.
    Int8,
}

#[derive(Debug, PartialEq, thiserror::Error)]
pub enum EncodingError {
    #[error("{encoding} chunk of {values} values needs {expected} bytes, got {actual}")]
    WrongLength {
        encoding: UpdateEncoding,
        values: usize,
        expected: usize,
        actual: usize,
    },
    #[error("int8 chunk scale {0} is not a finite non-negative number")]
    BadScale(f32),
}

impl UpdateEncoding {
    pub const ALL: [Self; 4] = [Self::F32, Self::F16, Self::Bf16, Self::Int8];

    /// Bytes that `values` values take in this encoding.
    pub fn encoded_len(self, values: usize) -> usize {
        match self {
            Self::F32 => 4 * values,
            Self::F16 | Self::Bf16 => 2 * values,
            Self::Int8 => 4 + values,
        }
    }

    /// Appends the encoding of `values` to `out`. Only `Int8` draws from `rng`.
    pub fn encode(self, values: &[f32], rng: &mut impl Rng, out: &mut Vec<u8>) {
        out.reserve(self.encoded_len(values.len()));
        match self {
            Self::F32 => values
                .iter()
                .for_each(|v| out.extend_from_slice(&v.to_le_bytes())),
            Self::F16 => values
                .iter()
                .for_each(|v| out.extend_from_slice(&f16::from_f32(*v).to_le_bytes())),
            Self::Bf16 => values
                .iter()
                .for_each(|v| out.extend_from_slice(&bf16::from_f32(*v).to_le_bytes())),
            Self::Int8 => {
                let max = values
                    .iter()
                    .filter(|v| v.is_finite())
                    .fold(0f32, |m, v| m.max(v.abs()));
                let scale = max / 127.0;
                out.extend_from_slice(&scale.to_le_bytes());
                for &v in values {
                    let q = if scale > 0.0 && v.is_finite() {
                        let x = (v / scale).clamp(-127.0, 127.0);
                        let low = x.floor();
                        let up = rng.random::<f32>() < x - low;
                        (low + f32::from(u8::from(up))).clamp(-127.0, 127.0) as i8
                    } else {
                        0
                    };
                    out.push(q as u8);
                }
            }
        }
    }

    /// Decodes exactly `out.len()` values from `bytes`.
    pub fn decode(self, bytes: &[u8], out: &mut [f32]) -> Result<(), EncodingError> {
        let expected = self.encoded_len(out.len());
        if bytes.len() != expected {
            return Err(EncodingError::WrongLength {
                encoding: self,
                values: out.len(),
                expected,
                actual: bytes.len(),
            });
        }
        match self {
            Self::F32 => {
                for (o, b) in out.iter_mut().zip(bytes.chunks_exact(4)) {
                    *o = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
                }
            }
            Self::F16 => {
                for (o, b) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                    *o = f16::from_le_bytes([b[0], b[1]]).to_f32();
                }
            }
            Self::Bf16 => {
                for (o, b) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                    *o = bf16::from_le_bytes([b[0], b[1]]).to_f32();
                }
            }
            Self::Int8 => {
                let scale = f32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]);
                if !(scale.is_finite() && scale >= 0.0) {
                    return Err(EncodingError::BadScale(scale));
                }
                for (o, &b) in out.iter_mut().zip(&bytes[4..]) {
                    *o = f32::from(b as i8) * scale;
                }
            }
        }
        Ok(())
    }
}

impl fmt::Display for UpdateEncoding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::F32 => "f32",
            Self::F16 => "f16",
            Self::Bf16 => "bf16",
            Self::Int8 => "int8",
        })
    }
}

impl FromStr for UpdateEncoding {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "f32" => Ok(Self::F32),
            "f16" => Ok(Self::F16),
            "bf16" => Ok(Self::Bf16),
            "int8" => Ok(Self::Int8),
            other => Err(format!(
                "unknown update encoding '{other}': expected f32, f16, bf16 or int8"
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;

    fn round_trip(enc: UpdateEncoding, values: &[f32], seed: u64) -> Vec<f32> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut bytes = Vec::new();
        enc.encode(values, &mut rng, &mut bytes);
        assert_eq!(bytes.len(), enc.encoded_len(values.len()));
        let mut out = vec![0.0; values.len()];
        enc.decode(&bytes, &mut out).unwrap();
        out
    }

    proptest! {
        #[test]
        fn f32_is_exact(values in proptest::collection::vec(any::<f32>(), 0..200)) {
            let out = round_trip(UpdateEncoding::F32, &values, 0);
            for (a, b) in values.iter().zip(&out) {
                prop_assert_eq!(a.to_bits(), b.to_bits());
            }
        }

        #[test]
        fn half_precisions_are_close(values in proptest::collection::vec(-1e4f32..1e4, 0..200)) {
            for (enc, rel) in [(UpdateEncoding::F16, 1e-3f32), (UpdateEncoding::Bf16, 8e-3)] {
                let out = round_trip(enc, &values, 0);
                for (a, b) in values.iter().zip(&out) {
                    prop_assert!((a - b).abs() <= rel * a.abs() + 1e-4, "{enc}: {a} vs {b}");
                }
            }
        }

        #[test]
        fn int8_error_is_within_one_step(values in proptest::collection::vec(-10f32..10.0, 1..200), seed in any::<u64>()) {
            let out = round_trip(UpdateEncoding::Int8, &values, seed);
            let step = values.iter().fold(0f32, |m, v| m.max(v.abs())) / 127.0;
            for (a, b) in values.iter().zip(&out) {
                prop_assert!((a - b).abs() <= step * 1.0001 + 1e-7);
            }
        }

        #[test]
        fn decode_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..64), n in 0usize..40) {
            for enc in UpdateEncoding::ALL {
                let mut out = vec![0.0; n];
                let _ = enc.decode(&bytes, &mut out);
            }
        }
    }

    #[test]
    fn int8_stochastic_rounding_is_unbiased() {
        // 0.3 of a step: the mean of many roundings must approach 0.3 steps.
        let values = vec![127.0f32 * 0.3 / 127.0; 1]
            .into_iter()
            .chain(std::iter::once(1.0))
            .collect::<Vec<_>>();
        let trials = 20_000;
        let mut mean = 0.0f64;
        for seed in 0..trials {
            mean += f64::from(round_trip(UpdateEncoding::Int8, &values, seed)[0]);
        }
        mean /= trials as f64;
        let expected = f64::from(values[0]);
        let step = 1.0 / 127.0;
        // Std of one rounding is at most step/2; 5 sigma over 20k trials.
        assert!((mean - expected).abs() < 5.0 * step * 0.5 / (trials as f64).sqrt());
    }

    #[test]
    fn wrong_lengths_and_bad_scales_are_named() {
        let mut out = vec![0.0; 3];
        let err = UpdateEncoding::F16.decode(&[0; 5], &mut out).unwrap_err();
        assert_eq!(
            err.to_string(),
            "f16 chunk of 3 values needs 6 bytes, got 5"
        );
        let mut bad = f32::NAN.to_le_bytes().to_vec();
        bad.extend([1, 2, 3]);
        assert!(matches!(
            UpdateEncoding::Int8.decode(&bad, &mut out),
            Err(EncodingError::BadScale(_))
        ));
    }

    #[test]
    fn names_parse() {
        for e in UpdateEncoding::ALL {
            assert_eq!(e.to_string().parse::<UpdateEncoding>().unwrap(), e);
        }
        assert!("fp8".parse::<UpdateEncoding>().is_err());
    }
}
