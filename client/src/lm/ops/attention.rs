//! Causal multi-head self-attention with grouped key/value heads, as one
//! autograd node on the CPU.
//!
//! Per sequence, the heads form one batch of matrix products (candle's
//! gemm): S = Q·Kᵀ, a causal, scaled softmax in place, O = P·V. The backward
//! pass recomputes P instead of keeping B·H·T² probabilities alive between
//! the passes, then takes dV = Pᵀ·dO, dP = dO·Vᵀ, dS = P ⊙ (dP − Σ dP ⊙ P),
//! dQ = dS·K and dK = dSᵀ·Q.

use candle_core::{
    CpuStorage, CustomOp1, CustomOp3, D, DType, Layout, Result, Shape, Storage, Tensor,
    backend::BackendStorage,
};
use rayon::prelude::*;

use super::{math::exp, par_rows};

/// Self-attention of q [B·T, H·D] over k and v [B·T, Hkv·D], rows in
/// sequences of `seq_len` tokens, each query seeing only positions up to
/// its own; returns [B·T, H·D]. The inputs may be views into a fused q/k/v
/// projection.
pub fn causal_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    heads: usize,
    kv_heads: usize,
    seq_len: usize,
) -> Result<Tensor> {
    let (n, width) = q.dims2()?;
    if heads == 0
        || kv_heads == 0
        || seq_len == 0
        || !n.is_multiple_of(seq_len)
        || !width.is_multiple_of(heads)
        || !heads.is_multiple_of(kv_heads)
    {
        candle_core::bail!(
            "attention: {heads} heads and {kv_heads} key/value heads over width {width}, {n} rows in sequences of {seq_len}"
        );
    }
    let d = width / heads;
    for (name, x) in [("k", k), ("v", v)] {
        if x.dims() != [n, kv_heads * d] {
            candle_core::bail!("attention: q {:?} against {name} {:?}", q.dims(), x.dims());
        }
    }
    let op = Attention {
        heads,
        kv_heads,
        head_dim: d,
        scale: 1.0 / (d as f32).sqrt(),
        seq_len,
    };
    if q.device().is_cpu() {
        q.apply_op3(k, v, op)
    } else {
        op.portable(q, k, v)
    }
}

#[derive(Clone, Copy, Debug)]
struct Attention {
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    scale: f32,
    /// Rows per sequence.
    seq_len: usize,
}

/// Stored [H, rows, cols], read as it is.
fn plain(h: usize, rows: usize, cols: usize) -> Layout {
    Layout::contiguous((h, rows, cols))
}

/// Stored [H, rows, cols], read as its transpose [H, cols, rows].
fn transposed(h: usize, rows: usize, cols: usize) -> Layout {
    Layout::new((h, cols, rows).into(), vec![rows * cols, 1, cols], 0)
}

fn f32_mut(s: &mut CpuStorage) -> Result<&mut Vec<f32>> {
    match s {
        CpuStorage::F32(v) => Ok(v),
        _ => candle_core::bail!("attention: expected f32 values"),
    }
}

fn f32_ref(s: &CpuStorage) -> Result<&[f32]> {
    s.as_slice::<f32>()
}

impl Attention {
    pub(crate) fn portable(&self, q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
        let t = self.seq_len;
        let b = q.dim(0)? / t;
        let (h, d) = (self.heads, self.head_dim);
        let split = |x: &Tensor, n: usize| -> Result<Tensor> {
            let x = x.reshape((b, t, n, d))?.transpose(1, 2)?.contiguous()?;
            if n == h {
                return Ok(x);
            }
            // Each key/value head serves h / n query heads.
            x.unsqueeze(2)?
                .expand((b, n, h / n, t, d))?
                .contiguous()?
                .reshape((b, h, t, d))
        };
        let (q, k, v) = (
            split(q, h)?,
            split(k, self.kv_heads)?,
            split(v, self.kv_heads)?,
        );
        let scores = (q.matmul(&k.t()?)? * f64::from(self.scale))?;
        let mask: Vec<f32> = (0..t * t)
            .map(|i| {
                if i % t > i / t {
                    f32::NEG_INFINITY
                } else {
                    0.0
                }
            })
            .collect();
        let mask = Tensor::from_vec(mask, (t, t), q.device())?.to_dtype(scores.dtype())?;
        let scores = scores.broadcast_add(&mask)?;
        // Softmax from differentiable ops; the shift by the row maximum is a
        // constant for the gradient.
        let shifted = scores.broadcast_sub(&scores.max_keepdim(D::Minus1)?.detach())?;
        let e = shifted.exp()?;
        let p = e.broadcast_div(&e.sum_keepdim(D::Minus1)?)?;
        p.matmul(&v)?.transpose(1, 2)?.reshape((b * t, h * d))
    }

