//! Partial sums: what a part of the federation (a leaf aggregator, or the
//! single server's own round) holds of a round, and what a leaf forwards to
//! the root. It is the sum of the updates it accepted, never one update,
//! with how many went in. Partial sums from any number of leaves merge into
//! the round's sum: exactly for ring words, whose addition modulo 2^bits is
//! associative and commutative, and within float rounding for floats.

use covey_protocol::secagg::prg::ring_mask;
use serde::{Deserialize, Serialize};

use covey_privacy::quantize::Quantizer;

use super::{
    aggregate::{AggregateError, WeightedSum},
    robust::Aggregator,
};

/// The running aggregate of a round.
pub enum Aggregate {
    /// A running sum: floats, or ring words (distributed DP, secure
    /// aggregation).
    Summed(Summed),
    /// A robust rule: every update of the round, with its weight. It needs
    /// them all at once, so it cannot be split across leaves.
    Buffered {
        updates: Vec<Vec<f32>>,
        weights: Vec<f64>,
    },
}

impl Aggregate {
    /// The empty aggregate a round starts with: ring words when updates
    /// arrive quantized, every update when the rule needs them all at once,
    /// a running weighted sum otherwise.
    pub fn empty(ring: Option<Quantizer>, aggregator: Aggregator, len: usize) -> Self {
        match ring {
            Some(quantizer) => Self::Summed(Summed::Ring {
                words: vec![0; quantizer.encoded_len()],
                bits: quantizer.bits,
                count: 0,
            }),
            None if !aggregator.is_streaming() => Self::Buffered {
                updates: Vec::new(),
                weights: Vec::new(),
            },
            None => Self::Summed(Summed::Floats(WeightedSum::new(len))),
        }
    }

    /// How many participants' updates are in it.
    pub fn contributors(&self) -> usize {
        match self {
            Self::Summed(summed) => usize::try_from(summed.count()).unwrap_or(usize::MAX),
            Self::Buffered { updates, .. } => updates.len(),
        }
    }
}

/// The summed updates.
#[derive(Debug, PartialEq, Serialize, Deserialize)]
pub enum Summed {
    /// Σ wᵢ·Δᵢ over float updates, with Σ wᵢ.
    Floats(WeightedSum),
    /// The sum modulo 2^bits of ring words (distributed DP, or the total a
    /// leaf's secure aggregation unmasked), over `count` updates.
    Ring {
        words: Vec<u32>,
        bits: u32,
        count: u64,
    },
}

/// The round's bookkeeping beside the sum: training loss reported with the
/// updates, weighted as the updates are, and how many updates were within
/// the clip before clipping (adaptive clipping's count).
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Tally {
    pub loss_weighted: f64,
    pub loss_weight: f64,
    pub within_clip: u64,
}

impl Tally {
    /// The weighted mean training loss, if any update reported one.
    pub fn mean_loss(&self) -> Option<f32> {
        (self.loss_weight > 0.0).then(|| (self.loss_weighted / self.loss_weight) as f32)
    }

    fn merge(&mut self, other: &Tally) {
        self.loss_weighted += other.loss_weighted;
        self.loss_weight += other.loss_weight;
        self.within_clip += other.within_clip;
    }
}

/// A part's sum of one round, as a leaf sends it to the root.
#[derive(Debug, PartialEq, Serialize, Deserialize)]
pub struct PartialSum {
    pub summed: Summed,
    pub tally: Tally,
}

/// What the root expects of every partial sum of a round.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Shape {
    Floats { len: usize },
    Ring { len: usize, bits: u32 },
}

