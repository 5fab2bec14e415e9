//! The CNN's convolutions on the CPU as one matrix product each.
//!
//! candle 0.11's CPU conv2d spends most of a training step in its backward
//! pass (a direct transposed convolution and a kernel-gradient convolution;
//! see BENCHMARKS.md). Here activations stay in channel-major [C, B, H, W]
//! layout, a 'same' k×k convolution becomes W[K, C·k²] · cols[C·k², B·H·W],
//! and candle's matmul autograd (gemm on every core) gives both gradients as
//! single large products. Only the unfolding (im2col) and its adjoint are
//! written here, since candle has no unfold op with a backward.

use candle_core::{
    CpuStorage, CustomOp1, D, Layout, Result, Shape, Tensor, backend::BackendStorage,
};
use rayon::prelude::*;
use std::sync::Mutex;

/// Unfolds a [C, B, H, W] tensor into the [C·k², B·H·W] patch matrix of a
/// stride-1 convolution with zero padding k/2 (so the output keeps H × W).
#[derive(Clone, Copy, Debug)]
struct Unfold {
    kernel: usize,
}

/// The adjoint of [`Unfold`]: sums each patch entry back onto the input
/// pixel it came from.
#[derive(Clone, Copy, Debug)]
struct Fold {
    kernel: usize,
    channels: usize,
    batch: usize,
    height: usize,
    width: usize,
}

pub(crate) fn contiguous_f32<'a>(
    storage: &'a CpuStorage,
    layout: &Layout,
    op: &str,
) -> Result<&'a [f32]> {
    let Some((start, end)) = layout.contiguous_offsets() else {
        candle_core::bail!("{op} needs a contiguous input");
    };
    Ok(&storage.as_slice::<f32>()?[start..end])
}

/// For output column x and kernel column kx, the input column is
/// x + kx − pad; the x for which it lies inside [0, width).
fn valid_columns(kx: usize, pad: usize, width: usize) -> (usize, usize) {
    let low = pad.saturating_sub(kx);
    let high = (width + pad).saturating_sub(kx).min(width);
    (low, high.max(low))
}

/// For kernel row ky, the output rows y whose input row y + ky − pad lies
/// inside [0, height), with that input row.
fn shifted_rows(ky: usize, pad: usize, height: usize) -> impl Iterator<Item = (usize, usize)> {
    (0..height).filter_map(move |y| {
        (y + ky)
            .checked_sub(pad)
            .filter(|v| *v < height)
            .map(|y_in| (y, y_in))
    })
}

/// The patch matrix [C·k², len·H·W] of images [start, start + len) of a
/// [C, B, H, W] input, for a stride-1 convolution with zero padding k/2.
fn unfold(
    input: &[f32],
    dims: (usize, usize, usize, usize),
    images: (usize, usize),
    k: usize,
) -> Vec<f32> {
    let (channels, batch, height, width) = dims;
    let (start, len) = images;
    let pad = k / 2;
    let plane = height * width;
    let row_len = len * plane;
    let mut cols = vec![0f32; channels * k * k * row_len];
    if row_len == 0 {
        return cols;
    }
    cols.par_chunks_exact_mut(row_len)
        .enumerate()
        .for_each(|(r, row)| {
            let (c, ky, kx) = (r / (k * k), (r / k) % k, r % k);
            let (x_low, x_high) = valid_columns(kx, pad, width);
            for b in 0..len {
                let src = &input[(c * batch + start + b) * plane..][..plane];
                let dst = &mut row[b * plane..][..plane];
                for (y, y_in) in shifted_rows(ky, pad, height) {
                    let from = y_in * width + x_low + kx - pad;
                    dst[y * width + x_low..y * width + x_high]
                        .copy_from_slice(&src[from..from + (x_high - x_low)]);
                }
            }
        });
    cols
}

impl CustomOp1 for Unfold {
    fn name(&self) -> &'static str {
        "covey-unfold"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let dims = layout.shape().dims4()?;
        let input = contiguous_f32(storage, layout, self.name())?;
        let (channels, batch, height, width) = dims;
        let cols = unfold(input, dims, (0, batch), self.kernel);
        let shape = Shape::from((channels * self.kernel * self.kernel, batch * height * width));
        Ok((CpuStorage::F32(cols), shape))
    }
}