    /// A [B·T, W] layout (any row stride, unit column stride) seen as
    /// [B, T, W].
    fn sequences(&self, l: &Layout) -> Result<Layout> {
        let (n, w) = l.shape().dims2()?;
        let [row, col] = *l.stride() else {
            candle_core::bail!("attention needs 2-d inputs");
        };
        if col != 1 {
            candle_core::bail!("attention needs inputs whose rows are contiguous");
        }
        let t = self.seq_len;
        Ok(Layout::new(
            (n / t, t, w).into(),
            vec![t * row, row, 1],
            l.start_offset(),
        ))
    }

    /// Gathers sequence `b` of a [B, T, n·D] input (any strides with a
    /// unit last stride) into [H, T, D], repeating each of n key/value
    /// heads for the query heads it serves.
    fn gather(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
        b: usize,
        n: usize,
    ) -> Result<CpuStorage> {
        let values = storage.as_slice::<f32>()?;
        let [sb, st, sc] = *layout.stride() else {
            candle_core::bail!("attention needs 3-d inputs");
        };
        if sc != 1 {
            candle_core::bail!("attention needs inputs whose last dimension is contiguous");
        }
        let t = layout.dims()[1];
        let (h, d) = (self.heads, self.head_dim);
        let group = h / n;
        let mut out = vec![0f32; h * t * d];
        for (head, block) in out.chunks_exact_mut(t * d).enumerate() {
            let source = head / group;
            for (pos, row) in block.chunks_exact_mut(d).enumerate() {
                let at = layout.start_offset() + b * sb + pos * st + source * d;
                row.copy_from_slice(&values[at..at + d]);
            }
        }
        Ok(CpuStorage::F32(out))
    }

    /// The batched product over heads of `lhs` [H, m, k] and `rhs` [H, k, n].
    fn product(
        &self,
        lhs: (&CpuStorage, Layout),
        rhs: (&CpuStorage, Layout),
    ) -> Result<CpuStorage> {
        let (h, m, k) = lhs.1.shape().dims3()?;
        let (_, _, n) = rhs.1.shape().dims3()?;
        lhs.0.matmul(rhs.0, (h, m, n, k), &lhs.1, &rhs.1)
    }

    /// P = causal softmax(scale · Q·Kᵀ), [H, T, T].
    fn probabilities(&self, q: &CpuStorage, k: &CpuStorage, t: usize) -> Result<CpuStorage> {
        let (h, d) = (self.heads, self.head_dim);
        let mut s = self.product((q, plain(h, t, d)), (k, transposed(h, t, d)))?;
        let scale = self.scale;
        par_rows(f32_mut(&mut s)?, t, |r, row| {
            let i = r % t;
            let (live, masked) = row.split_at_mut(i + 1);
            let max = live
                .iter()
                .fold(f32::NEG_INFINITY, |m, &v| m.max(v * scale));
            let mut sum = 0.0;
            for v in live.iter_mut() {
                *v = exp(*v * scale - max);
                sum += *v;
            }
            let inv = 1.0 / sum;
            live.iter_mut().for_each(|v| *v *= inv);
            masked.fill(0.0);
        });
        Ok(s)
    }

