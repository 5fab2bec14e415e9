//! Fully connected layers on the CPU as one autograd node each.
//!
//! As candle ops, `x · Wᵀ + b` then ReLU is four nodes (transpose, matmul,
//! broadcast add, ReLU). Backward then zeroes and accumulates a gradient
//! per node, and the transpose node adds the CNN's 1.6 M-entry weight
//! gradient through a strided (element-by-element) loop. Here one node
//! hands back each gradient in its final, contiguous layout.

use candle_core::{
    CpuStorage, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Tensor, backend::BackendStorage,
};

use std::sync::{Arc, Mutex};

use rayon::prelude::*;

use crate::{
    conv::contiguous_f32,
    lm::ops::{gelu, gelu_grad},
};

pub use covey_protocol::model::WeightLayout;

/// What follows the product.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Activation {
    None,
    Relu,
    /// GPT-2's tanh-GELU.
    GeluTanh,
}

/// `y = act(x · W (+ b))` for x [B, in].
#[derive(Clone, Debug)]
struct Dense {
    activation: Activation,
    layout: WeightLayout,
    /// GELU's input, kept from the forward pass for the backward one (its
    /// output alone does not give its slope).
    pre_activation: Arc<Mutex<Vec<f32>>>,
}

impl Dense {
    fn new(activation: Activation, layout: WeightLayout) -> Self {
        Self {
            activation,
            layout,
            pre_activation: Arc::default(),
        }
    }