impl CustomOp1 for Fold {
    fn name(&self) -> &'static str {
        "covey-fold"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let cols = contiguous_f32(storage, layout, self.name())?;
        let (k, pad) = (self.kernel, self.kernel / 2);
        let (channels, batch, height, width) = (self.channels, self.batch, self.height, self.width);
        let plane = height * width;
        let row_len = batch * plane;
        if cols.len() != channels * k * k * row_len {
            candle_core::bail!("{} got {} values for its shape", self.name(), cols.len());
        }
        let mut image = vec![0f32; channels * row_len];
        if plane == 0 {
            return Ok((
                CpuStorage::F32(image),
                Shape::from((channels, batch, height, width)),
            ));
        }
        // One image plane (channel c of image b) per task.
        image
            .par_chunks_exact_mut(plane)
            .enumerate()
            .for_each(|(p, dst)| {
                let (c, b) = (p / batch, p % batch);
                for ky in 0..k {
                    for kx in 0..k {
                        let row = ((c * k + ky) * k + kx) * row_len;
                        let src = &cols[row + b * plane..][..plane];
                        let (x_low, x_high) = valid_columns(kx, pad, width);
                        for (y, y_in) in shifted_rows(ky, pad, height) {
                            let to = y_in * width + x_low + kx - pad;
                            let from = &src[y * width + x_low..y * width + x_high];
                            for (d, s) in dst[to..to + from.len()].iter_mut().zip(from) {
                                *d += s;
                            }
                        }
                    }
                }
            });
        Ok((
            CpuStorage::F32(image),
            Shape::from((channels, batch, height, width)),
        ))
    }
}

/// ReLU then 2×2 max pooling (stride 2) over the last two dimensions, in
/// one pass: candle's max_pool2d backward alone takes several full-size
/// passes (upsample, compare, average). ReLU and max commute, so this is
/// max(0, window max); the gradient goes to the window's first maximum
/// when it is positive.
#[derive(Clone, Copy, Debug)]
struct ReluPool;

/// The backward of [`ReluPool`]: (input, gradient of the output) → gradient
/// of the input.
#[derive(Clone, Copy, Debug)]
struct ReluPoolGrad;

/// Index within a 2×2 window (0..4) of its first maximum, and that maximum.
fn window_max(input: &[f32], width: usize, y: usize, x: usize) -> (usize, f32) {
    let at = |dy: usize, dx: usize| input[(2 * y + dy) * width + 2 * x + dx];
    let mut best = (0, at(0, 0));
    for (i, (dy, dx)) in [(0, 1), (1, 0), (1, 1)].into_iter().enumerate() {
        let v = at(dy, dx);
        if v > best.1 {
            best = (i + 1, v);
        }
    }
    best
}

impl CustomOp1 for ReluPool {
    fn name(&self) -> &'static str {
        "covey-relu-pool"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let (n, c, height, width) = layout.shape().dims4()?;
        let input = contiguous_f32(storage, layout, self.name())?;
        let (oh, ow) = (height / 2, width / 2);
        let mut out = vec![0f32; n * c * oh * ow];
        if !out.is_empty() {
            out.par_chunks_exact_mut(oh * ow)
                .zip(input.par_chunks_exact(height * width))
                .for_each(|(dst, plane)| {
                    for (y, row) in dst.chunks_exact_mut(ow).enumerate() {
                        for (x, v) in row.iter_mut().enumerate() {
                            *v = window_max(plane, width, y, x).1.max(0.0);
                        }
                    }
                });
        }
        Ok((CpuStorage::F32(out), Shape::from((n, c, oh, ow))))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(arg.apply_op2_no_bwd(
            &grad_res.contiguous()?,
            &ReluPoolGrad,
        )?))
    }
}

