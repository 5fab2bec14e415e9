//! The transformer's building blocks, each with a gradient.
//!
//! candle 0.11's fused `softmax_last_dim`, `layer_norm`, `rms_norm` and
//! `rope` have no backward pass, and a model built on them trains only the
//! layers above them, silently. Every op here has one:
//! - on the CPU, a fused kernel whose backward is written by hand (one
//!   autograd node, one pass over memory, rows split across rayon's pool);
//! - elsewhere (CUDA), the same function composed of candle's own
//!   differentiable ops, which the tests also use as the reference for the
//!   fused kernels' values and gradients.

use candle_core::{Layout, Result, Storage, Tensor};
use rayon::prelude::*;

mod activation;
pub(crate) mod attention;
mod loss;
mod math;
pub(crate) mod norm;
mod rope;

#[cfg(test)]
pub(crate) use activation::gelu_tanh_portable;
pub(crate) use activation::{gelu, gelu_grad};
pub use activation::{gelu_tanh, swiglu};
pub use attention::{causal_attention, causal_attention_packed};
pub use loss::{TokenLoss, cross_entropy, cross_entropy_counted, token_losses};
pub use norm::{layer_norm, rms_norm};
pub use rope::{Rotary, rope};

/// A widened f32 copy of a bf16 or f16 frozen parameter; `None` for an f32
/// one, which is read in place. A narrow base is widened where it is used,
/// a block or a slice at a time, and the copy dropped right after: holding
/// it wide would give back the memory the narrow base saves.
pub(crate) fn widen(
    s: &candle_core::CpuStorage,
    l: &Layout,
    op: &str,
) -> Result<Option<candle_core::CpuStorage>> {
    use candle_core::CpuStorage;
    let Some((start, end)) = l.contiguous_offsets() else {
        candle_core::bail!("{op}: the parameters must be contiguous");
    };
    Ok(match s {
        CpuStorage::F32(_) => None,
        CpuStorage::BF16(v) => Some(CpuStorage::F32(
            v[start..end].par_iter().map(|x| x.to_f32()).collect(),
        )),
        CpuStorage::F16(v) => Some(CpuStorage::F32(
            v[start..end].par_iter().map(|x| x.to_f32()).collect(),
        )),
        _ => candle_core::bail!("{op}: parameters must be f32, bf16 or f16"),
    })
}

/// Target id that takes no part in the loss (the tail of a short sequence).
pub const IGNORE: u32 = u32::MAX;

/// The contiguous f32 values behind a CPU storage.
fn cpu_f32<'a>(storage: &'a Storage, layout: &Layout, op: &str) -> Result<&'a [f32]> {
    let Storage::Cpu(cpu) = storage else {
        candle_core::bail!("{op}: the fused kernel runs on the CPU only");
    };
    let Some((start, end)) = layout.contiguous_offsets() else {
        candle_core::bail!("{op} needs a contiguous input");
    };
    Ok(&cpu.as_slice::<f32>()?[start..end])
}

/// Runs `f` over the f32 values of a CPU tensor, made contiguous first.
fn with_f32<R>(t: &Tensor, op: &str, f: impl FnOnce(&[f32]) -> Result<R>) -> Result<R> {
    let t = t.contiguous()?;
    let (storage, layout) = t.storage_and_layout();
    f(cpu_f32(&storage, layout, op)?)
}

/// Rows per rayon task: enough work to pay for the task.
fn rows_per_task(width: usize) -> usize {
    (16_384 / width.max(1)).max(1)
}

/// Fills `out` ([rows, width]) row by row in parallel; `f` gets the row
/// index and the row.
fn par_rows(out: &mut [f32], width: usize, f: impl Fn(usize, &mut [f32]) + Sync) {
    if width == 0 {
        return;
    }
    let per = rows_per_task(width);
    out.par_chunks_mut(per * width)
        .enumerate()
        .for_each(|(chunk, rows)| {
            for (i, row) in rows.chunks_exact_mut(width).enumerate() {
                f(chunk * per + i, row);
            }
        });
}

/// Sums per-row contributions into `width` accumulators in parallel:
/// `f(row, acc)` adds row `row`'s share into `acc`.
pub(crate) fn par_row_sums(
    rows: usize,
    width: usize,
    accumulators: usize,
    f: impl Fn(usize, &mut [f32]) + Sync,
) -> Vec<f32> {
    let per = rows_per_task(width);
    let chunks = rows.div_ceil(per);
    (0..chunks)
        .into_par_iter()
        .fold(
            || vec![0f32; accumulators],
            |mut acc, chunk| {
                for row in chunk * per..((chunk + 1) * per).min(rows) {
                    f(row, &mut acc);
                }
                acc
            },
        )
        .reduce(
            || vec![0f32; accumulators],
            |mut a, b| {
                for (x, y) in a.iter_mut().zip(&b) {
                    *x += y;
                }
                a
            },
        )
}

/// Sums a [rows, width] tensor over its rows (a bias's gradient), split
/// across rayon's pool on the CPU; candle's own reduction over the first
/// dimension runs on one core in strided order.
pub(crate) fn column_sums(t: &Tensor) -> Result<Tensor> {
    if !t.device().is_cpu() {
        return t.sum(0);
    }
    let (rows, width) = t.dims2()?;
    with_f32(t, "column sums", |x| {
        let sums = par_row_sums(rows, width, width, |r, acc| {
            for (a, v) in acc.iter_mut().zip(&x[r * width..(r + 1) * width]) {
                *a += v;
            }
        });
        Tensor::from_vec(sums, width, t.device())
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use candle_core::{Device, Tensor, Var, backprop::GradStore};

    pub(crate) use crate::conv::tests::{max_abs, max_gap, random};

    /// Gradients of Σ y ⊙ upstream.
    pub(crate) fn pullback(y: &Tensor, upstream: &Tensor) -> GradStore {
        crate::conv::tests::pullback(y, upstream)
    }

    pub(crate) fn var(shape: &[usize], seed: u64) -> Var {
        Var::from_tensor(&random(shape, seed)).unwrap()
    }

    /// Asserts two tensors agree within `tol` relative to the larger's scale.
    pub(crate) fn close(a: &Tensor, b: &Tensor, tol: f32, what: &str) {
        assert_eq!(a.dims(), b.dims(), "{what}: shapes");
        let scale = max_abs(a).max(max_abs(b)).max(1e-3);
        let gap = max_gap(a, b);
        assert!(gap <= tol * scale, "{what}: gap {gap} at scale {scale}");
    }

    /// Checks the fused op against the portable one in value and in the
    /// gradient of every input.
    pub(crate) fn check_against_portable(
        inputs: &[&Var],
        fused: impl Fn() -> Tensor,
        portable: impl Fn() -> Tensor,
        what: &str,
    ) {
        let (f, p) = (fused(), portable());
        close(&f, &p, 1e-5, &format!("{what} forward"));
        let upstream = random(f.dims(), 99);
        let (gf, gp) = (pullback(&f, &upstream), pullback(&p, &upstream));
        for (i, v) in inputs.iter().enumerate() {
            let a = gf
                .get(v)
                .unwrap_or_else(|| panic!("{what}: no fused gradient for input {i}"));
            let b = gp.get(v).unwrap();
            assert!(a.device().same_device(&Device::Cpu));
            close(a, b, 1e-4, &format!("{what} gradient {i}"));
        }
    }
}