#[derive(Debug, PartialEq, thiserror::Error)]
pub enum MergeError {
    #[error("a partial sum of {got} does not fit a round of {expected}")]
    Kind {
        expected: &'static str,
        got: &'static str,
    },
    #[error("a partial sum has {got} values, the round {expected}")]
    Length { expected: usize, got: usize },
    #[error("a partial sum is modulo 2^{got}, the round 2^{expected}")]
    Bits { expected: u32, got: u32 },
    #[error("a partial sum's word {index} ({value}) is not below 2^{bits}")]
    OutOfRange { index: usize, value: u32, bits: u32 },
    #[error("a partial sum's {0} is not a finite number")]
    NotFinite(&'static str),
    #[error("a partial sum does not decode: {0}")]
    Decode(String),
    #[error(transparent)]
    Aggregate(#[from] AggregateError),
}

impl Summed {
    fn kind(&self) -> &'static str {
        match self {
            Self::Floats(_) => "floats",
            Self::Ring { .. } => "ring words",
        }
    }

    /// How many updates are in it.
    pub fn count(&self) -> u64 {
        match self {
            Self::Floats(sum) => sum.count() as u64,
            Self::Ring { count, .. } => *count,
        }
    }

    /// Refuses anything that does not fit `shape`, or that no honest part
    /// could have summed: non-finite floats, words out of their ring.
    pub fn check(&self, shape: Shape) -> Result<(), MergeError> {
        match (self, shape) {
            (Self::Floats(sum), Shape::Floats { len }) => {
                if sum.len() != len {
                    return Err(MergeError::Length {
                        expected: len,
                        got: sum.len(),
                    });
                }
                sum.check().map_err(MergeError::from)
            }
            (Self::Ring { words, bits, .. }, Shape::Ring { len, bits: want }) => {
                if *bits != want {
                    return Err(MergeError::Bits {
                        expected: want,
                        got: *bits,
                    });
                }
                if words.len() != len {
                    return Err(MergeError::Length {
                        expected: len,
                        got: words.len(),
                    });
                }
                let mask = ring_mask(want);
                match words.iter().enumerate().find(|(_, w)| **w & !mask != 0) {
                    Some((index, &value)) => Err(MergeError::OutOfRange {
                        index,
                        value,
                        bits: want,
                    }),
                    None => Ok(()),
                }
            }
            (got, Shape::Floats { .. }) => Err(MergeError::Kind {
                expected: "floats",
                got: got.kind(),
            }),
            (got, Shape::Ring { .. }) => Err(MergeError::Kind {
                expected: "ring words",
                got: got.kind(),
            }),
        }
    }

    /// Adds `other` in. Both must have the same shape.
    pub fn merge(&mut self, other: &Summed) -> Result<(), MergeError> {
        match (self, other) {
            (Self::Floats(sum), Self::Floats(o)) => sum.merge(o).map_err(MergeError::from),
            (
                Self::Ring { words, bits, count },
                Self::Ring {
                    words: o,
                    bits: ob,
                    count: oc,
                },
            ) => {
                if *bits != *ob {
                    return Err(MergeError::Bits {
                        expected: *bits,
                        got: *ob,
                    });
                }
                if words.len() != o.len() {
                    return Err(MergeError::Length {
                        expected: words.len(),
                        got: o.len(),
                    });
                }
                let mask = ring_mask(*bits);
                for (w, v) in words.iter_mut().zip(o) {
                    *w = w.wrapping_add(*v) & mask;
                }
                *count += oc;
                Ok(())
            }
            (mine, theirs) => Err(MergeError::Kind {
                expected: mine.kind(),
                got: theirs.kind(),
            }),
        }
    }
}

impl PartialSum {
    /// Adds another part's sum in, after checking it against this one.
    pub fn merge(&mut self, other: &PartialSum) -> Result<(), MergeError> {
        self.summed.merge(&other.summed)?;
        self.tally.merge(&other.tally);
        Ok(())
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        // Plain data with no maps or floats-as-keys: encoding cannot fail.
        postcard::to_allocvec(self).unwrap_or_default()
    }