    /// Writes [H, T, D] heads of sequence b into out [B, T, n·D], summing
    /// the query heads that share a key/value head.
    fn scatter(&self, heads: &[f32], out: &mut [f32], t: usize, n: usize) {
        let (h, d) = (self.heads, self.head_dim);
        let group = h / n;
        for (head, block) in heads.chunks_exact(t * d).enumerate() {
            let target = head / group;
            for (pos, row) in block.chunks_exact(d).enumerate() {
                let at = pos * n * d + target * d;
                for (o, v) in out[at..at + d].iter_mut().zip(row) {
                    *o += v;
                }
            }
        }
    }

    /// The tensor (made row-contiguous if it is not) and its [B, T, W] view.
    fn storage(&self, x: &Tensor) -> Result<(Tensor, Layout)> {
        let x = if x.stride()[1] == 1 {
            x.clone()
        } else {
            x.contiguous()?
        };
        let layout = self.sequences(x.layout())?;
        Ok((x, layout))
    }
}

fn cpu(storage: &Storage) -> Result<&CpuStorage> {
    match storage {
        Storage::Cpu(c) => Ok(c),
        _ => candle_core::bail!("attention: the fused kernel runs on the CPU only"),
    }
}

/// One input's storage and layout.
type Input<'a> = (&'a CpuStorage, &'a Layout);

impl Attention {
    /// The forward pass over q, k and v seen as [B, T, W] (any strides with
    /// a unit last one); the output is [B·T, H·D].
    fn forward(&self, q: Input, k: Input, v: Input) -> Result<(CpuStorage, Shape)> {
        let (b, t, width) = q.1.shape().dims3()?;
        let per_seq: Vec<Vec<f32>> = (0..b)
            .into_par_iter()
            .map(|i| {
                let qh = self.gather(q.0, q.1, i, self.heads)?;
                let kh = self.gather(k.0, k.1, i, self.kv_heads)?;
                let vh = self.gather(v.0, v.1, i, self.kv_heads)?;
                let p = self.probabilities(&qh, &kh, t)?;
                let (h, d) = (self.heads, self.head_dim);
                let o = self.product((&p, plain(h, t, t)), (&vh, plain(h, t, d)))?;
                let mut out = vec![0f32; t * width];
                self.scatter(f32_ref(&o)?, &mut out, t, self.heads);
                Ok(out)
            })
            .collect::<Result<_>>()?;
        Ok((
            CpuStorage::F32(per_seq.concat()),
            Shape::from((b * t, width)),
        ))
    }

    /// Per sequence, the gradients of q, k and v ([T, H·D], [T, Hkv·D] twice)
    /// for the output gradient `g`.
    fn backward(&self, q: Input, k: Input, v: Input, g: Input) -> Result<Vec<[Vec<f32>; 3]>> {
        let (b, t, width) = q.1.shape().dims3()?;
        let kv_width = self.kv_heads * self.head_dim;
        let d = self.head_dim;
        (0..b)
            .into_par_iter()
            .map(|i| {
                let qh = self.gather(q.0, q.1, i, self.heads)?;
                let kh = self.gather(k.0, k.1, i, self.kv_heads)?;
                let vh = self.gather(v.0, v.1, i, self.kv_heads)?;
                let dout = self.gather(g.0, g.1, i, self.heads)?;
                let p = self.probabilities(&qh, &kh, t)?;
                let probs = f32_ref(&p)?;
                let h = self.heads;
                let dv = self.product((&p, transposed(h, t, t)), (&dout, plain(h, t, d)))?;
                let mut ds = self.product((&dout, plain(h, t, d)), (&vh, transposed(h, t, d)))?;
                let scale = self.scale;
                par_rows(f32_mut(&mut ds)?, t, |r, row| {
                    let prow = &probs[r * t..(r + 1) * t];
                    let dot: f32 = row.iter().zip(prow).map(|(a, b)| a * b).sum();
                    for (s, p) in row.iter_mut().zip(prow) {
                        *s = p * (*s - dot) * scale;
                    }
                });
                let dq = self.product((&ds, plain(h, t, t)), (&kh, plain(h, t, d)))?;
                let dk = self.product((&ds, transposed(h, t, t)), (&qh, plain(h, t, d)))?;
                let mut gq = vec![0f32; t * width];
                let mut gk = vec![0f32; t * kv_width];
                let mut gv = vec![0f32; t * kv_width];
                self.scatter(f32_ref(&dq)?, &mut gq, t, self.heads);
                self.scatter(f32_ref(&dk)?, &mut gk, t, self.kv_heads);
                self.scatter(f32_ref(&dv)?, &mut gv, t, self.kv_heads);
                Ok([gq, gk, gv])
            })
            .collect()
    }
}

