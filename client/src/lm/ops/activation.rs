//! GPT-2's tanh-GELU and LLaMA's SwiGLU gate, elementwise.

use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::{
    math::{exp, tanh},
    with_f32,
};
use crate::conv::contiguous_f32;

/// √(2/π), GELU's tanh-approximation constant.
const GELU_K: f32 = 0.797_884_6;
/// Entries per rayon task.
const CHUNK: usize = 1 << 14;

#[inline(always)]
pub(crate) fn gelu(x: f32) -> f32 {
    0.5 * x * (1.0 + tanh(GELU_K * (x + 0.044_715 * x * x * x)))
}

#[inline(always)]
pub(crate) fn gelu_grad(x: f32) -> f32 {
    let t = tanh(GELU_K * (x + 0.044_715 * x * x * x));
    0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * GELU_K * (1.0 + 3.0 * 0.044_715 * x * x)
}

#[inline(always)]
fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + exp(-x))
}

/// GELU in its tanh form (Hugging Face's `gelu_new`, GPT-2's).
pub fn gelu_tanh(x: &Tensor) -> Result<Tensor> {
    if x.device().is_cpu() {
        x.contiguous()?.apply_op1(Gelu)
    } else {
        gelu_tanh_portable(x)
    }
}

pub(crate) fn gelu_tanh_portable(x: &Tensor) -> Result<Tensor> {
    let cube = (x.sqr()? * x)?;
    let inner = ((x + (cube * 0.044_715)?)? * f64::from(GELU_K))?;
    (x * 0.5)? * (inner.tanh()? + 1.0)?
}

/// silu(gate) · up, LLaMA's MLP gate.
pub fn swiglu(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    if gate.dims() != up.dims() {
        candle_core::bail!("swiglu: gate {:?} against up {:?}", gate.dims(), up.dims());
    }
    if gate.device().is_cpu() {
        gate.contiguous()?.apply_op2(&up.contiguous()?, SwiGlu)
    } else {
        swiglu_portable(gate, up)
    }
}

pub(crate) fn swiglu_portable(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    gate.silu()? * up
}

#[derive(Clone, Copy, Debug)]
struct Gelu;

impl CustomOp1 for Gelu {
    fn name(&self) -> &'static str {
        "covey-gelu-tanh"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = contiguous_f32(s, l, self.name())?;
        let mut y = vec![0f32; x.len()];
        y.par_chunks_mut(CHUNK)
            .zip(x.par_chunks(CHUNK))
            .for_each(|(y, x)| y.iter_mut().zip(x).for_each(|(y, &x)| *y = gelu(x)));
        Ok((CpuStorage::F32(y), l.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        with_f32(x, self.name(), |xs| {
            with_f32(grad, self.name(), |g| {
                let mut dx = vec![0f32; xs.len()];
                dx.par_chunks_mut(CHUNK)
                    .zip(xs.par_chunks(CHUNK).zip(g.par_chunks(CHUNK)))
                    .for_each(|(d, (x, g))| {
                        for ((d, &x), &g) in d.iter_mut().zip(x).zip(g) {
                            *d = g * gelu_grad(x);
                        }
                    });
                Tensor::from_vec(dx, x.shape(), x.device()).map(Some)
            })
        })
    }
}

#[derive(Clone, Copy, Debug)]
struct SwiGlu;

impl CustomOp2 for SwiGlu {
    fn name(&self) -> &'static str {
        "covey-swiglu"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let g = contiguous_f32(s1, l1, self.name())?;
        let u = contiguous_f32(s2, l2, self.name())?;
        let mut y = vec![0f32; g.len()];
        y.par_chunks_mut(CHUNK)
            .zip(g.par_chunks(CHUNK).zip(u.par_chunks(CHUNK)))
            .for_each(|(y, (g, u))| {
                for ((y, &g), &u) in y.iter_mut().zip(g).zip(u) {
                    *y = g * sigmoid(g) * u;
                }
            });
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    fn bwd(
        &self,
        gate: &Tensor,
        up: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let name = self.name();
        with_f32(gate, name, |gs| {
            with_f32(up, name, |us| {
                with_f32(grad, name, |dy| {
                    let n = gs.len();
                    let (mut dg, mut du) = (vec![0f32; n], vec![0f32; n]);
                    dg.par_chunks_mut(CHUNK)
                        .zip(du.par_chunks_mut(CHUNK))
                        .enumerate()
                        .for_each(|(c, (dg, du))| {
                            let at = c * CHUNK;
                            for i in 0..dg.len() {
                                let (g, u, d) = (gs[at + i], us[at + i], dy[at + i]);
                                let s = sigmoid(g);
                                dg[i] = d * u * s * (1.0 + g * (1.0 - s));
                                du[i] = d * g * s;
                            }
                        });
                    let dg = gate
                        .track_op()
                        .then(|| Tensor::from_vec(dg, gate.shape(), gate.device()))
                        .transpose()?;
                    let du = up
                        .track_op()
                        .then(|| Tensor::from_vec(du, up.shape(), up.device()))
                        .transpose()?;
                    Ok((dg, du))
                })
            })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lm::ops::tests::{check_against_portable, var};

    #[test]
    fn gelu_matches_candle_ops_in_value_and_gradient() {
        for shape in [vec![5], vec![3, 70_000]] {
            let x = var(&shape, 1);
            let x3 = Var::from_tensor(&(x.as_tensor() * 3.0).unwrap()).unwrap();
            check_against_portable(
                &[&x3],
                || gelu_tanh(&x3).unwrap(),
                || gelu_tanh_portable(&x3).unwrap(),
                "gelu",
            );
        }
    }

    #[test]
    fn swiglu_matches_candle_ops_in_value_and_gradient() {
        let g = var(&[4, 9, 40], 1);
        let u = var(&[4, 9, 40], 2);
        check_against_portable(
            &[&g, &u],
            || swiglu(&g, &u).unwrap(),
            || swiglu_portable(&g, &u).unwrap(),
            "swiglu",
        );
        assert!(swiglu(&g, &var(&[4, 9, 41], 3)).is_err());
    }

    use candle_core::Var;
}
