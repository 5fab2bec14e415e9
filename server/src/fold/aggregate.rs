//! Streaming aggregation and server optimizers.
//!
//! Updates are folded into one running weighted sum as they arrive, so the
//! server holds O(model) memory however many clients take part.

use serde::{Deserialize, Serialize};

#[derive(Debug, PartialEq, thiserror::Error)]
pub enum AggregateError {
    #[error("update has {got} values, the model has {expected}")]
    Length { expected: usize, got: usize },
    #[error("update weight {0} is not a positive finite number")]
    Weight(f64),
    #[error("no update was aggregated")]
    Empty,
    #[error("a sum holds a value or weight that is not finite")]
    NotFinite,
}

/// Σ wᵢ·Δᵢ and Σ wᵢ over the updates folded so far.
#[derive(Debug, PartialEq, Serialize, Deserialize)]
pub struct WeightedSum {
    sum: Vec<f32>,
    total_weight: f64,
    count: usize,
}

impl WeightedSum {
    pub fn new(len: usize) -> Self {
        Self {
            sum: vec![0.0; len],
            total_weight: 0.0,
            count: 0,
        }
    }

    pub fn count(&self) -> usize {
        self.count
    }

    pub fn len(&self) -> usize {
        self.sum.len()
    }

    pub fn is_empty(&self) -> bool {
        self.sum.is_empty()
    }

    /// Refuses a sum no fold could have produced: non-finite values, or a
    /// weight that is negative, not finite, or present without updates.
    pub fn check(&self) -> Result<(), AggregateError> {
        let weight_ok = self.total_weight.is_finite()
            && self.total_weight >= 0.0
            && (self.count > 0 || self.total_weight == 0.0);
        if !weight_ok || !self.sum.iter().all(|v| v.is_finite()) {
            return Err(AggregateError::NotFinite);
        }
        Ok(())
    }

    /// Adds another sum of the same round's updates in.
    pub fn merge(&mut self, other: &WeightedSum) -> Result<(), AggregateError> {
        if other.sum.len() != self.sum.len() {
            return Err(AggregateError::Length {
                expected: self.sum.len(),
                got: other.sum.len(),
            });
        }
        fold_into(&mut self.sum, &other.sum, 1.0);
        self.total_weight += other.total_weight;
        self.count += other.count;
        Ok(())
    }

    /// Adds `weight · update`.
    pub fn fold(&mut self, update: &[f32], weight: f64) -> Result<(), AggregateError> {
        if update.len() != self.sum.len() {
            return Err(AggregateError::Length {
                expected: self.sum.len(),
                got: update.len(),
            });
        }
        if !(weight.is_finite() && weight > 0.0) {
            return Err(AggregateError::Weight(weight));
        }
        fold_into(&mut self.sum, update, weight as f32);
        self.total_weight += weight;
        self.count += 1;
        Ok(())
    }

    /// The plain sum Σ wᵢ·Δᵢ, for a mean over a fixed denominator (DP).
    pub fn into_sum(self) -> Result<Vec<f32>, AggregateError> {
        if self.count == 0 {
            return Err(AggregateError::Empty);
        }
        Ok(self.sum)
    }

    /// The weighted mean Σ wᵢ·Δᵢ / Σ wᵢ (FedAvg's average update).
    pub fn mean(mut self) -> Result<Vec<f32>, AggregateError> {
        if self.count == 0 {
            return Err(AggregateError::Empty);
        }
        let inv = (1.0 / self.total_weight) as f32;
        self.sum.iter_mut().for_each(|v| *v *= inv);
        Ok(self.sum)
    }
}

/// `acc += weight * update`, written so the compiler vectorises it.
pub fn fold_into(acc: &mut [f32], update: &[f32], weight: f32) {
    for (a, u) in acc.iter_mut().zip(update) {
        *a += weight * u;
    }
}

/// Which server optimizer turns the mean update into the next model.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum OptimizerKind {
    /// x += η·Δ
    FedAvg { lr: f32 },
    /// m = β·m + Δ; x += η·m
    FedAvgM { lr: f32, momentum: f32 },
    /// Reddi et al. 2021, Algorithm 2 with Adam's second moment.
    FedAdam {
        lr: f32,
        beta1: f32,
        beta2: f32,
        tau: f32,
    },
    /// Reddi et al. 2021, Algorithm 2 with Yogi's second moment.
    FedYogi {
        lr: f32,
        beta1: f32,
        beta2: f32,
        tau: f32,
    },
}

/// Optimizer moments, stored with each committed version so a restarted
/// server continues exactly where it stopped.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct OptimizerState {
    pub m: Vec<f32>,
    pub v: Vec<f32>,
}