impl CustomOp3 for Attention {
    fn name(&self) -> &'static str {
        "covey-causal-attention"
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
        let (l1, l2, l3) = (
            self.sequences(l1)?,
            self.sequences(l2)?,
            self.sequences(l3)?,
        );
        self.forward((s1, &l1), (s2, &l2), (s3, &l3))
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (n, width) = q.dims2()?;
        let kv_width = self.kv_heads * self.head_dim;
        let grad = grad.to_dtype(DType::F32)?;
        let (q, lq) = self.storage(q)?;
        let (k, lk) = self.storage(k)?;
        let (v, lv) = self.storage(v)?;
        let (g, lg) = self.storage(&grad)?;
        let (sq, sk, sv, sg) = (
            q.storage_and_layout().0,
            k.storage_and_layout().0,
            v.storage_and_layout().0,
            g.storage_and_layout().0,
        );
        let parts = self.backward(
            (cpu(&sq)?, &lq),
            (cpu(&sk)?, &lk),
            (cpu(&sv)?, &lv),
            (cpu(&sg)?, &lg),
        )?;
        let device = q.device();
        // Sequence by sequence, the gradient of input `which`.
        let join = |which: usize, w: usize| {
            let flat: Vec<f32> = parts
                .iter()
                .flat_map(|p| p[which].iter().copied())
                .collect();
            Tensor::from_vec(flat, (n, w), device)
        };
        Ok((
            q.track_op().then(|| join(0, width)).transpose()?,
            k.track_op().then(|| join(1, kv_width)).transpose()?,
            v.track_op().then(|| join(2, kv_width)).transpose()?,
        ))
    }
}

/// Attention over a fused q/k/v projection [B·T, 3·C] (GPT-2's c_attn):
/// one node whose gradient is the fused projection's, where three views
/// would each be padded back to [B·T, 3·C] and summed.
#[derive(Clone, Copy, Debug)]
struct Packed(Attention);

impl Packed {
    fn views(&self, l: &Layout) -> Result<[Layout; 3]> {
        let c = self.0.heads * self.0.head_dim;
        Ok([
            l.narrow(2, 0, c)?,
            l.narrow(2, c, c)?,
            l.narrow(2, 2 * c, c)?,
        ])
    }
}

impl CustomOp1 for Packed {
    fn name(&self) -> &'static str {
        "covey-causal-attention-packed"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let [q, k, v] = self.views(&self.0.sequences(l)?)?;
        self.0.forward((s, &q), (s, &k), (s, &v))
    }

    fn bwd(&self, qkv: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let (n, packed) = qkv.dims2()?;
        let grad = grad.to_dtype(DType::F32)?;
        let (x, lx) = self.0.storage(qkv)?;
        let (g, lg) = self.0.storage(&grad)?;
        let (sx, sg) = (x.storage_and_layout().0, g.storage_and_layout().0);
        let out = self.gradient((cpu(&sx)?, &lx), (cpu(&sg)?, &lg), n * packed)?;
        Tensor::from_vec(out, (n, packed), qkv.device()).map(Some)
    }
}

