//! GPT-2's transformer block as one autograd node on the CPU.
//!
//! As separate candle nodes, a block is nine nodes and about a dozen
//! activation-sized gradient edges, and candle's backward pass meets each
//! edge with a fresh zero tensor and an addition: a fifth of a training
//! step. Here the block's forward pass keeps what its backward pass needs,
//! and the backward pass runs the whole chain rule through the block by
//! hand, on the same kernels as the separate ops (layer norm, packed
//! attention, GELU, candle's gemm), writing the layer's parameter gradients
//! into one blob. The separate ops remain the reference the tests hold it to.

use std::sync::{Arc, Mutex};

use candle_core::{
    CpuStorage, CustomOp3, DType, Layout, Result, Shape, Storage, Tensor, backend::BackendStorage,
};
use rayon::prelude::*;

use super::ops::{
    attention::{packed_backward, packed_forward},
    gelu, gelu_grad,
    norm::{layer_norm_rows, layer_norm_rows_dwb, layer_norm_rows_dx},
    par_row_sums,
};

/// The block's projections, in the family's order.
pub(crate) const PROJECTIONS: [&str; 4] = ["attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"];

/// Where a GPT-2 layer's tensors sit in its parameter blob (wire order).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Offsets {
    c: usize,
    inner: usize,
    ln1: usize,
    /// Per projection: weight [in, out] and bias [out].
    proj: [(usize, usize); 4],
    ln2: usize,
    pub(crate) len: usize,
}

impl Offsets {
    pub(crate) fn new(c: usize, inner: usize) -> Self {
        let ln1 = 0;
        let attn = 2 * c;
        let proj = attn + 3 * c * c + 3 * c;
        let ln2 = proj + c * c + c;
        let fc = ln2 + 2 * c;
        let out = fc + c * inner + inner;
        Self {
            c,
            inner,
            ln1,
            proj: [
                (attn, attn + 3 * c * c),
                (proj, proj + c * c),
                (fc, fc + c * inner),
                (out, out + inner * c),
            ],
            ln2,
            len: out + inner * c + c,
        }
    }

    /// (inputs, outputs) of projection `j`.
    fn shape(&self, j: usize) -> (usize, usize) {
        let (c, i) = (self.c, self.inner);
        [(c, 3 * c), (c, c), (c, i), (i, c)][j]
    }
}

/// LoRA on one projection: y += scale · (x·Aᵀ)·Bᵀ.
#[derive(Clone, Debug)]
pub(crate) struct Adapter {
    /// A [r, in] when it is frozen (FFA-LoRA); else it is in the LoRA blob.
    pub(crate) frozen_a: Option<Arc<Vec<f32>>>,
    /// Offset of A in the layer's LoRA blob, when it trains.
    pub(crate) a_at: Option<usize>,
    /// Offset of B [out, r] in the layer's LoRA blob.
    pub(crate) b_at: usize,
}

/// A layer's adapters, by projection.
#[derive(Clone, Debug)]
pub(crate) struct Lora {
    pub(crate) rank: usize,
    pub(crate) scale: f32,
    pub(crate) adapters: [Option<Adapter>; 4],
}

/// The block's shape and settings.
#[derive(Clone, Debug)]
pub(crate) struct Block {
    pub(crate) offsets: Offsets,
    pub(crate) heads: usize,
    pub(crate) eps: f32,
    pub(crate) seq_len: usize,
    pub(crate) lora: Option<Arc<Lora>>,
}

/// What the forward pass keeps for the backward pass. A bf16 or f16
/// parameter blob is widened again there rather than kept wide, so a
/// narrow base stays narrow between the passes.
struct Saved {
    ln1: CpuStorage,
    qkv: CpuStorage,
    att: CpuStorage,
    x2: Vec<f32>,
    ln2: CpuStorage,
    pre_gelu: Vec<f32>,
    gelu: CpuStorage,
    /// x·Aᵀ of each adapted projection.
    lows: [Option<CpuStorage>; 4],
}

/// The node: the block plus the state its two passes share.
#[derive(Clone)]
struct Node {
    block: Block,
    saved: Arc<Mutex<Option<Saved>>>,
}