impl candle_core::CustomOp2 for ReluPoolGrad {
    fn name(&self) -> &'static str {
        "covey-relu-pool-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (n, c, height, width) = l1.shape().dims4()?;
        let input = contiguous_f32(s1, l1, self.name())?;
        let grad = contiguous_f32(s2, l2, self.name())?;
        let (oh, ow) = (height / 2, width / 2);
        if grad.len() != n * c * oh * ow {
            candle_core::bail!("{} got a gradient of {} values", self.name(), grad.len());
        }
        let mut out = vec![0f32; input.len()];
        if grad.is_empty() {
            return Ok((CpuStorage::F32(out), l1.shape().clone()));
        }
        out.par_chunks_exact_mut(height * width)
            .zip(input.par_chunks_exact(height * width))
            .zip(grad.par_chunks_exact(oh * ow))
            .for_each(|((dst, plane), grad)| {
                for y in 0..oh {
                    for x in 0..ow {
                        let (i, v) = window_max(plane, width, y, x);
                        if v > 0.0 {
                            dst[(2 * y + i / 2) * width + 2 * x + i % 2] = grad[y * ow + x];
                        }
                    }
                }
            });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }
}

/// `max_pool2d(2)` of `relu(x)` for an NCHW-like x with even H and W.
pub fn relu_max_pool2(x: &Tensor) -> Result<Tensor> {
    let (_, _, h, w) = x.dims4()?;
    if h % 2 != 0 || w % 2 != 0 {
        candle_core::bail!("relu_max_pool2 needs even sides, got {h}x{w}");
    }
    x.contiguous()?.apply_op1(ReluPool)
}

/// The same as [`relu_max_pool2`] from candle's own ops, for devices the
/// custom op does not run on. Not `max_pool2d`: candle 0.11's backward for
/// it multiplies the gradient by (number of maxima)/4, so a unique maximum
/// gets a quarter of its gradient; nor a plain max over each window, whose
/// backward hands every tied maximum the whole gradient (blank MNIST
/// background ties everywhere). Here a one-hot mask of each window's first
/// maximum carries it, as PyTorch does.
pub fn relu_max_pool2_portable(x: &Tensor) -> Result<Tensor> {
    let (n, c, h, w) = x.dims4()?;
    if h % 2 != 0 || w % 2 != 0 {
        candle_core::bail!("relu_max_pool2 needs even sides, got {h}x{w}");
    }
    let windows = x
        .reshape((n, c, h / 2, 2, w / 2, 2))?
        .permute((0, 1, 2, 4, 3, 5))?
        .contiguous()?
        .reshape((n, c, h / 2, w / 2, 4))?;
    let first = windows.detach().argmax_keepdim(D::Minus1)?;
    let slots = Tensor::arange(0u32, 4, x.device())?.reshape((1, 1, 1, 1, 4))?;
    let mask = first
        .broadcast_as(windows.shape())?
        .eq(&slots.broadcast_as(windows.shape())?)?
        .to_dtype(windows.dtype())?;
    (windows * mask)?.sum(D::Minus1)?.relu()
}

/// The most patch-matrix entries one product unfolds at once (16 MiB of
/// f32): a batch of 1,000 MNIST images would otherwise unfold the CNN's
/// second layer into 627 MB.
const MAX_UNFOLD: usize = 1 << 22;

/// A stride-1 'same' convolution as one autograd node: (x [C, B, H, W],
/// weights [K, C, k, k], bias [K]) → [K, B, H, W]. As separate candle ops,
/// the patch matrix's gradient alone (31 MB at batch 50) would be zeroed,
/// added into and read back every step; here the backward goes straight
/// from the output's gradient to those of x, the weights and the bias.
#[derive(Debug)]
struct ConvSame {
    kernel: usize,
    /// The forward's patch matrix when the batch unfolded in one piece: the
    /// weight gradient needs it again, and unfolding twice costs a full
    /// write of it (6 MB at batch 10 in the CNN's second layer).
    patches: Mutex<Option<Vec<f32>>>,
}

impl ConvSame {
    fn new(kernel: usize) -> Self {
        Self {
            kernel,
            patches: Mutex::new(None),
        }
    }

    /// The forward's patch matrix, if it kept one of `len` entries.
    fn take_patches(&self, len: usize) -> Option<Vec<f32>> {
        let kept = self.patches.lock().ok()?.take()?;
        (kept.len() == len).then_some(kept)
    }