impl Packed {
    /// The fused projection's gradient [N, 3·C] from its [B, T, 3·C] view
    /// and the output gradient's [B, T, C] view.
    fn gradient(&self, x: Input, g: Input, len: usize) -> Result<Vec<f32>> {
        let t = self.0.seq_len;
        let c = self.0.heads * self.0.head_dim;
        let packed = 3 * c;
        let [q, k, v] = self.views(x.1)?;
        let parts = self.0.backward((x.0, &q), (x.0, &k), (x.0, &v), g)?;
        let mut out = vec![0f32; len];
        for (seq, part) in out.chunks_exact_mut(t * packed).zip(&parts) {
            for (pos, row) in seq.chunks_exact_mut(packed).enumerate() {
                for (which, grads) in part.iter().enumerate() {
                    row[which * c..(which + 1) * c].copy_from_slice(&grads[pos * c..(pos + 1) * c]);
                }
            }
        }
        Ok(out)
    }
}

/// The packed attention node's forward pass over a contiguous qkv [N, 3·C]
/// held in `qkv`: the output [N, C] (a transformer block fused into one
/// node calls this).
pub(crate) fn packed_forward(
    qkv: &CpuStorage,
    n: usize,
    heads: usize,
    seq_len: usize,
) -> Result<Vec<f32>> {
    let packed = qkv.as_slice::<f32>()?.len() / n.max(1);
    let op = packed_op(packed, heads, seq_len)?;
    let layout = op.0.sequences(&Layout::contiguous((n, packed)))?;
    let [q, k, v] = op.views(&layout)?;
    match op.0.forward((qkv, &q), (qkv, &k), (qkv, &v))?.0 {
        CpuStorage::F32(v) => Ok(v),
        _ => candle_core::bail!("attention: the output is not f32"),
    }
}

/// The packed attention node's backward pass: the gradient of qkv [N, 3·C]
/// for the output gradient `dout` [N, C].
pub(crate) fn packed_backward(
    qkv: &CpuStorage,
    dout: &CpuStorage,
    n: usize,
    heads: usize,
    seq_len: usize,
) -> Result<Vec<f32>> {
    let packed = qkv.as_slice::<f32>()?.len() / n.max(1);
    let op = packed_op(packed, heads, seq_len)?;
    let lx = op.0.sequences(&Layout::contiguous((n, packed)))?;
    let lg = op.0.sequences(&Layout::contiguous((n, packed / 3)))?;
    op.gradient((qkv, &lx), (dout, &lg), n * packed)
}

fn packed_op(packed: usize, heads: usize, seq_len: usize) -> Result<Packed> {
    if heads == 0
        || seq_len == 0
        || !packed.is_multiple_of(3)
        || !(packed / 3).is_multiple_of(heads)
    {
        candle_core::bail!("attention: {heads} heads over a fused projection of width {packed}");
    }
    let d = packed / 3 / heads;
    Ok(Packed(Attention {
        heads,
        kv_heads: heads,
        head_dim: d,
        scale: 1.0 / (d as f32).sqrt(),
        seq_len,
    }))
}