/// A matrix inside a storage: `rows × cols`, stored row-major from `at`,
/// or stored as its transpose when `t` is set.
#[derive(Clone, Copy)]
struct M<'a> {
    s: &'a CpuStorage,
    at: usize,
    rows: usize,
    cols: usize,
    t: bool,
}

impl<'a> M<'a> {
    fn of(s: &'a CpuStorage, rows: usize, cols: usize) -> Self {
        Self {
            s,
            at: 0,
            rows,
            cols,
            t: false,
        }
    }

    fn layout(&self) -> Layout {
        let strides = if self.t {
            vec![1, self.rows]
        } else {
            vec![self.cols, 1]
        };
        Layout::new((self.rows, self.cols).into(), strides, self.at)
    }
}

/// a · b with candle's gemm.
fn mm(a: M, b: M) -> Result<CpuStorage> {
    a.s.matmul(b.s, (1, a.rows, b.cols, a.cols), &a.layout(), &b.layout())
}

fn cpu(s: &Storage) -> Result<&CpuStorage> {
    match s {
        Storage::Cpu(c) => Ok(c),
        _ => candle_core::bail!("block: the fused kernel runs on the CPU only"),
    }
}

fn f32s(s: &CpuStorage) -> Result<&[f32]> {
    s.as_slice::<f32>()
}

fn f32s_mut(s: &mut CpuStorage) -> Result<&mut Vec<f32>> {
    match s {
        CpuStorage::F32(v) => Ok(v),
        _ => candle_core::bail!("block: expected f32 values"),
    }
}

fn into_vec(s: CpuStorage) -> Result<Vec<f32>> {
    match s {
        CpuStorage::F32(v) => Ok(v),
        _ => candle_core::bail!("block: expected f32 values"),
    }
}

/// `acc += scale · add`, in parallel.
fn add_scaled(acc: &mut [f32], add: &[f32], scale: f32) {
    acc.par_chunks_mut(1 << 14)
        .zip(add.par_chunks(1 << 14))
        .for_each(|(a, b)| a.iter_mut().zip(b).for_each(|(a, b)| *a += scale * b));
}

fn column_sums_into(out: &mut [f32], x: &[f32]) {
    let width = out.len();
    let sums = par_row_sums(x.len() / width.max(1), width, width, |r, acc| {
        for (a, v) in acc.iter_mut().zip(&x[r * width..(r + 1) * width]) {
            *a += v;
        }
    });
    for (o, s) in out.iter_mut().zip(sums) {
        *o += s;
    }
}

impl Node {
    fn lora(&self, j: usize) -> Option<(&Lora, &Adapter)> {
        let l = self.block.lora.as_deref()?;
        l.adapters[j].as_ref().map(|a| (l, a))
    }

    /// Projection `j` of `input` [n, in]: x·W + b, plus its adapter; the
    /// adapter's x·Aᵀ goes into `low`.
    fn project(
        &self,
        j: usize,
        input: &CpuStorage,
        n: usize,
        p: (&CpuStorage, usize),
        lora: (&CpuStorage, usize),
        low: &mut Option<CpuStorage>,
    ) -> Result<CpuStorage> {
        let (inputs, outputs) = self.block.offsets.shape(j);
        let (w_at, b_at) = self.block.offsets.proj[j];
        let w = M {
            s: p.0,
            at: p.1 + w_at,
            rows: inputs,
            cols: outputs,
            t: false,
        };
        let mut y = mm(M::of(input, n, inputs), w)?;
        let bias = &f32s(p.0)?[p.1 + b_at..p.1 + b_at + outputs];
        f32s_mut(&mut y)?
            .par_chunks_mut(outputs * 16)
            .for_each(|rows| {
                for row in rows.chunks_exact_mut(outputs) {
                    row.iter_mut().zip(bias).for_each(|(v, b)| *v += b);
                }
            });
        if let Some((l, ad)) = self.lora(j) {
            let r = l.rank;
            let frozen;
            let a = match &ad.frozen_a {
                Some(a) => {
                    frozen = CpuStorage::F32(a.to_vec());
                    M {
                        s: &frozen,
                        at: 0,
                        rows: inputs,
                        cols: r,
                        t: true,
                    }
                }
                None => M {
                    s: lora.0,
                    at: lora.1 + ad.a_at.unwrap_or(0),
                    rows: inputs,
                    cols: r,
                    t: true,
                },
            };
            let x_a = mm(M::of(input, n, inputs), a)?;
            let b = M {
                s: lora.0,
                at: lora.1 + ad.b_at,
                rows: r,
                cols: outputs,
                t: true,
            };
            let up = mm(M::of(&x_a, n, r), b)?;
            add_scaled(f32s_mut(&mut y)?, f32s(&up)?, l.scale);
            *low = Some(x_a);
        }
        Ok(y)
    }

