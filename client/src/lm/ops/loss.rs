//! Next-token cross-entropy over a vocabulary, fused: one pass over the
//! logits forward, one backward, instead of candle's log-softmax, gather
//! and mean nodes (each a pass over B·T·V values). The forward pass also
//! counts the hits and keeps each row's log-sum-exp for the backward pass,
//! so a step reads GPT-2's 50,257-wide logits twice, not four times.

use std::sync::{Arc, Mutex};

use candle_core::{CpuStorage, CustomOp2, D, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::{IGNORE, math::exp, par_rows, with_f32};
use crate::conv::contiguous_f32;

/// Mean −log p(target) over the rows of logits [N, V] whose target is not
/// [`IGNORE`]; 0 when every target is.
pub fn cross_entropy(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    let (n, _) = logits.dims2()?;
    if targets.dims() != [n] || targets.dtype() != DType::U32 {
        candle_core::bail!(
            "cross_entropy: {n} rows of logits against targets {:?} of {:?}",
            targets.dims(),
            targets.dtype()
        );
    }
    cross_entropy_counted(logits, targets).map(|(loss, _)| loss)
}

/// [`cross_entropy`] and, from the same pass, what evaluation needs of the
/// batch (summed loss, counted targets, hits).
pub fn cross_entropy_counted(logits: &Tensor, targets: &Tensor) -> Result<(Tensor, TokenLoss)> {
    let (n, _) = logits.dims2()?;
    if targets.dims() != [n] || targets.dtype() != DType::U32 {
        candle_core::bail!(
            "cross_entropy: {n} rows of logits against targets {:?} of {:?}",
            targets.dims(),
            targets.dtype()
        );
    }
    if logits.device().is_cpu() {
        let op = CrossEntropy::default();
        let loss = logits
            .contiguous()?
            .apply_op2(&targets.contiguous()?, op.clone())?;
        let counted = op
            .rows
            .lock()
            .map_err(|_| candle_core::Error::Msg("cross-entropy state poisoned".into()))?
            .counted;
        Ok((loss, counted))
    } else {
        let loss = cross_entropy_portable(logits, targets)?;
        let counted = token_losses(logits, &targets.to_vec1::<u32>()?)?;
        Ok((loss, counted))
    }
}

pub(crate) fn cross_entropy_portable(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    let device = logits.device();
    let ids = targets.to_vec1::<u32>()?;
    let mask: Vec<f32> = ids
        .iter()
        .map(|&t| f32::from(u8::from(t != IGNORE)))
        .collect();
    let count = mask.iter().sum::<f32>().max(1.0);
    let safe: Vec<u32> = ids
        .iter()
        .map(|&t| if t == IGNORE { 0 } else { t })
        .collect();
    let safe = Tensor::from_vec(safe, (ids.len(), 1), device)?;
    let mask = Tensor::from_vec(mask, ids.len(), device)?;
    let shifted = logits.broadcast_sub(&logits.max_keepdim(D::Minus1)?.detach())?;
    let lse = shifted.exp()?.sum(D::Minus1)?.log()?;
    let picked = shifted.gather(&safe, 1)?.squeeze(1)?;
    ((lse - picked)? * mask)?.sum_all()? / f64::from(count)
}

/// What evaluation needs of one batch: summed loss, counted targets and
/// how many of them were the most likely token.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct TokenLoss {
    pub nll: f64,
    pub tokens: u64,
    pub correct: u64,
}

impl std::ops::AddAssign for TokenLoss {
    fn add_assign(&mut self, o: Self) {
        self.nll += o.nll;
        self.tokens += o.tokens;
        self.correct += o.correct;
    }
}

/// Loss and next-token hits of logits [N, V] against targets, with no
/// autograd (evaluation).
pub fn token_losses(logits: &Tensor, targets: &[u32]) -> Result<TokenLoss> {
    let (n, v) = logits.dims2()?;
    if targets.len() != n {
        candle_core::bail!("token_losses: {n} rows against {} targets", targets.len());
    }
    let logits = logits
        .to_device(&candle_core::Device::Cpu)?
        .to_dtype(DType::F32)?;
    with_f32(&logits, "token_losses", |x| {
        Ok(x.par_chunks(v.max(1))
            .zip(targets.par_iter())
            .filter(|(_, t)| **t != IGNORE)
            .map(|(row, &t)| {
                let (lse, best) = log_sum_exp(row);
                let t = t as usize;
                TokenLoss {
                    nll: f64::from(lse - row.get(t).copied().unwrap_or(f32::NAN)),
                    tokens: 1,
                    correct: u64::from(best == t),
                }
            })
            .reduce(TokenLoss::default, |mut a, b| {
                a += b;
                a
            }))
    })
}

/// log Σ exp(row) and the index of the row's maximum.
fn log_sum_exp(row: &[f32]) -> (f32, usize) {
    let (best, max) = row
        .iter()
        .enumerate()
        .fold((0, f32::NEG_INFINITY), |(bi, bm), (i, &v)| {
            if v > bm { (i, v) } else { (bi, bm) }
        });
    let sum: f32 = row.iter().map(|v| exp(v - max)).sum();
    (max + sum.ln(), best)
}

/// What the forward pass leaves for the backward pass and the caller.
#[derive(Debug, Default)]
struct Rows {
    /// log Σ exp of each row.
    lse: Vec<f32>,
    counted: TokenLoss,
}

#[derive(Clone, Debug, Default)]
struct CrossEntropy {
    rows: Arc<Mutex<Rows>>,
}

