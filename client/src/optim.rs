//! Plain SGD, w ← w − η·g, with the update made in place on the CPU.
//!
//! candle_nn's SGD computes η·g, then w − η·g, then copies that into w: two
//! allocations and three passes over every parameter per step, which at
//! batch 10 cost the CNN as much as a large share of its matrix products.

use candle_core::{CpuStorage, InplaceOp2, Layout, Result, Var, backprop::GradStore};

use rayon::prelude::*;

use crate::conv::contiguous_f32;

/// w ← w − η·g over one contiguous f32 tensor.
#[derive(Clone, Copy, Debug)]
struct SgdStep {
    learning_rate: f32,
}

impl InplaceOp2 for SgdStep {
    fn name(&self) -> &'static str {
        "covey-sgd-step"
    }

    fn cpu_fwd(
        &self,
        s1: &mut CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<()> {
        let grad = contiguous_f32(s2, l2, self.name())?;
        let (Some((start, end)), CpuStorage::F32(weights)) = (l1.contiguous_offsets(), s1) else {
            candle_core::bail!("{} needs contiguous f32 weights", self.name());
        };
        let weights = &mut weights[start..end];
        if weights.len() != grad.len() {
            candle_core::bail!(
                "{}: {} weights against {} gradients",
                self.name(),
                weights.len(),
                grad.len()
            );
        }
        // Chunks of 16 K entries: enough work per task for rayon's overhead.
        weights
            .par_chunks_mut(1 << 14)
            .zip(grad.par_chunks(1 << 14))
            .for_each(|(w, g)| {
                for (w, g) in w.iter_mut().zip(g) {
                    *w -= self.learning_rate * g;
                }
            });
        Ok(())
    }
}

/// Stochastic gradient descent over a model's variables.
pub struct Sgd {
    vars: Vec<Var>,
    learning_rate: f64,
}

impl Sgd {
    pub fn new(vars: Vec<Var>, learning_rate: f64) -> Self {
        Self {
            vars,
            learning_rate,
        }
    }

    /// Backpropagates `loss` and takes one step.
    pub fn backward_step(&mut self, loss: &candle_core::Tensor) -> Result<()> {
        self.step(&loss.backward()?)
    }

    pub fn step(&mut self, grads: &GradStore) -> Result<()> {
        for var in &self.vars {
            let Some(grad) = grads.get(var) else {
                continue;
            };
            if var.device().is_cpu() {
                var.as_tensor().inplace_op2(
                    &grad.contiguous()?,
                    &SgdStep {
                        learning_rate: self.learning_rate as f32,
                    },
                )?;
            } else {
                var.set(&var.sub(&(grad * self.learning_rate)?)?)?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::conv::tests::{max_gap, random};
    use candle_nn::Optimizer;

    /// Two steps of a small quadratic-ish loss land where candle_nn's SGD does.
    #[test]
    fn steps_match_candle_nn() {
        let start = random(&[5, 7], 1);
        let target = random(&[5, 7], 2);
        let ours = Var::from_tensor(&start.copy().unwrap()).unwrap();
        let theirs = Var::from_tensor(&start.copy().unwrap()).unwrap();
        let mut sgd = Sgd::new(vec![ours.clone()], 0.3);
        let mut reference = candle_nn::SGD::new(vec![theirs.clone()], 0.3).unwrap();
        for _ in 0..2 {
            let loss = |v: &Var| {
                (v.as_tensor() - &target)
                    .unwrap()
                    .sqr()
                    .unwrap()
                    .tanh()
                    .unwrap()
                    .sum_all()
                    .unwrap()
            };
            sgd.backward_step(&loss(&ours)).unwrap();
            reference.backward_step(&loss(&theirs)).unwrap();
        }
        assert!(max_gap(ours.as_tensor(), theirs.as_tensor()) < 1e-6);
        assert!(max_gap(ours.as_tensor(), &start) > 1e-2, "it moved");
    }

    #[test]
    fn a_variable_without_gradient_stays() {
        let used = Var::from_tensor(&random(&[3], 1)).unwrap();
        let unused = Var::from_tensor(&random(&[3], 2)).unwrap();
        let before = unused.as_tensor().copy().unwrap();
        let mut sgd = Sgd::new(vec![used.clone(), unused.clone()], 0.1);
        sgd.backward_step(&used.as_tensor().sum_all().unwrap())
            .unwrap();
        assert_eq!(max_gap(unused.as_tensor(), &before), 0.0);
    }
}