    /// The backward pass of projection `j`: returns d(input) [n, in] and
    /// adds the parameter gradients into `dp` and `dl` when they are kept.
    #[allow(clippy::too_many_arguments)]
    fn project_back(
        &self,
        j: usize,
        input: &CpuStorage,
        dout: &CpuStorage,
        n: usize,
        p: (&CpuStorage, usize),
        lora: (&CpuStorage, usize),
        low: Option<&CpuStorage>,
        dp: Option<&mut Vec<f32>>,
        dl: Option<&mut Vec<f32>>,
    ) -> Result<CpuStorage> {
        let (inputs, outputs) = self.block.offsets.shape(j);
        let (w_at, b_at) = self.block.offsets.proj[j];
        // d input = dout · Wᵀ.
        let wt = M {
            s: p.0,
            at: p.1 + w_at,
            rows: outputs,
            cols: inputs,
            t: true,
        };
        let mut din = mm(M::of(dout, n, outputs), wt)?;
        if let Some(dp) = dp {
            // dW = inputᵀ · dout, db = Σ dout.
            let xt = M {
                s: input,
                at: 0,
                rows: inputs,
                cols: n,
                t: true,
            };
            let dw = mm(xt, M::of(dout, n, outputs))?;
            add_scaled(&mut dp[w_at..w_at + inputs * outputs], f32s(&dw)?, 1.0);
            column_sums_into(&mut dp[b_at..b_at + outputs], f32s(dout)?);
        }
        if let (Some((l, ad)), Some(low)) = (self.lora(j), low) {
            let r = l.rank;
            // dB = scale · doutᵀ · (x·Aᵀ)   [out, r]
            // d(x·Aᵀ) = scale · dout · B     [n, r]
            // d input += d(x·Aᵀ) · A;  dA = d(x·Aᵀ)ᵀ · x   [r, in]
            let b = M {
                s: lora.0,
                at: lora.1 + ad.b_at,
                rows: outputs,
                cols: r,
                t: false,
            };
            let mut dlow = mm(M::of(dout, n, outputs), b)?;
            f32s_mut(&mut dlow)?
                .par_iter_mut()
                .for_each(|v| *v *= l.scale);
            let frozen;
            let a = match &ad.frozen_a {
                Some(a) => {
                    frozen = CpuStorage::F32(a.to_vec());
                    M::of(&frozen, r, inputs)
                }
                None => M {
                    s: lora.0,
                    at: lora.1 + ad.a_at.unwrap_or(0),
                    rows: r,
                    cols: inputs,
                    t: false,
                },
            };
            let through = mm(M::of(&dlow, n, r), a)?;
            add_scaled(f32s_mut(&mut din)?, f32s(&through)?, 1.0);
            if let Some(dl) = dl {
                let dout_t = M {
                    s: dout,
                    at: 0,
                    rows: outputs,
                    cols: n,
                    t: true,
                };
                let db = mm(dout_t, M::of(low, n, r))?;
                add_scaled(&mut dl[ad.b_at..ad.b_at + outputs * r], f32s(&db)?, l.scale);
                if let Some(a_at) = ad.a_at {
                    let dlow_t = M {
                        s: &dlow,
                        at: 0,
                        rows: r,
                        cols: n,
                        t: true,
                    };
                    let da = mm(dlow_t, M::of(input, n, inputs))?;
                    add_scaled(&mut dl[a_at..a_at + r * inputs], f32s(&da)?, 1.0);
                }
            }
        }
        Ok(din)
    }
}

