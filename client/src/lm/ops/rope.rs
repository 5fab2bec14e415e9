//! Rotary position embeddings (Su et al. 2021) in Hugging Face's
//! rotate-half layout: dimension i of a head pairs with i + D/2.

use std::sync::Arc;

use candle_core::{CpuStorage, CustomOp1, Device, Layout, Result, Shape, Tensor};

use super::{par_rows, with_f32};
use crate::conv::contiguous_f32;

/// cos and sin of position · frequency, [positions, D/2] each.
#[derive(Debug)]
pub struct Rotary {
    half: usize,
    positions: usize,
    cos: Vec<f32>,
    sin: Vec<f32>,
}

impl Rotary {
    /// Tables for `positions` positions from a head's inverse frequencies.
    pub fn new(inverse_frequencies: &[f64], positions: usize) -> Self {
        let half = inverse_frequencies.len();
        let mut cos = Vec::with_capacity(positions * half);
        let mut sin = Vec::with_capacity(positions * half);
        for p in 0..positions {
            for f in inverse_frequencies {
                // As Hugging Face computes them: angles in f32.
                let angle = p as f32 * *f as f32;
                cos.push(angle.cos());
                sin.push(angle.sin());
            }
        }
        Self {
            half,
            positions,
            cos,
            sin,
        }
    }

    fn tables(&self, t: usize, device: &Device) -> Result<(Tensor, Tensor)> {
        let n = t * self.half;
        Ok((
            Tensor::from_slice(&self.cos[..n], (t, 1, self.half), device)?,
            Tensor::from_slice(&self.sin[..n], (t, 1, self.half), device)?,
        ))
    }
}

/// Rotates every head of x [B·T, H·D], rows in sequences of `seq_len`,
/// by its position's angles.
pub fn rope(x: &Tensor, rotary: &Arc<Rotary>, heads: usize, seq_len: usize) -> Result<Tensor> {
    let (n, width) = x.dims2()?;
    let t = seq_len;
    if heads == 0
        || width != heads * 2 * rotary.half
        || t == 0
        || t > rotary.positions
        || !n.is_multiple_of(t)
    {
        candle_core::bail!(
            "rope: {heads} heads over width {width}, {n} rows in sequences of {t}, tables of {} × {}",
            rotary.positions,
            2 * rotary.half
        );
    }
    if x.device().is_cpu() {
        x.contiguous()?.apply_op1(Rope {
            rotary: rotary.clone(),
            inverse: false,
            seq_len: t,
        })
    } else {
        rope_portable(x, rotary, heads, t)
    }
}

pub(crate) fn rope_portable(
    x: &Tensor,
    rotary: &Rotary,
    heads: usize,
    seq_len: usize,
) -> Result<Tensor> {
    let (n, width) = x.dims2()?;
    let (b, t) = (n / seq_len, seq_len);
    let half = rotary.half;
    let x = x.reshape((b, t, heads, 2 * half))?;
    let (x1, x2) = (x.narrow(3, 0, half)?, x.narrow(3, half, half)?);
    let (cos, sin) = rotary.tables(t, x.device())?;
    let first = (x1.broadcast_mul(&cos)? - x2.broadcast_mul(&sin)?)?;
    let second = (x2.broadcast_mul(&cos)? + x1.broadcast_mul(&sin)?)?;
    Tensor::cat(&[first, second], 3)?.reshape((n, width))
}

#[derive(Clone, Debug)]
struct Rope {
    rotary: Arc<Rotary>,
    /// The rotation's transpose (by −angle): its backward.
    inverse: bool,
    seq_len: usize,
}

impl Rope {
    fn apply(&self, x: &[f32], t: usize, width: usize) -> Vec<f32> {
        let half = self.rotary.half;
        let sign = if self.inverse { -1.0 } else { 1.0 };
        let mut y = vec![0f32; x.len()];
        par_rows(&mut y, width, |r, out| {
            let pos = r % t;
            let cos = &self.rotary.cos[pos * half..(pos + 1) * half];
            let sin = &self.rotary.sin[pos * half..(pos + 1) * half];
            let row = &x[r * width..(r + 1) * width];
            for (head_in, head_out) in row
                .chunks_exact(2 * half)
                .zip(out.chunks_exact_mut(2 * half))
            {
                for i in 0..half {
                    let (a, b) = (head_in[i], head_in[i + half]);
                    let s = sign * sin[i];
                    head_out[i] = a * cos[i] - b * s;
                    head_out[i + half] = b * cos[i] + a * s;
                }
            }
        });
        y
    }
}

impl CustomOp1 for Rope {
    fn name(&self) -> &'static str {
        "covey-rope"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = contiguous_f32(s, l, self.name())?;
        let (_, width) = l.shape().dims2()?;
        Ok((
            CpuStorage::F32(self.apply(x, self.seq_len, width)),
            l.shape().clone(),
        ))
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let (_, width) = x.dims2()?;
        let t = self.seq_len;
        let inverse = Rope {
            rotary: self.rotary.clone(),
            inverse: !self.inverse,
            seq_len: t,
        };
        with_f32(grad, self.name(), |g| {
            Tensor::from_vec(inverse.apply(g, t, width), x.shape(), x.device()).map(Some)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lm::ops::tests::{check_against_portable, var};

    #[test]
    fn fused_rope_matches_candle_ops_in_value_and_gradient() {
        let freqs: Vec<f64> = (0..4)
            .map(|i| 1.0 / 10_000f64.powf(i as f64 / 4.0))
            .collect();
        let rotary = Arc::new(Rotary::new(&freqs, 32));
        let x = var(&[2 * 7, 3 * 8], 1);
        check_against_portable(
            &[&x],
            || rope(&x, &rotary, 3, 7).unwrap(),
            || rope_portable(&x, &rotary, 3, 7).unwrap(),
            "rope",
        );
        assert!(
            rope(&var(&[40, 8], 2), &rotary, 1, 40).is_err(),
            "beyond the tables"
        );
        assert!(rope(&x, &rotary, 2, 7).is_err(), "wrong head count");
        assert!(
            rope(&x, &rotary, 3, 5).is_err(),
            "rows not in whole sequences"
        );
    }

    #[test]
    fn position_zero_is_left_as_it_is() {
        let rotary = Arc::new(Rotary::new(&[1.0, 0.5], 4));
        let x = var(&[1, 4], 3);
        let y = rope(&x, &rotary, 1, 1).unwrap();
        crate::lm::ops::tests::close(&y, x.as_tensor(), 1e-7, "position 0");
    }
}