    fn name(&self) -> &'static str {
        match (self.activation, self.layout) {
            (Activation::Relu, _) => "covey-dense-relu",
            (Activation::GeluTanh, _) => "covey-dense-gelu",
            (Activation::None, WeightLayout::OutIn) => "covey-dense",
            (Activation::None, WeightLayout::InOut) => "covey-dense-in-out",
        }
    }

    fn forward(
        &self,
        x: (&CpuStorage, &Layout),
        w: (&CpuStorage, &Layout),
        bias: Option<&[f32]>,
    ) -> Result<(CpuStorage, Shape)> {
        let (batch, inputs) = x.1.shape().dims2()?;
        // The product reads W through a transposed layout when it is stored
        // [out, in]: no copy of it.
        let (w_layout, outputs) = match self.layout {
            WeightLayout::OutIn => (w.1.transpose(0, 1)?, w.1.shape().dims2()?.0),
            WeightLayout::InOut => (w.1.clone(), w.1.shape().dims2()?.1),
        };
        if let Some(bias) = bias
            && bias.len() != outputs
        {
            candle_core::bail!(
                "{}: {} biases for {outputs} outputs",
                self.name(),
                bias.len()
            );
        }
        // A frozen bf16 or f16 weight (a narrow LoRA base) is widened for
        // this product alone.
        let wide = crate::lm::ops::widen(w.0, w.1, self.name())?;
        let (w_storage, w_layout) = match &wide {
            Some(wide) => {
                let contiguous = Layout::contiguous(w.1.shape());
                let layout = match self.layout {
                    WeightLayout::OutIn => contiguous.transpose(0, 1)?,
                    WeightLayout::InOut => contiguous,
                };
                (wide, layout)
            }
            None => (w.0, w_layout),
        };
        let y =
            x.0.matmul(w_storage, (1, batch, outputs, inputs), x.1, &w_layout)?;
        let CpuStorage::F32(mut y) = y else {
            candle_core::bail!("{} needs f32", self.name());
        };
        if let Some(bias) = bias {
            y.par_chunks_mut(outputs.max(1) * 16).for_each(|rows| {
                for row in rows.chunks_exact_mut(outputs.max(1)) {
                    for (v, b) in row.iter_mut().zip(bias) {
                        *v += b;
                    }
                }
            });
        }
        match self.activation {
            Activation::None => {}
            Activation::Relu => y.par_chunks_mut(1 << 14).for_each(|c| {
                c.iter_mut().for_each(|v| *v = v.max(0.0));
            }),
            Activation::GeluTanh => {
                let mut kept = self.pre_activation.lock().map_err(|_| {
                    candle_core::Error::Msg(format!("{}: state poisoned", self.name()))
                })?;
                kept.clear();
                kept.extend_from_slice(&y);
                y.par_chunks_mut(1 << 14).for_each(|c| {
                    c.iter_mut().for_each(|v| *v = gelu(*v));
                });
            }
        }
        Ok((CpuStorage::F32(y), Shape::from((batch, outputs))))
    }

    /// Gradients of x, W and b, each only where something needs it: not
    /// for a batch of data, nor for a frozen weight.
    fn backward(
        &self,
        x: &Tensor,
        weight: &Tensor,
        bias: Option<&Tensor>,
        res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let grad = match self.activation {
            Activation::None => grad.clone(),
            // ReLU passes the gradient where its output is positive.
            Activation::Relu => (grad * res.gt(0f32)?.to_dtype(DType::F32)?)?,
            Activation::GeluTanh => {
                let pre = self.pre_activation.lock().map_err(|_| {
                    candle_core::Error::Msg(format!("{}: state poisoned", self.name()))
                })?;
                let g = grad.contiguous()?.flatten_all()?.to_vec1::<f32>()?;
                if pre.len() != g.len() {
                    candle_core::bail!("{}: the forward pass's input is gone", self.name());
                }
                let mut out = vec![0f32; g.len()];
                out.par_chunks_mut(1 << 14)
                    .zip(g.par_chunks(1 << 14).zip(pre.par_chunks(1 << 14)))
                    .for_each(|(o, (g, p))| {
                        for ((o, g), p) in o.iter_mut().zip(g).zip(p) {
                            *o = g * gelu_grad(*p);
                        }
                    });
                Tensor::from_vec(out, grad.shape(), grad.device())?
            }
        };
        let grad_x = x
            .track_op()
            .then(|| {
                // A narrow weight is frozen: widened again here, not kept
                // wide from the forward pass.
                let weight = weight.to_dtype(DType::F32)?;
                match self.layout {
                    WeightLayout::OutIn => grad.matmul(&weight),
                    WeightLayout::InOut => grad.matmul(&weight.t()?),
                }
            })
            .transpose()?;
        let grad_w = weight
            .track_op()
            .then(|| match self.layout {
                WeightLayout::OutIn => grad.t()?.matmul(x),
                WeightLayout::InOut => x.t()?.matmul(&grad),
            })
            .transpose()?;
        let grad_b = bias
            .filter(|b| b.track_op())
            .map(|_| crate::lm::ops::column_sums(&grad))
            .transpose()?;
        Ok((grad_x, grad_w, grad_b))
    }
}

impl CustomOp3 for Dense {
    fn name(&self) -> &'static str {
        Dense::name(self)
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
        let bias = contiguous_f32(s3, l3, Dense::name(self))?;
        self.forward((s1, l1), (s2, l2), Some(bias))
    }

    fn bwd(
        &self,
        x: &Tensor,
        weight: &Tensor,
        bias: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        self.backward(x, weight, Some(bias), res, grad)
    }
}

/// [`Dense`] without a bias.
#[derive(Clone, Debug)]
struct Unbiased(Dense);

impl CustomOp2 for Unbiased {
    fn name(&self) -> &'static str {
        self.0.name()
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        self.0.forward((s1, l1), (s2, l2), None)
    }

    fn bwd(
        &self,
        x: &Tensor,
        weight: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (gx, gw, _) = self.0.backward(x, weight, None, res, grad)?;
        Ok((gx, gw))
    }
}

/// `x · Wᵀ + b` for x [B, in], W [out, in] and b [out], followed by ReLU when
/// `relu` is set; one autograd node.
pub fn dense_cpu(x: &Tensor, weight: &Tensor, bias: &Tensor, relu: bool) -> Result<Tensor> {
    let activation = if relu {
        Activation::Relu
    } else {
        Activation::None
    };
    linear_cpu(x, weight, Some(bias), WeightLayout::OutIn, activation)
}