    /// Batch slices [start, start + len) of at most [`MAX_UNFOLD`] patch entries.
    fn slices(
        &self,
        channels: usize,
        batch: usize,
        plane: usize,
    ) -> impl Iterator<Item = (usize, usize)> {
        let per_image = channels * self.kernel * self.kernel * plane;
        let slice = (MAX_UNFOLD / per_image).max(1);
        (0..batch)
            .step_by(slice)
            .map(move |start| (start, slice.min(batch - start)))
    }
}

impl candle_core::CustomOp3 for ConvSame {
    fn name(&self) -> &'static str {
        "covey-conv-same"
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
        let dims = l1.shape().dims4()?;
        let (channels, batch, height, width) = dims;
        let (filters, _, k, _) = l2.shape().dims4()?;
        let input = contiguous_f32(s1, l1, self.name())?;
        let bias = contiguous_f32(s3, l3, self.name())?;
        if !l2.is_contiguous() {
            candle_core::bail!("{} needs contiguous weights", self.name());
        }
        // The weights read in place as [K, C·k²], the patches as [C·k², n]:
        // the product comes out in [K, B, H, W] order with no copies.
        let weights =
            Layout::contiguous_with_offset((filters, channels * k * k), l2.start_offset());
        let plane = height * width;
        let mut out = Vec::new();
        for (start, len) in self.slices(channels, batch, plane) {
            let cols = CpuStorage::F32(unfold(input, dims, (start, len), k));
            let cols_layout = Layout::contiguous((channels * k * k, len * plane));
            let y = s2.matmul(
                &cols,
                (1, filters, len * plane, channels * k * k),
                &weights,
                &cols_layout,
            )?;
            let CpuStorage::F32(y) = y else {
                candle_core::bail!("{} needs f32", self.name());
            };
            if len == batch {
                if let (CpuStorage::F32(cols), Ok(mut kept)) = (cols, self.patches.lock()) {
                    *kept = Some(cols);
                }
                out = y;
                break;
            }
            if out.is_empty() {
                out = vec![0f32; filters * batch * plane];
            }
            for (row, values) in y.chunks_exact(len * plane).enumerate() {
                out[(row * batch + start) * plane..][..len * plane].copy_from_slice(values);
            }
        }
        if batch * plane > 0 {
            out.par_chunks_exact_mut(batch * plane)
                .zip(bias)
                .for_each(|(values, b)| values.iter_mut().for_each(|v| *v += b));
        }
        Ok((
            CpuStorage::F32(out),
            Shape::from((filters, batch, height, width)),
        ))
    }

    fn bwd(
        &self,
        x: &Tensor,
        weight: &Tensor,
        _bias: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        // No input gradient for a batch of data (the first layer).
        let wants_grad_x = x.track_op();
        let (x, weight, grad) = (x.detach(), weight.detach(), grad.detach());
        let (channels, batch, height, width) = x.dims4()?;
        let (filters, _, k, _) = weight.dims4()?;
        let w_t = weight.reshape((filters, channels * k * k))?.t()?;
        let plane = height * width;
        let mut grad_w: Option<Tensor> = None;
        let mut grad_x = Vec::new();
        for (start, len) in self.slices(channels, batch, plane) {
            let patches = channels * k * k * len * plane;
            let cols = match self.take_patches(patches) {
                Some(kept) => Tensor::from_vec(kept, (channels * k * k, len * plane), x.device())?,
                None => x
                    .narrow(1, start, len)?
                    .contiguous()?
                    .apply_op1_no_bwd(&Unfold { kernel: k })?,
            };
            let g = grad
                .narrow(1, start, len)?
                .contiguous()?
                .reshape((filters, len * plane))?;
            let part = g.matmul(&cols.t()?)?;
            grad_w = Some(match grad_w {
                Some(sum) => (sum + part)?,
                None => part,
            });
            if wants_grad_x {
                let fold = Fold {
                    kernel: k,
                    channels,
                    batch: len,
                    height,
                    width,
                };
                grad_x.push(w_t.matmul(&g)?.apply_op1_no_bwd(&fold)?);
            }
        }
        let grad_x = match grad_x.len() {
            // An empty batch has no slices: its (empty) gradient is zeros.
            0 => wants_grad_x.then(|| x.zeros_like()).transpose()?,
            1 => Some(grad_x.remove(0)),
            _ => Some(Tensor::cat(&grad_x, 1)?),
        };
        let grad_w = match grad_w {
            Some(g) => g.reshape(weight.shape())?,
            None => weight.zeros_like()?,
        };
        let grad_b = grad.sum((1, 2, 3))?;
        Ok((grad_x, Some(grad_w), Some(grad_b)))
    }
}