    /// Decodes a part's message and checks it against the round's `shape`.
    pub fn from_bytes(bytes: &[u8], shape: Shape) -> Result<Self, MergeError> {
        let partial: PartialSum =
            postcard::from_bytes(bytes).map_err(|e| MergeError::Decode(e.to_string()))?;
        partial.summed.check(shape)?;
        let t = partial.tally;
        if !(t.loss_weighted.is_finite() && t.loss_weight.is_finite() && t.loss_weight >= 0.0) {
            return Err(MergeError::NotFinite("loss tally"));
        }
        if t.within_clip > partial.summed.count() {
            return Err(MergeError::Decode(format!(
                "{} updates within the clip out of {}",
                t.within_clip,
                partial.summed.count()
            )));
        }
        Ok(partial)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn floats(updates: &[(Vec<f32>, f64)], len: usize) -> PartialSum {
        let mut sum = WeightedSum::new(len);
        let mut tally = Tally::default();
        for (u, w) in updates {
            sum.fold(u, *w).unwrap();
            tally.loss_weighted += 0.5 * w;
            tally.loss_weight += w;
            tally.within_clip += 1;
        }
        PartialSum {
            summed: Summed::Floats(sum),
            tally,
        }
    }

    fn ring(updates: &[Vec<u32>], len: usize, bits: u32) -> PartialSum {
        let mut words = vec![0u32; len];
        for u in updates {
            for (w, v) in words.iter_mut().zip(u) {
                *w = w.wrapping_add(*v) & ring_mask(bits);
            }
        }
        PartialSum {
            summed: Summed::Ring {
                words,
                bits,
                count: updates.len() as u64,
            },
            tally: Tally::default(),
        }
    }

    /// Splits `n` items among three leaves by `leaf_of`.
    fn split<T: Clone>(items: &[T], leaf_of: &[u8]) -> [Vec<T>; 3] {
        let mut leaves: [Vec<T>; 3] = Default::default();
        for (item, leaf) in items.iter().zip(leaf_of.iter().cycle()) {
            leaves[usize::from(*leaf % 3)].push(item.clone());
        }
        leaves
    }

    proptest! {
        #[test]
        fn ring_sums_over_three_leaves_equal_the_single_servers_exactly(
            bits in 8u32..=32,
            updates in proptest::collection::vec(proptest::collection::vec(any::<u32>(), 16), 1..30),
            leaf_of in proptest::collection::vec(any::<u8>(), 1..30),
        ) {
            let mask = ring_mask(bits);
            let updates: Vec<Vec<u32>> =
                updates.into_iter().map(|u| u.into_iter().map(|v| v & mask).collect()).collect();
            let single = ring(&updates, 16, bits);
            let leaves = split(&updates, &leaf_of);
            let mut root = ring(&[], 16, bits);
            for leaf in &leaves {
                let forwarded = ring(leaf, 16, bits).to_bytes();
                let decoded = PartialSum::from_bytes(&forwarded, Shape::Ring { len: 16, bits }).unwrap();
                root.merge(&decoded).unwrap();
            }
            prop_assert_eq!(root, single);
        }

        #[test]
        fn float_sums_over_three_leaves_equal_the_single_servers_within_rounding(
            updates in proptest::collection::vec(
                (proptest::collection::vec(-10f32..10.0, 8), 1u32..1000), 1..30),
            leaf_of in proptest::collection::vec(any::<u8>(), 1..30),
        ) {
            let updates: Vec<(Vec<f32>, f64)> =
                updates.into_iter().map(|(u, w)| (u, f64::from(w))).collect();
            let single = floats(&updates, 8);
            let leaves = split(&updates, &leaf_of);
            let mut root = floats(&[], 8);
            for leaf in &leaves {
                let forwarded = floats(leaf, 8).to_bytes();
                let decoded = PartialSum::from_bytes(&forwarded, Shape::Floats { len: 8 }).unwrap();
                root.merge(&decoded).unwrap();
            }
            prop_assert_eq!(root.tally.within_clip, single.tally.within_clip);
            prop_assert!((root.tally.loss_weight - single.tally.loss_weight).abs() < 1e-9);
            let (Summed::Floats(r), Summed::Floats(s)) = (root.summed, single.summed) else {
                unreachable!()
            };
            prop_assert_eq!(r.count(), s.count());
            let (r, s) = (r.mean().unwrap(), s.mean().unwrap());
            for (a, b) in r.iter().zip(&s) {
                prop_assert!((a - b).abs() <= 1e-4 * (1.0 + b.abs()), "{a} vs {b}");
            }
        }

        #[test]
        fn garbage_never_decodes_into_a_partial_sum_that_does_not_fit(
            bytes in proptest::collection::vec(any::<u8>(), 0..256),
        ) {
            for shape in [Shape::Floats { len: 4 }, Shape::Ring { len: 4, bits: 12 }] {
                if let Ok(p) = PartialSum::from_bytes(&bytes, shape) {
                    prop_assert!(p.summed.check(shape).is_ok());
                }
            }
        }
    }

    #[test]
    fn partial_sums_that_do_not_fit_the_round_are_refused_by_name() {
        let floats4 = floats(&[(vec![1.0; 4], 1.0)], 4).to_bytes();
        let err = PartialSum::from_bytes(&floats4, Shape::Floats { len: 5 }).unwrap_err();
        assert_eq!(
            err,
            MergeError::Length {
                expected: 5,
                got: 4
            }
        );
        let err = PartialSum::from_bytes(&floats4, Shape::Ring { len: 4, bits: 12 }).unwrap_err();
        assert!(err.to_string().contains("floats"), "{err}");
        let ring12 = ring(&[vec![7; 4]], 4, 12).to_bytes();
        let err = PartialSum::from_bytes(&ring12, Shape::Ring { len: 4, bits: 16 }).unwrap_err();
        assert_eq!(
            err,
            MergeError::Bits {
                expected: 16,
                got: 12
            }
        );
        let mut wide = ring(&[vec![7; 4]], 4, 12);
        if let Summed::Ring { words, .. } = &mut wide.summed {
            words[2] = 1 << 12;
        }
        let err =
            PartialSum::from_bytes(&wide.to_bytes(), Shape::Ring { len: 4, bits: 12 }).unwrap_err();
        assert!(
            matches!(err, MergeError::OutOfRange { index: 2, .. }),
            "{err}"
        );
        let mut nan = floats(&[(vec![1.0; 4], 1.0)], 4);
        nan.tally.loss_weighted = f64::NAN;
        let err = PartialSum::from_bytes(&nan.to_bytes(), Shape::Floats { len: 4 }).unwrap_err();
        assert_eq!(err, MergeError::NotFinite("loss tally"));
        assert!(matches!(
            PartialSum::from_bytes(&[0xff; 3], Shape::Floats { len: 4 }),
            Err(MergeError::Decode(_))
        ));
    }
}
