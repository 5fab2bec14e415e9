//! LayerNorm (GPT-2) and RMSNorm (LLaMA) over the last dimension.

use candle_core::{CpuStorage, CustomOp2, CustomOp3, D, Layout, Result, Shape, Tensor};

use super::{par_row_sums, par_rows, with_f32};

/// y = (x − mean) / sqrt(var + eps) · weight + bias, per row of the last
/// dimension.
pub fn layer_norm(x: &Tensor, weight: &Tensor, bias: &Tensor, eps: f64) -> Result<Tensor> {
    let c = x.dim(D::Minus1)?;
    if weight.dims() != [c] || bias.dims() != [c] {
        candle_core::bail!(
            "layer_norm: width {c} against weight {:?} and bias {:?}",
            weight.dims(),
            bias.dims()
        );
    }
    if x.device().is_cpu() {
        x.contiguous()?.apply_op3(
            &weight.contiguous()?,
            &bias.contiguous()?,
            LayerNorm { eps: eps as f32 },
        )
    } else {
        layer_norm_portable(x, weight, bias, eps)
    }
}

pub(crate) fn layer_norm_portable(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    eps: f64,
) -> Result<Tensor> {
    let centred = x.broadcast_sub(&x.mean_keepdim(D::Minus1)?)?;
    let var = centred.sqr()?.mean_keepdim(D::Minus1)?;
    centred
        .broadcast_div(&(var + eps)?.sqrt()?)?
        .broadcast_mul(weight)?
        .broadcast_add(bias)
}

/// y = x / sqrt(mean(x²) + eps) · weight, per row of the last dimension.
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    let c = x.dim(D::Minus1)?;
    if weight.dims() != [c] {
        candle_core::bail!("rms_norm: width {c} against weight {:?}", weight.dims());
    }
    if x.device().is_cpu() {
        x.contiguous()?
            .apply_op2(&weight.contiguous()?, RmsNorm { eps: eps as f32 })
    } else {
        rms_norm_portable(x, weight, eps)
    }
}

pub(crate) fn rms_norm_portable(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    let ms = x.sqr()?.mean_keepdim(D::Minus1)?;
    x.broadcast_div(&(ms + eps)?.sqrt()?)?.broadcast_mul(weight)
}

/// Mean and 1/sqrt(var + eps) of one row.
fn moments(row: &[f32], eps: f32) -> (f32, f32) {
    let n = row.len() as f32;
    let mean = row.iter().sum::<f32>() / n;
    let var = row.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / n;
    (mean, 1.0 / (var + eps).sqrt())
}

fn rms(row: &[f32], eps: f32) -> f32 {
    let ms = row.iter().map(|v| v * v).sum::<f32>() / row.len() as f32;
    1.0 / (ms + eps).sqrt()
}

/// LayerNorm of the rows of x (width `w.len()`).
pub(crate) fn layer_norm_rows(x: &[f32], w: &[f32], b: &[f32], eps: f32) -> Vec<f32> {
    let c = w.len();
    let mut y = vec![0f32; x.len()];
    par_rows(&mut y, c, |r, out| {
        let row = &x[r * c..(r + 1) * c];
        let (mean, rstd) = moments(row, eps);
        for (((o, v), w), b) in out.iter_mut().zip(row).zip(w).zip(b) {
            *o = (v - mean) * rstd * w + b;
        }
    });
    y
}

/// LayerNorm's input gradient for output gradient dy:
/// dx = rstd · (g·w − mean(g·w) − x̂ · mean(g·w·x̂)).
pub(crate) fn layer_norm_rows_dx(x: &[f32], w: &[f32], dy: &[f32], eps: f32) -> Vec<f32> {
    let c = w.len();
    let mut dx = vec![0f32; x.len()];
    par_rows(&mut dx, c, |r, out| {
        let row = &x[r * c..(r + 1) * c];
        let g = &dy[r * c..(r + 1) * c];
        let (mean, rstd) = moments(row, eps);
        let (mut a, mut b) = (0f32, 0f32);
        for i in 0..c {
            let gw = g[i] * w[i];
            a += gw;
            b += gw * (row[i] - mean) * rstd;
        }
        let (a, b) = (a / c as f32, b / c as f32);
        for i in 0..c {
            let xhat = (row[i] - mean) * rstd;
            out[i] = rstd * (g[i] * w[i] - a - xhat * b);
        }
    });
    dx
}

/// LayerNorm's weight and bias gradients, [dw | db], summed over the rows.
pub(crate) fn layer_norm_rows_dwb(x: &[f32], dy: &[f32], c: usize, eps: f32) -> Vec<f32> {
    let rows = x.len() / c.max(1);
    par_row_sums(rows, c, 2 * c, |r, acc| {
        let row = &x[r * c..(r + 1) * c];
        let g = &dy[r * c..(r + 1) * c];
        let (mean, rstd) = moments(row, eps);
        let (dw, db) = acc.split_at_mut(c);
        for i in 0..c {
            dw[i] += g[i] * (row[i] - mean) * rstd;
            db[i] += g[i];
        }
    })
}

#[derive(Clone, Copy, Debug)]
struct LayerNorm {
    eps: f32,
}