impl CustomOp3 for Node {
    fn name(&self) -> &'static str {
        "covey-gpt2-block"
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
        let o = self.block.offsets;
        let (n, c) = l1.shape().dims2()?;
        let x = crate::conv::contiguous_f32(s1, l1, self.name())?;
        if c != o.c || l2.shape().elem_count() != o.len {
            candle_core::bail!(
                "block: input of width {c} and {} parameters for width {}",
                l2.shape().elem_count(),
                o.c
            );
        }
        let widened = super::ops::widen(s2, l2, "block")?;
        let p = match &widened {
            Some(wide) => (wide, 0),
            None => (s2, l2.start_offset()),
        };
        let lora = (s3, l3.start_offset());
        let pv = f32s(p.0)?;
        let eps = self.block.eps;
        let at = |off: usize, len: usize| &pv[p.1 + off..p.1 + off + len];
        let mut lows: [Option<CpuStorage>; 4] = Default::default();

        let ln1 = CpuStorage::F32(layer_norm_rows(x, at(o.ln1, c), at(o.ln1 + c, c), eps));
        let qkv = self.project(0, &ln1, n, p, lora, &mut lows[0])?;
        let att = CpuStorage::F32(packed_forward(
            &qkv,
            n,
            self.block.heads,
            self.block.seq_len,
        )?);
        let a = self.project(1, &att, n, p, lora, &mut lows[1])?;
        let mut x2 = into_vec(a)?;
        add_scaled(&mut x2, x, 1.0);
        let ln2 = CpuStorage::F32(layer_norm_rows(&x2, at(o.ln2, c), at(o.ln2 + c, c), eps));
        let pre = self.project(2, &ln2, n, p, lora, &mut lows[2])?;
        let pre_gelu = into_vec(pre)?;
        let mut activated = vec![0f32; pre_gelu.len()];
        activated
            .par_chunks_mut(1 << 14)
            .zip(pre_gelu.par_chunks(1 << 14))
            .for_each(|(g, h)| g.iter_mut().zip(h).for_each(|(g, h)| *g = gelu(*h)));
        let activated = CpuStorage::F32(activated);
        let m = self.project(3, &activated, n, p, lora, &mut lows[3])?;
        let mut y = into_vec(m)?;
        add_scaled(&mut y, &x2, 1.0);
        let saved = Saved {
            ln1,
            qkv,
            att,
            x2,
            ln2,
            pre_gelu,
            gelu: activated,
            lows,
        };
        *self
            .saved
            .lock()
            .map_err(|_| candle_core::Error::Msg("block: state poisoned".into()))? = Some(saved);
        Ok((CpuStorage::F32(y), Shape::from((n, c))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        params: &Tensor,
        lora: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let o = self.block.offsets;
        let (n, c) = x.dims2()?;
        let eps = self.block.eps;
        let saved = self
            .saved
            .lock()
            .map_err(|_| candle_core::Error::Msg("block: state poisoned".into()))?
            .take()
            .ok_or_else(|| {
                candle_core::Error::Msg("block: the forward pass's state is gone".into())
            })?;
        let x = x.contiguous()?;
        let grad = grad.to_dtype(DType::F32)?.contiguous()?;
        let (xs, _) = x.storage_and_layout();
        let (ps, pl) = params.storage_and_layout();
        let (ls, ll) = lora.storage_and_layout();
        let (gs, _) = grad.storage_and_layout();
        let x_vals = f32s(cpu(&xs)?)?;
        let x_vals = &x_vals[x.layout().start_offset()..x.layout().start_offset() + n * c];
        let widened = super::ops::widen(cpu(&ps)?, pl, "block")?;
        let p = match &widened {
            Some(wide) => (wide, 0),
            None => (cpu(&ps)?, pl.start_offset()),
        };
        let l = (cpu(&ls)?, ll.start_offset());
        let pv = f32s(p.0)?;
        let at = |off: usize, len: usize| &pv[p.1 + off..p.1 + off + len];
        let mut dp = params.track_op().then(|| vec![0f32; o.len]);
        let mut dl = lora.track_op().then(|| vec![0f32; lora.elem_count()]);
        let dy_vals = {
            let g = f32s(cpu(&gs)?)?;
            let start = grad.layout().start_offset();
            g[start..start + n * c].to_vec()
        };
        let dy = CpuStorage::F32(dy_vals);

        // y = x2 + proj3(gelu(proj2(LN2(x2))))
        let dg = self.project_back(
            3,
            &saved.gelu,
            &dy,
            n,
            p,
            l,
            saved.lows[3].as_ref(),
            dp.as_mut(),
            dl.as_mut(),
        )?;
        let mut dh = into_vec(dg)?;
        dh.par_chunks_mut(1 << 14)
            .zip(saved.pre_gelu.par_chunks(1 << 14))
            .for_each(|(d, h)| d.iter_mut().zip(h).for_each(|(d, h)| *d *= gelu_grad(*h)));
        let dh = CpuStorage::F32(dh);
        let dln2 = self.project_back(
            2,
            &saved.ln2,
            &dh,
            n,
            p,
            l,
            saved.lows[2].as_ref(),
            dp.as_mut(),
            dl.as_mut(),
        )?;
        let dln2 = f32s(&dln2)?;
        let mut dx2 = layer_norm_rows_dx(&saved.x2, at(o.ln2, c), dln2, eps);
        add_scaled(&mut dx2, f32s(&dy)?, 1.0);
        if let Some(dp) = dp.as_mut() {
            let dwb = layer_norm_rows_dwb(&saved.x2, dln2, c, eps);
            add_scaled(&mut dp[o.ln2..o.ln2 + 2 * c], &dwb, 1.0);
        }
        // x2 = x + proj1(attention(proj0(LN1(x))))
        let dx2 = CpuStorage::F32(dx2);
        let datt = self.project_back(
            1,
            &saved.att,
            &dx2,
            n,
            p,
            l,
            saved.lows[1].as_ref(),
            dp.as_mut(),
            dl.as_mut(),
        )?;
        let dqkv = CpuStorage::F32(packed_backward(
            &saved.qkv,
            &datt,
            n,
            self.block.heads,
            self.block.seq_len,
        )?);
        let dln1 = self.project_back(
            0,
            &saved.ln1,
            &dqkv,
            n,
            p,
            l,
            saved.lows[0].as_ref(),
            dp.as_mut(),
            dl.as_mut(),
        )?;
        let dln1 = f32s(&dln1)?;
        let dx = x.track_op().then(|| {
            let mut dx = layer_norm_rows_dx(x_vals, at(o.ln1, c), dln1, eps);
            if let Ok(skip) = f32s(&dx2) {
                add_scaled(&mut dx, skip, 1.0);
            }
            dx
        });
        if let Some(dp) = dp.as_mut() {
            let dwb = layer_norm_rows_dwb(x_vals, dln1, c, eps);
            add_scaled(&mut dp[o.ln1..o.ln1 + 2 * c], &dwb, 1.0);
        }
        let device = x.device();
        Ok((
            dx.map(|v| Tensor::from_vec(v, (n, c), device))
                .transpose()?,
            dp.map(|v| Tensor::from_vec(v, params.shape(), device))
                .transpose()?,
            dl.map(|v| Tensor::from_vec(v, lora.shape(), device))
                .transpose()?,
        ))
    }
}

/// The block applied to x [N, C]: `params` is the layer's blob of
/// parameters (trainable or a frozen base, f32, bf16 or f16) and `lora` its
/// blob of trainable adapters (any one-value tensor when it has none).
pub(crate) fn forward(block: &Block, x: &Tensor, params: &Tensor, lora: &Tensor) -> Result<Tensor> {
    let node = Node {
        block: block.clone(),
        saved: Arc::default(),
    };
    x.contiguous()?
        .apply_op3(&params.contiguous()?, &lora.contiguous()?, node)
}