/// `act(x · W (+ b))` for x [B, in] and W stored as `layout` says; one
/// autograd node, on the CPU.
pub fn linear_cpu(
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    layout: WeightLayout,
    activation: Activation,
) -> Result<Tensor> {
    let (_, inputs) = x.dims2()?;
    let (w_inputs, outputs) = match (layout, weight.dims2()?) {
        (WeightLayout::OutIn, (o, i)) => (i, o),
        (WeightLayout::InOut, (i, o)) => (i, o),
    };
    if w_inputs != inputs || bias.is_some_and(|b| b.dims() != [outputs]) {
        candle_core::bail!(
            "dense: input of {inputs} features against weights {:?} ({layout:?}) and bias {:?}",
            weight.dims(),
            bias.map(|b| b.dims().to_vec())
        );
    }
    let op = Dense::new(activation, layout);
    let x = x.contiguous()?;
    let weight = weight.contiguous()?;
    match bias {
        Some(b) => x.apply_op3(&weight, &b.contiguous()?, op),
        None => x.apply_op2(&weight, Unbiased(op)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::conv::tests::{max_gap, pullback, random};
    use candle_core::Var;

    #[test]
    fn matches_candle_ops_forward_and_backward() {
        for relu in [false, true] {
            for (b, inputs, outputs) in [(1, 3, 2), (7, 33, 10), (50, 300, 64)] {
                let x = Var::from_tensor(&random(&[b, inputs], 1)).unwrap();
                let w = Var::from_tensor(&random(&[outputs, inputs], 2)).unwrap();
                let bias = Var::from_tensor(&random(&[outputs], 3)).unwrap();
                let upstream = random(&[b, outputs], 4);
                let mut reference = x
                    .matmul(&w.t().unwrap())
                    .unwrap()
                    .broadcast_add(&bias)
                    .unwrap();
                if relu {
                    reference = reference.relu().unwrap();
                }
                let ours = dense_cpu(&x, &w, &bias, relu).unwrap();
                assert!(max_gap(&reference, &ours) < 1e-5, "forward {b} {inputs}");
                let grads = |y: &Tensor| pullback(y, &upstream);
                let (g_ref, g_ours) = (grads(&reference), grads(&ours));
                for var in [&x, &w, &bias] {
                    let (a, o) = (g_ref.get(var).unwrap(), g_ours.get(var).unwrap());
                    assert!(o.is_contiguous());
                    assert!(max_gap(a, o) < 1e-4, "gradient {:?} relu {relu}", a.dims());
                }
            }
        }
    }

    #[test]
    fn data_inputs_get_no_gradient() {
        let x = random(&[4, 6], 1);
        let w = Var::from_tensor(&random(&[3, 6], 2)).unwrap();
        let bias = Var::from_tensor(&random(&[3], 3)).unwrap();
        let grads = dense_cpu(&x, &w, &bias, true)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        assert!(grads.get(&x).is_none());
        assert!(grads.get(&w).is_some());
    }

    #[test]
    fn both_weight_layouts_with_and_without_bias_match_candle_ops() {
        let x = Var::from_tensor(&random(&[9, 12], 1)).unwrap();
        let w = Var::from_tensor(&random(&[12, 7], 2)).unwrap();
        let bias = Var::from_tensor(&random(&[7], 3)).unwrap();
        let upstream = random(&[9, 7], 4);
        let wt = Var::from_tensor(&w.t().unwrap().contiguous().unwrap()).unwrap();
        for (weight, layout) in [(&w, WeightLayout::InOut), (&wt, WeightLayout::OutIn)] {
            for with_bias in [false, true] {
                let b = with_bias.then_some(bias.as_tensor());
                let ours = linear_cpu(&x, weight, b, layout, Activation::None).unwrap();
                let mut reference = x.matmul(w.as_tensor()).unwrap();
                if with_bias {
                    reference = reference.broadcast_add(&bias).unwrap();
                }
                assert!(
                    max_gap(&reference, &ours) < 1e-5,
                    "{layout:?} bias {with_bias}"
                );
                let g = pullback(&ours, &upstream);
                let r = pullback(&reference, &upstream);
                assert!(max_gap(g.get(&x).unwrap(), r.get(&x).unwrap()) < 1e-4);
                let gw = g.get(weight).unwrap();
                let rw = r.get(&w).unwrap();
                let rw = if layout == WeightLayout::OutIn {
                    rw.t().unwrap()
                } else {
                    rw.clone()
                };
                assert!(max_gap(gw, &rw) < 1e-4, "{layout:?} weight gradient");
                assert_eq!(g.get(&bias).is_some(), with_bias);
            }
        }
        // A frozen weight gets no gradient, and costs no product.
        let frozen = random(&[12, 7], 5);
        let g = pullback(
            &linear_cpu(&x, &frozen, None, WeightLayout::InOut, Activation::None).unwrap(),
            &upstream,
        );
        assert!(g.get(&frozen).is_none() && g.get(&x).is_some());
    }

    #[test]
    fn gelu_after_the_product_matches_the_separate_ops() {
        let x = Var::from_tensor(&random(&[9, 12], 1)).unwrap();
        let w = Var::from_tensor(&random(&[12, 30], 2)).unwrap();
        let bias = Var::from_tensor(&random(&[30], 3)).unwrap();
        let upstream = random(&[9, 30], 4);
        let ours = linear_cpu(
            &x,
            &w,
            Some(&bias),
            WeightLayout::InOut,
            Activation::GeluTanh,
        )
        .unwrap();
        let plain = linear_cpu(&x, &w, Some(&bias), WeightLayout::InOut, Activation::None).unwrap();
        let reference = crate::lm::ops::gelu_tanh_portable(&plain).unwrap();
        assert!(max_gap(&reference, &ours) < 1e-5);
        let (g, r) = (pullback(&ours, &upstream), pullback(&reference, &upstream));
        for v in [&x, &w, &bias] {
            assert!(max_gap(g.get(v).unwrap(), r.get(v).unwrap()) < 1e-4);
        }
    }

    #[test]
    fn wrong_shapes_are_refused() {
        let x = random(&[4, 6], 1);
        assert!(dense_cpu(&x, &random(&[3, 5], 2), &random(&[3], 3), false).is_err());
        assert!(dense_cpu(&x, &random(&[3, 6], 2), &random(&[4], 3), false).is_err());
    }

    /// A frozen bf16 or f16 weight (a narrow LoRA base) computes what its
    /// widened f32 copy computes, in value and input gradient, in both
    /// layouts, and never gets a gradient of its own.
    #[test]
    fn a_narrow_frozen_weight_is_widened_inside_the_op() {
        for dtype in [DType::BF16, DType::F16] {
            for layout in [WeightLayout::OutIn, WeightLayout::InOut] {
                let x = Var::from_tensor(&random(&[5, 12], 1)).unwrap();
                let shape: &[usize] = match layout {
                    WeightLayout::OutIn => &[7, 12],
                    WeightLayout::InOut => &[12, 7],
                };
                let narrow = random(shape, 2).to_dtype(dtype).unwrap();
                let wide = narrow.to_dtype(DType::F32).unwrap();
                let upstream = random(&[5, 7], 3);
                let ours = linear_cpu(&x, &narrow, None, layout, Activation::GeluTanh).unwrap();
                let reference = linear_cpu(&x, &wide, None, layout, Activation::GeluTanh).unwrap();
                assert!(max_gap(&reference, &ours) < 1e-6, "{dtype:?} {layout:?}");
                let (g_ours, g_ref) = (pullback(&ours, &upstream), pullback(&reference, &upstream));
                let gap = max_gap(g_ours.get(&x).unwrap(), g_ref.get(&x).unwrap());
                assert!(
                    gap < 1e-6,
                    "{dtype:?} {layout:?}: x gradient differs by {gap}"
                );
                assert!(g_ours.get(&narrow).is_none());
            }
        }
    }
}