/// A stride-1 'same' convolution of a channel-major [C, B, H, W] input with
/// weights [K, C, k, k] and bias [K], giving [K, B, H, W]. Large batches go
/// in slices of at most [`MAX_UNFOLD`] patch entries.
pub fn conv2d_same_cnhw(x: &Tensor, weight: &Tensor, bias: &Tensor) -> Result<Tensor> {
    let (channels, _, _, _) = x.dims4()?;
    let (filters, w_channels, k, k2) = weight.dims4()?;
    if k != k2 || k % 2 == 0 {
        candle_core::bail!("conv2d_same_cnhw needs an odd square kernel, got {k}x{k2}");
    }
    if w_channels != channels || bias.dims() != [filters] {
        candle_core::bail!(
            "conv2d_same_cnhw: {channels} input channels against weights {:?} and bias {:?}",
            weight.dims(),
            bias.dims()
        );
    }
    x.contiguous()?
        .apply_op3(&weight.contiguous()?, &bias.contiguous()?, ConvSame::new(k))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use candle_core::{DType, Device, Var};

    pub(crate) fn random(shape: &[usize], seed: u64) -> Tensor {
        use rand::{Rng, SeedableRng};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let n = shape.iter().product();
        let v: Vec<f32> = (0..n).map(|_| rng.random_range(-1.0..1.0)).collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }

    /// The largest |entry| of `t`.
    pub(crate) fn max_abs(t: &Tensor) -> f32 {
        t.abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    }

    pub(crate) fn max_gap(a: &Tensor, b: &Tensor) -> f32 {
        max_abs(&(a - b).unwrap())
    }

    /// Gradients of Σ y ⊙ upstream: each input's pullback of `upstream`.
    pub(crate) fn pullback(y: &Tensor, upstream: &Tensor) -> candle_core::backprop::GradStore {
        (y * upstream)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap()
    }

    /// The ops split their outputs into chunks on rayon, which refuses a
    /// chunk of zero entries; an empty batch must still go through.
    #[test]
    fn an_empty_batch_goes_through_forward_and_backward() {
        let x = Var::from_tensor(&random(&[2, 0, 6, 6], 1)).unwrap();
        let w = Var::from_tensor(&random(&[3, 2, 3, 3], 2)).unwrap();
        let b = Var::from_tensor(&random(&[3], 3)).unwrap();
        let y = conv2d_same_cnhw(&x, &w, &b).unwrap();
        assert_eq!(y.dims(), [3, 0, 6, 6]);
        let pooled = relu_max_pool2(&y).unwrap();
        assert_eq!(pooled.dims(), [3, 0, 3, 3]);
        let grads = pullback(&pooled, &pooled.zeros_like().unwrap());
        assert_eq!(grads.get(&x).unwrap().dims(), [2, 0, 6, 6]);
        assert_eq!(max_abs(grads.get(&w).unwrap()), 0.0);
    }

    #[test]
    fn matches_candles_conv2d_forward_and_backward() {
        // The last case unfolds 4.7 M patch entries, so it runs in two slices.
        for (b, c, h, w, k, kern) in [
            (3, 1, 28, 28, 4, 5),
            (2, 3, 7, 9, 5, 5),
            (4, 2, 5, 5, 3, 3),
            (30, 32, 14, 14, 4, 5),
        ] {
            if b * c * kern * kern * h * w > MAX_UNFOLD {
                assert!(ConvSame::new(kern).slices(c, b, h * w).count() > 1);
            }
            let x = Var::from_tensor(&random(&[b, c, h, w], 1)).unwrap();
            let weight = Var::from_tensor(&random(&[k, c, kern, kern], 2)).unwrap();
            let bias = Var::from_tensor(&random(&[k], 3)).unwrap();
            let upstream = random(&[b, k, h, w], 4);

            let reference = x
                .conv2d(&weight, kern / 2, 1, 1, 1)
                .unwrap()
                .broadcast_add(&bias.reshape((1, k, 1, 1)).unwrap())
                .unwrap();
            let ours = conv2d_same_cnhw(&x.transpose(0, 1).unwrap(), &weight, &bias)
                .unwrap()
                .transpose(0, 1)
                .unwrap();
            assert!(max_gap(&reference, &ours) < 1e-4, "forward {b} {c} {h} {w}");

            let grads = |y: &Tensor| pullback(y, &upstream);
            let (g_ref, g_ours) = (grads(&reference), grads(&ours));
            for var in [&x, &weight, &bias] {
                let a = g_ref.get(var).unwrap();
                let o = g_ours.get(var).unwrap();
                assert!(
                    max_gap(a, o) < 1e-3,
                    "gradient {:?} for {b} {c} {h} {w}",
                    a.dims()
                );
            }
        }
    }

    #[test]
    fn relu_pool_matches_candle() {
        let x = Var::from_tensor(&random(&[3, 4, 8, 6], 5)).unwrap();
        let upstream = random(&[3, 4, 4, 3], 6);
        let reference = relu_max_pool2_portable(&x).unwrap();
        let ours = relu_max_pool2(&x).unwrap();
        let candle = x.relu().unwrap().max_pool2d(2).unwrap();
        assert!(max_gap(&reference, &candle) < 1e-7);
        assert!(max_gap(&reference, &ours) < 1e-7);
        let grads = |y: &Tensor| pullback(y, &upstream);
        let (a, b) = (grads(&reference), grads(&ours));
        assert!(max_gap(a.get(&x).unwrap(), b.get(&x).unwrap()) < 1e-6);
        // candle's max_pool2d backward hands a unique maximum a quarter of
        // its gradient; if that is ever fixed, the portable path can use it.
        let c = grads(&candle);
        let (ours, theirs) = (b.get(&x).unwrap(), c.get(&x).unwrap());
        assert!(max_gap(&(theirs * 4.0).unwrap(), ours) < 1e-5);
        // Ties: a window of equal positive values passes its gradient to
        // its first element only, in both versions.
        let ones = Tensor::ones((1, 1, 2, 2), DType::F32, &Device::Cpu).unwrap();
        let tied = Var::from_tensor(&ones).unwrap();
        for pooled in [
            relu_max_pool2(&tied).unwrap(),
            relu_max_pool2_portable(&tied).unwrap(),
        ] {
            let g = pooled.sum_all().unwrap().backward().unwrap();
            let g: Vec<f32> = g
                .get(&tied)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            assert_eq!(g, [1.0, 0.0, 0.0, 0.0]);
        }
        assert!(relu_max_pool2(&random(&[1, 1, 3, 4], 1)).is_err());
    }

    #[test]
    fn column_ranges_stay_inside_the_image() {
        for width in 1..8 {
            for kx in 0..5 {
                let (low, high) = valid_columns(kx, 2, width);
                for x in 0..width {
                    let inside = (x + kx).checked_sub(2).is_some_and(|v| v < width);
                    assert_eq!(inside, x >= low && x < high, "w {width} kx {kx} x {x}");
                }
            }
        }
    }

    #[test]
    fn data_inputs_get_no_gradient() {
        let x = random(&[1, 2, 6, 6], 1);
        let w = Var::from_tensor(&random(&[3, 1, 5, 5], 2)).unwrap();
        let b = Var::from_tensor(&random(&[3], 3)).unwrap();
        let y = conv2d_same_cnhw(&x, &w, &b).unwrap();
        let grads = y.sum_all().unwrap().backward().unwrap();
        assert!(grads.get(&x).is_none());
        assert!(grads.get(&w).is_some() && grads.get(&b).is_some());
    }

    #[test]
    fn wrong_kernels_are_refused() {
        let x = random(&[1, 1, 4, 4], 1);
        let w = random(&[2, 1, 4, 4], 2);
        let b = random(&[2], 3);
        assert!(conv2d_same_cnhw(&x, &w, &b).is_err());
        let w = random(&[2, 3, 3, 3], 2);
        assert!(conv2d_same_cnhw(&x, &w, &b).is_err(), "channel mismatch");
    }
}
