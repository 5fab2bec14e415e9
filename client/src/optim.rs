//! The local optimizers, SGD and Adam, with the update made in place on
//! the CPU.
//!
//! candle_nn's SGD computes η·g, then w − η·g, then copies that into w: two
//! allocations and three passes over every parameter per step, which at
//! batch 10 cost the CNN as much as a large share of its matrix products.
//! Adam's moments are plain vectors beside each variable for the same reason.

use std::sync::{Arc, Mutex};

use candle_core::{CpuStorage, InplaceOp2, Layout, Result, Tensor, Var, backprop::GradStore};
use covey_protocol::message::LocalOptimizer;

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

/// A local optimizer over a model's variables.
pub trait Optimizer: Send {
    /// One step from the gradients in `grads`.
    fn step(&mut self, grads: &GradStore) -> Result<()>;

    /// Backpropagates `loss` and takes one step.
    fn backward_step(&mut self, loss: &Tensor) -> Result<()> {
        self.step(&loss.backward()?)
    }
}

/// The optimizer a task asks for, over `vars`, at `learning_rate`.
pub fn optimizer(kind: LocalOptimizer, vars: Vec<Var>, learning_rate: f64) -> Box<dyn Optimizer> {
    match kind {
        LocalOptimizer::Sgd => Box::new(Sgd::new(vars, learning_rate)),
        LocalOptimizer::Adam {
            beta1,
            beta2,
            epsilon,
            weight_decay,
        } => Box::new(Adam::new(
            vars,
            AdamStep {
                learning_rate: learning_rate as f32,
                beta1,
                beta2,
                epsilon,
                weight_decay,
                correction1: 1.0,
                correction2: 1.0,
            },
        )),
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
}

impl Optimizer for Sgd {
    fn step(&mut self, grads: &GradStore) -> Result<()> {
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

/// Adam's first and second moments of one variable.
#[derive(Debug, Default)]
struct Moments {
    m: Vec<f32>,
    v: Vec<f32>,
}

/// One AdamW step, w ← w − η·(m̂ / (√v̂ + ε) + λ·w), over one contiguous
/// f32 tensor whose moments the step updates.
#[derive(Clone, Debug)]
struct AdamStep {
    learning_rate: f32,
    beta1: f32,
    beta2: f32,
    epsilon: f32,
    weight_decay: f32,
    /// 1 − β₁ᵗ and 1 − β₂ᵗ, the bias corrections.
    correction1: f32,
    correction2: f32,
}

/// [`AdamStep`] bound to the moments it updates.
struct AdamInPlace<'a> {
    step: &'a AdamStep,
    moments: &'a Mutex<Moments>,
}

impl InplaceOp2 for AdamInPlace<'_> {
    fn name(&self) -> &'static str {
        "covey-adam-step"
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
        let mut moments = self
            .moments
            .lock()
            .map_err(|_| candle_core::Error::Msg("Adam's moments were poisoned".into()))?;
        let Moments { m, v } = &mut *moments;
        if m.len() != weights.len() {
            *m = vec![0.0; weights.len()];
            *v = vec![0.0; weights.len()];
        }
        let s = self.step;
        let chunk = 1 << 14;
        weights
            .par_chunks_mut(chunk)
            .zip(grad.par_chunks(chunk))
            .zip(m.par_chunks_mut(chunk).zip(v.par_chunks_mut(chunk)))
            .for_each(|((w, g), (m, v))| {
                for i in 0..w.len() {
                    m[i] = s.beta1 * m[i] + (1.0 - s.beta1) * g[i];
                    v[i] = s.beta2 * v[i] + (1.0 - s.beta2) * g[i] * g[i];
                    let update =
                        (m[i] / s.correction1) / ((v[i] / s.correction2).sqrt() + s.epsilon);
                    w[i] -= s.learning_rate * (update + s.weight_decay * w[i]);
                }
            });
        Ok(())
    }
}

/// Adam with decoupled weight decay (Loshchilov & Hutter 2019), as
/// PyTorch's AdamW computes it.
pub struct Adam {
    vars: Vec<Var>,
    moments: Vec<Arc<Mutex<Moments>>>,
    /// Moments as tensors, off the CPU.
    tensors: Vec<Option<(Tensor, Tensor)>>,
    step: AdamStep,
    t: i32,
}

impl Adam {
    fn new(vars: Vec<Var>, step: AdamStep) -> Self {
        Self {
            moments: vars.iter().map(|_| Arc::default()).collect(),
            tensors: vars.iter().map(|_| None).collect(),
            vars,
            step,
            t: 0,
        }
    }
}

impl Optimizer for Adam {
    fn step(&mut self, grads: &GradStore) -> Result<()> {
        self.t += 1;
        self.step.correction1 = 1.0 - self.step.beta1.powi(self.t);
        self.step.correction2 = 1.0 - self.step.beta2.powi(self.t);
        let s = &self.step;
        for ((var, moments), tensors) in self.vars.iter().zip(&self.moments).zip(&mut self.tensors)
        {
            let Some(grad) = grads.get(var) else {
                continue;
            };
            if var.device().is_cpu() {
                var.as_tensor()
                    .inplace_op2(&grad.contiguous()?, &AdamInPlace { step: s, moments })?;
                continue;
            }
            let (m, v) = match tensors.take() {
                Some(mv) => mv,
                None => (grad.zeros_like()?, grad.zeros_like()?),
            };
            let m = ((m * f64::from(s.beta1))? + (grad * f64::from(1.0 - s.beta1))?)?;
            let v = ((v * f64::from(s.beta2))? + (grad.sqr()? * f64::from(1.0 - s.beta2))?)?;
            let update = ((&m / f64::from(s.correction1))?
                / ((&v / f64::from(s.correction2))?.sqrt()? + f64::from(s.epsilon))?)?;
            let decayed = (update + (var.as_tensor() * f64::from(s.weight_decay))?)?;
            var.set(&var.sub(&(decayed * f64::from(s.learning_rate))?)?)?;
            *tensors = Some((m, v));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::conv::tests::{max_gap, random};
    use candle_nn::Optimizer as _;

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

    /// Three AdamW steps land where candle_nn's AdamW (PyTorch's formula) does.
    #[test]
    fn adam_matches_candle_nn() {
        let start = random(&[70_000], 3);
        let target = random(&[70_000], 4);
        let ours = Var::from_tensor(&start.copy().unwrap()).unwrap();
        let theirs = Var::from_tensor(&start.copy().unwrap()).unwrap();
        let kind = LocalOptimizer::Adam {
            beta1: 0.9,
            beta2: 0.99,
            epsilon: 1e-6,
            weight_decay: 0.1,
        };
        let mut adam = optimizer(kind, vec![ours.clone()], 0.01);
        let params = candle_nn::ParamsAdamW {
            lr: 0.01,
            beta1: 0.9,
            beta2: 0.99,
            eps: 1e-6,
            weight_decay: 0.1,
        };
        let mut reference = candle_nn::AdamW::new(vec![theirs.clone()], params).unwrap();
        let loss = |v: &Var| {
            (v.as_tensor() - &target)
                .unwrap()
                .sqr()
                .unwrap()
                .sum_all()
                .unwrap()
        };
        for _ in 0..3 {
            adam.backward_step(&loss(&ours)).unwrap();
            reference.backward_step(&loss(&theirs)).unwrap();
        }
        assert!(max_gap(ours.as_tensor(), theirs.as_tensor()) < 1e-5);
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
