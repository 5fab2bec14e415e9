//! Fully connected layers on the CPU as one autograd node each.
//!
//! As candle ops, `x · Wᵀ + b` then ReLU is four nodes (transpose, matmul,
//! broadcast add, ReLU). Backward then zeroes and accumulates a gradient
//! per node, and the transpose node adds the CNN's 1.6 M-entry weight
//! gradient through a strided (element-by-element) loop. Here one node
//! hands back each gradient in its final, contiguous layout.

use candle_core::{
    CpuStorage, CustomOp3, DType, Layout, Result, Shape, Tensor, backend::BackendStorage,
};

use crate::conv::contiguous_f32;

/// `y = x · Wᵀ + b` for x [B, in], W [out, in], b [out], then ReLU when
/// `relu` is set.
#[derive(Clone, Copy, Debug)]
struct Dense {
    relu: bool,
}

impl CustomOp3 for Dense {
    fn name(&self) -> &'static str {
        if self.relu {
            "covey-dense-relu"
        } else {
            "covey-dense"
        }
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
        let (batch, inputs) = l1.shape().dims2()?;
        let (outputs, _) = l2.shape().dims2()?;
        let bias = contiguous_f32(s3, l3, self.name())?;
        if bias.len() != outputs {
            candle_core::bail!(
                "{}: {} biases for {outputs} outputs",
                self.name(),
                bias.len()
            );
        }
        // The product reads W through a transposed layout: no copy of it.
        let y = s1.matmul(s2, (1, batch, outputs, inputs), l1, &l2.transpose(0, 1)?)?;
        let CpuStorage::F32(mut y) = y else {
            candle_core::bail!("{} needs f32", self.name());
        };
        for row in y.chunks_exact_mut(outputs) {
            for (v, b) in row.iter_mut().zip(bias) {
                *v += b;
            }
            if self.relu {
                for v in row.iter_mut() {
                    *v = v.max(0.0);
                }
            }
        }
        Ok((CpuStorage::F32(y), Shape::from((batch, outputs))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        weight: &Tensor,
        _bias: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let grad = if self.relu {
            // ReLU passes the gradient where its output is positive.
            (grad * res.gt(0f32)?.to_dtype(DType::F32)?)?
        } else {
            grad.clone()
        };
        // The input's gradient only where something upstream needs it: not
        // for a batch of data.
        let grad_x = x.track_op().then(|| grad.matmul(weight)).transpose()?;
        let grad_w = grad.t()?.matmul(x)?;
        let grad_b = grad.sum(0)?;
        Ok((grad_x, Some(grad_w), Some(grad_b)))
    }
}

/// `x · Wᵀ + b` for x [B, in], W [out, in] and b [out], followed by ReLU when
/// `relu` is set; one autograd node.
pub fn dense_cpu(x: &Tensor, weight: &Tensor, bias: &Tensor, relu: bool) -> Result<Tensor> {
    let (_, inputs) = x.dims2()?;
    let (outputs, w_inputs) = weight.dims2()?;
    if w_inputs != inputs || bias.dims() != [outputs] {
        candle_core::bail!(
            "dense: input of {inputs} features against weights {:?} and bias {:?}",
            weight.dims(),
            bias.dims()
        );
    }
    x.contiguous()?
        .apply_op3(&weight.contiguous()?, &bias.contiguous()?, Dense { relu })
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
    fn wrong_shapes_are_refused() {
        let x = random(&[4, 6], 1);
        assert!(dense_cpu(&x, &random(&[3, 5], 2), &random(&[3], 3), false).is_err());
        assert!(dense_cpu(&x, &random(&[3, 6], 2), &random(&[4], 3), false).is_err());
    }
}