fn targets_of<'a>(s: &'a CpuStorage, l: &Layout) -> Result<&'a [u32]> {
    let Some((a, b)) = l.contiguous_offsets() else {
        candle_core::bail!("cross_entropy needs contiguous targets");
    };
    Ok(&s.as_slice::<u32>()?[a..b])
}

impl CustomOp2 for CrossEntropy {
    fn name(&self) -> &'static str {
        "covey-cross-entropy"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = contiguous_f32(s1, l1, self.name())?;
        let targets = targets_of(s2, l2)?;
        let (_, v) = l1.shape().dims2()?;
        if let Some(&bad) = targets.iter().find(|&&t| t != IGNORE && t as usize >= v) {
            candle_core::bail!("cross_entropy: target {bad} is outside the vocabulary of {v}");
        }
        let per_row: Vec<(f32, TokenLoss)> = x
            .par_chunks(v.max(1))
            .zip(targets.par_iter())
            .map(|(row, &t)| {
                let (lse, best) = log_sum_exp(row);
                let counted = if t == IGNORE {
                    TokenLoss::default()
                } else {
                    TokenLoss {
                        nll: f64::from(lse - row[t as usize]),
                        tokens: 1,
                        correct: u64::from(best == t as usize),
                    }
                };
                (lse, counted)
            })
            .collect();
        let mut counted = TokenLoss::default();
        for (_, c) in &per_row {
            counted += *c;
        }
        let mean = if counted.tokens == 0 {
            0.0
        } else {
            counted.nll / counted.tokens as f64
        };
        let mut rows = self
            .rows
            .lock()
            .map_err(|_| candle_core::Error::Msg("cross-entropy state poisoned".into()))?;
        rows.lse = per_row.into_iter().map(|(lse, _)| lse).collect();
        rows.counted = counted;
        Ok((CpuStorage::F32(vec![mean as f32]), Shape::from(())))
    }

    fn bwd(
        &self,
        logits: &Tensor,
        targets: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let upstream = grad.to_dtype(DType::F32)?.to_scalar::<f32>()?;
        let (_, v) = logits.dims2()?;
        let ids = targets.to_vec1::<u32>()?;
        let count = ids.iter().filter(|&&t| t != IGNORE).count().max(1);
        let scale = upstream / count as f32;
        let cached = self.rows.lock().map(|r| r.lse.clone()).unwrap_or_default();
        with_f32(logits, self.name(), |x| {
            let mut dx = vec![0f32; x.len()];
            par_rows(&mut dx, v, |r, out| {
                let t = ids[r];
                if t == IGNORE {
                    return;
                }
                let row = &x[r * v..(r + 1) * v];
                let lse = match cached.get(r) {
                    Some(&lse) if cached.len() * v == x.len() => lse,
                    _ => log_sum_exp(row).0,
                };
                for (o, &l) in out.iter_mut().zip(row) {
                    *o = exp(l - lse) * scale;
                }
                out[t as usize] -= scale;
            });
            let dx = Tensor::from_vec(dx, logits.shape(), logits.device())?;
            Ok((Some(dx), None))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lm::ops::tests::{close, var};
    use candle_core::Device;

    #[test]
    fn fused_cross_entropy_matches_candle_ops_and_skips_ignored_targets() {
        let logits = var(&[6, 11], 1);
        let targets = Tensor::new(&[3u32, IGNORE, 0, 10, 7, IGNORE], &Device::Cpu).unwrap();
        let fused = cross_entropy(&logits, &targets).unwrap();
        let portable = cross_entropy_portable(&logits, &targets).unwrap();
        close(&fused, &portable, 1e-6, "loss");
        let (gf, gp) = (fused.backward().unwrap(), portable.backward().unwrap());
        close(
            gf.get(&logits).unwrap(),
            gp.get(&logits).unwrap(),
            1e-5,
            "gradient",
        );
        let ignored = gf
            .get(&logits)
            .unwrap()
            .get(1)
            .unwrap()
            .abs()
            .unwrap()
            .sum_all()
            .unwrap();
        assert_eq!(ignored.to_scalar::<f32>().unwrap(), 0.0);
        // The same through the evaluation path, and counted by the forward pass.
        let ids = targets.to_vec1::<u32>().unwrap();
        let eval = token_losses(logits.as_tensor(), &ids).unwrap();
        let (_, counted) = cross_entropy_counted(&logits, &targets).unwrap();
        assert_eq!(counted.tokens, 4);
        assert!((counted.nll - eval.nll).abs() < 1e-5 && counted.correct == eval.correct);
        assert_eq!(eval.tokens, 4);
        let mean = (eval.nll / 4.0) as f32;
        assert!((mean - fused.to_scalar::<f32>().unwrap()).abs() < 1e-5);
    }

    #[test]
    fn bad_targets_are_refused() {
        let logits = var(&[2, 5], 1);
        let out_of_range = Tensor::new(&[1u32, 5], &Device::Cpu).unwrap();
        assert!(cross_entropy(&logits, &out_of_range).is_err());
        let short = Tensor::new(&[1u32], &Device::Cpu).unwrap();
        assert!(cross_entropy(&logits, &short).is_err());
        let all_ignored = Tensor::new(&[IGNORE, IGNORE], &Device::Cpu).unwrap();
        let loss = cross_entropy(&logits, &all_ignored).unwrap();
        assert_eq!(loss.to_scalar::<f32>().unwrap(), 0.0);
    }
}