impl CustomOp3 for LayerNorm {
    fn name(&self) -> &'static str {
        "covey-layer-norm"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = crate::conv::contiguous_f32(s1, l1, self.name())?;
        let w = crate::conv::contiguous_f32(s2, l2, self.name())?;
        let b = crate::conv::contiguous_f32(s3, l3, self.name())?;
        let y = layer_norm_rows(x, w, b, self.eps);
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        weight: &Tensor,
        bias: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let c = weight.dim(0)?;
        let eps = self.eps;
        let name = self.name();
        with_f32(x, name, |xs| {
            with_f32(weight, name, |w| {
                with_f32(grad, name, |dy| {
                    let dx = x
                        .track_op()
                        .then(|| {
                            Tensor::from_vec(
                                layer_norm_rows_dx(xs, w, dy, eps),
                                x.shape(),
                                x.device(),
                            )
                        })
                        .transpose()?;
                    let (dw, db) = if weight.track_op() || bias.track_op() {
                        let sums = layer_norm_rows_dwb(xs, dy, c, eps);
                        let dw = Tensor::from_slice(&sums[..c], c, x.device())?;
                        let db = Tensor::from_slice(&sums[c..], c, x.device())?;
                        (
                            weight.track_op().then_some(dw),
                            bias.track_op().then_some(db),
                        )
                    } else {
                        (None, None)
                    };
                    Ok((dx, dw, db))
                })
            })
        })
    }
}

#[derive(Clone, Copy, Debug)]
struct RmsNorm {
    eps: f32,
}

impl CustomOp2 for RmsNorm {
    fn name(&self) -> &'static str {
        "covey-rms-norm"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = crate::conv::contiguous_f32(s1, l1, self.name())?;
        let w = crate::conv::contiguous_f32(s2, l2, self.name())?;
        let c = w.len();
        let mut y = vec![0f32; x.len()];
        par_rows(&mut y, c, |r, out| {
            let row = &x[r * c..(r + 1) * c];
            let s = rms(row, self.eps);
            for ((o, v), w) in out.iter_mut().zip(row).zip(w) {
                *o = v * s * w;
            }
        });
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        weight: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let c = weight.dim(0)?;
        let eps = self.eps;
        let name = self.name();
        with_f32(x, name, |xs| {
            with_f32(weight, name, |w| {
                with_f32(grad, name, |dy| {
                    let rows = xs.len() / c.max(1);
                    let dx = x
                        .track_op()
                        .then(|| {
                            let mut dx = vec![0f32; xs.len()];
                            par_rows(&mut dx, c, |r, out| {
                                let row = &xs[r * c..(r + 1) * c];
                                let g = &dy[r * c..(r + 1) * c];
                                let s = rms(row, eps);
                                // dx = s · (g·w − x · s² · mean(g·w·x))
                                let dot =
                                    (0..c).map(|i| g[i] * w[i] * row[i]).sum::<f32>() / c as f32;
                                for i in 0..c {
                                    out[i] = s * (g[i] * w[i] - row[i] * s * s * dot);
                                }
                            });
                            Tensor::from_vec(dx, x.shape(), x.device())
                        })
                        .transpose()?;
                    let dw = weight
                        .track_op()
                        .then(|| {
                            let sums = par_row_sums(rows, c, c, |r, acc| {
                                let row = &xs[r * c..(r + 1) * c];
                                let g = &dy[r * c..(r + 1) * c];
                                let s = rms(row, eps);
                                for i in 0..c {
                                    acc[i] += g[i] * row[i] * s;
                                }
                            });
                            Tensor::from_vec(sums, c, x.device())
                        })
                        .transpose()?;
                    Ok((dx, dw))
                })
            })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lm::ops::tests::{check_against_portable, random, var};

    #[test]
    fn layer_norm_matches_candle_ops_in_value_and_gradient() {
        for (rows, c) in [(1, 4), (7, 33), (300, 256)] {
            let x = var(&[rows, c], 1);
            let w = var(&[c], 2);
            let b = var(&[c], 3);
            check_against_portable(
                &[&x, &w, &b],
                || layer_norm(&x, &w, &b, 1e-5).unwrap(),
                || layer_norm_portable(&x, &w, &b, 1e-5).unwrap(),
                &format!("layer_norm {rows}x{c}"),
            );
        }
    }

    #[test]
    fn rms_norm_matches_candle_ops_in_value_and_gradient() {
        for (rows, c) in [(1, 4), (7, 33), (300, 256)] {
            let x = var(&[rows, c], 4);
            let w = var(&[c], 5);
            check_against_portable(
                &[&x, &w],
                || rms_norm(&x, &w, 1e-6).unwrap(),
                || rms_norm_portable(&x, &w, 1e-6).unwrap(),
                &format!("rms_norm {rows}x{c}"),
            );
        }
    }

    #[test]
    fn frozen_weights_get_no_gradient_and_3d_inputs_work() {
        let x = var(&[2, 3, 8], 1);
        let w = random(&[8], 2);
        let b = random(&[8], 3);
        let grads = layer_norm(&x, &w, &b, 1e-5)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        assert!(grads.get(&w).is_none());
        assert_eq!(grads.get(&x).unwrap().dims(), [2, 3, 8]);
        assert!(layer_norm(&x, &random(&[7], 2), &b, 1e-5).is_err());
        assert!(rms_norm(&x, &random(&[9], 2), 1e-5).is_err());
    }
}