impl OptimizerKind {
    /// Applies the mean update `delta` to `model`.
    pub fn apply(&self, state: &mut OptimizerState, model: &mut [f32], delta: &[f32]) {
        let n = model.len();
        match *self {
            Self::FedAvg { lr } => fold_into(model, delta, lr),
            Self::FedAvgM { lr, momentum } => {
                state.m.resize(n, 0.0);
                for ((x, m), d) in model.iter_mut().zip(&mut state.m).zip(delta) {
                    *m = momentum * *m + d;
                    *x += lr * *m;
                }
            }
            Self::FedAdam {
                lr,
                beta1,
                beta2,
                tau,
            }
            | Self::FedYogi {
                lr,
                beta1,
                beta2,
                tau,
            } => {
                let yogi = matches!(self, Self::FedYogi { .. });
                state.m.resize(n, 0.0);
                // Reddi et al. start the second moment at v ≥ τ².
                state.v.resize(n, tau * tau);
                for (((x, m), v), &d) in model
                    .iter_mut()
                    .zip(&mut state.m)
                    .zip(&mut state.v)
                    .zip(delta)
                {
                    *m = beta1 * *m + (1.0 - beta1) * d;
                    let d2 = d * d;
                    *v = if yogi {
                        *v - (1.0 - beta2) * d2 * (*v - d2).signum()
                    } else {
                        beta2 * *v + (1.0 - beta2) * d2
                    };
                    *x += lr * *m / (v.sqrt() + tau);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn fedavg_weights_by_examples() {
        let mut s = WeightedSum::new(2);
        s.fold(&[1.0, 0.0], 1.0).unwrap();
        s.fold(&[4.0, 3.0], 2.0).unwrap();
        assert_eq!(s.mean().unwrap(), vec![3.0, 2.0]);
    }

    #[test]
    fn bad_folds_are_refused_and_leave_the_sum_alone() {
        let mut s = WeightedSum::new(2);
        assert_eq!(
            s.fold(&[1.0], 1.0),
            Err(AggregateError::Length {
                expected: 2,
                got: 1
            })
        );
        assert_eq!(s.fold(&[1.0, 1.0], 0.0), Err(AggregateError::Weight(0.0)));
        assert_eq!(s.count(), 0);
        assert_eq!(s.mean(), Err(AggregateError::Empty));
    }

    #[test]
    fn server_optimizers_follow_their_update_rules() {
        let delta = [0.5f32, -1.0];
        let mut state = OptimizerState::default();
        let mut x = vec![1.0f32, 1.0];
        OptimizerKind::FedAvgM {
            lr: 1.0,
            momentum: 0.5,
        }
        .apply(&mut state, &mut x, &delta);
        OptimizerKind::FedAvgM {
            lr: 1.0,
            momentum: 0.5,
        }
        .apply(&mut state, &mut x, &delta);
        // m1 = Δ, m2 = 0.5Δ + Δ = 1.5Δ; x = 1 + 2.5Δ.
        assert_eq!(x, vec![1.0 + 1.25, 1.0 - 2.5]);

        let adam = OptimizerKind::FedAdam {
            lr: 0.1,
            beta1: 0.9,
            beta2: 0.99,
            tau: 1e-3,
        };
        let mut state = OptimizerState::default();
        let mut x = vec![0.0f32, 0.0];
        adam.apply(&mut state, &mut x, &delta);
        for (i, d) in delta.iter().enumerate() {
            let m = 0.1 * d;
            let v = 0.99 * 1e-6 + 0.01 * d * d;
            let expected = 0.1 * m / (v.sqrt() + 1e-3);
            assert!((x[i] - expected).abs() < 1e-6, "{} vs {expected}", x[i]);
        }

        let yogi = OptimizerKind::FedYogi {
            lr: 0.1,
            beta1: 0.9,
            beta2: 0.99,
            tau: 1e-3,
        };
        let mut state = OptimizerState::default();
        let mut x = vec![0.0f32, 0.0];
        yogi.apply(&mut state, &mut x, &delta);
        for (i, d) in delta.iter().enumerate() {
            let v0 = 1e-6f32;
            let v = v0 - 0.01 * d * d * (v0 - d * d).signum();
            let expected = 0.1 * (0.1 * d) / (v.sqrt() + 1e-3);
            assert!((x[i] - expected).abs() < 1e-6);
        }
    }

    proptest! {
        #[test]
        fn streaming_mean_equals_batch_mean(
            updates in proptest::collection::vec((proptest::collection::vec(-10f32..10.0, 8), 1u32..1000), 1..20)
        ) {
            let mut s = WeightedSum::new(8);
            for (u, w) in &updates {
                s.fold(u, f64::from(*w)).unwrap();
            }
            let mean = s.mean().unwrap();
            let total: f64 = updates.iter().map(|(_, w)| f64::from(*w)).sum();
            for i in 0..8 {
                let exact: f64 = updates.iter().map(|(u, w)| f64::from(u[i]) * f64::from(*w)).sum::<f64>() / total;
                prop_assert!((f64::from(mean[i]) - exact).abs() < 1e-3 * (1.0 + exact.abs()));
            }
        }
    }
}