/// Self-attention over a fused projection qkv [B·T, 3·C] with `heads`
/// heads (no grouping), rows in sequences of `seq_len`; returns [B·T, C].
pub fn causal_attention_packed(qkv: &Tensor, heads: usize, seq_len: usize) -> Result<Tensor> {
    let (n, packed) = qkv.dims2()?;
    if heads == 0
        || seq_len == 0
        || !n.is_multiple_of(seq_len)
        || !packed.is_multiple_of(3)
        || !(packed / 3).is_multiple_of(heads)
    {
        candle_core::bail!(
            "attention: {heads} heads over a fused projection of width {packed}, {n} rows in sequences of {seq_len}"
        );
    }
    let c = packed / 3;
    let d = c / heads;
    let op = Attention {
        heads,
        kv_heads: heads,
        head_dim: d,
        scale: 1.0 / (d as f32).sqrt(),
        seq_len,
    };
    if qkv.device().is_cpu() {
        qkv.apply_op1(Packed(op))
    } else {
        op.portable(
            &qkv.narrow(1, 0, c)?,
            &qkv.narrow(1, c, c)?,
            &qkv.narrow(1, 2 * c, c)?,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lm::ops::tests::{check_against_portable, random, var};
    use candle_core::Var;

    fn op(heads: usize, kv_heads: usize, d: usize, seq_len: usize) -> Attention {
        Attention {
            heads,
            kv_heads,
            head_dim: d,
            scale: 1.0 / (d as f32).sqrt(),
            seq_len,
        }
    }

    #[test]
    fn fused_attention_matches_candle_ops_in_value_and_gradient() {
        for (b, t, heads, kv, d) in [
            (1, 1, 1, 1, 4),
            (2, 5, 4, 4, 8),
            (3, 17, 4, 2, 8),
            (2, 9, 6, 1, 4),
            // gpt2-bytes' own shape: 4 heads of 64 over 128 positions.
            (2, 128, 4, 4, 64),
        ] {
            let q = var(&[b * t, heads * d], 1);
            let k = var(&[b * t, kv * d], 2);
            let v = var(&[b * t, kv * d], 3);
            check_against_portable(
                &[&q, &k, &v],
                || causal_attention(&q, &k, &v, heads, kv, t).unwrap(),
                || op(heads, kv, d, t).portable(&q, &k, &v).unwrap(),
                &format!("attention b{b} t{t} h{heads}/{kv}"),
            );
        }
    }

    #[test]
    fn views_into_a_fused_projection_work() {
        let (b, t, c) = (2, 6, 16);
        let qkv = var(&[b * t, 3 * c], 4);
        let parts = |x: &Tensor| -> (Tensor, Tensor, Tensor) {
            (
                x.narrow(1, 0, c).unwrap(),
                x.narrow(1, c, c).unwrap(),
                x.narrow(1, 2 * c, c).unwrap(),
            )
        };
        let (q, k, v) = parts(&qkv);
        let fused = causal_attention(&q, &k, &v, 4, 4, t).unwrap();
        let portable = op(4, 4, 4, t).portable(&q, &k, &v).unwrap();
        let upstream = random(&[b * t, c], 5);
        let a = crate::lm::ops::tests::pullback(&fused, &upstream);
        let p = crate::lm::ops::tests::pullback(&portable, &upstream);
        crate::lm::ops::tests::close(
            a.get(&qkv).unwrap(),
            p.get(&qkv).unwrap(),
            1e-4,
            "qkv gradient",
        );
    }

    #[test]
    fn the_packed_form_matches_three_views_in_value_and_gradient() {
        let (b, t, c) = (2, 7, 24);
        let qkv = var(&[b * t, 3 * c], 6);
        let views = || {
            causal_attention(
                &qkv.narrow(1, 0, c).unwrap(),
                &qkv.narrow(1, c, c).unwrap(),
                &qkv.narrow(1, 2 * c, c).unwrap(),
                3,
                3,
                t,
            )
            .unwrap()
        };
        check_against_portable(
            &[&qkv],
            || causal_attention_packed(&qkv, 3, t).unwrap(),
            views,
            "packed attention",
        );
        assert!(causal_attention_packed(&var(&[2, 10], 1), 2, 2).is_err());
        assert!(
            causal_attention_packed(&var(&[3, 12], 1), 2, 2).is_err(),
            "3 rows, sequences of 2"
        );
    }

    #[test]
    fn a_query_never_sees_later_positions() {
        let (t, c) = (5, 8);
        let q = random(&[2 * t, c], 1);
        let k = random(&[2 * t, c], 2);
        let v = Var::from_tensor(&random(&[2 * t, c], 3)).unwrap();
        let out = causal_attention(&q, &k, &v, 2, 2, t).unwrap();
        // The second sequence's first position depends on its own v at
        // position 0 alone.
        let first = out.narrow(0, t, 1).unwrap().sum_all().unwrap();
        let g = first.backward().unwrap();
        let dv = g.get(&v).unwrap().to_vec2::<f32>().unwrap();
        assert!(dv[t].iter().any(|&x| x != 0.0));
        for (row, grads) in dv.iter().enumerate() {
            if row != t {
                assert!(grads.iter().all(|&x| x == 0.0), "row {row}");
            }
        }
        assert!(causal_attention(&q, &random(&[2 * t, 6], 1), &v, 2, 2, t).is_err());
    }
}
