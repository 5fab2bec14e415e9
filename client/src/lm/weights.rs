//! A language model's parameters on a device, by Hugging Face name: the
//! frozen base, the trainable vector as candle variables, and the LoRA
//! factors on the projections they adapt.

use std::{collections::HashMap, sync::Arc};

use candle_core::{DType, Device, Tensor, Var};
use covey_protocol::model::{LanguageSpec, LmArch, LoraVariant, TensorSpec, Tuning};

use super::{
    LmError,
    block::{Adapter as BlockAdapter, Block, Lora, Offsets, PROJECTIONS},
};

/// The layer a GPT-2 tensor belongs to (`h.3.…`).
fn gpt2_layer(name: &str) -> Option<usize> {
    name.strip_prefix("h.")?.split('.').next()?.parse().ok()
}

/// Whether GPT-2's blocks run as one node each (see [`super::block`]): on
/// the CPU. Their parameters are then held as one blob per layer.
pub(crate) fn fused_blocks(spec: &LanguageSpec, device: &Device) -> bool {
    device.is_cpu() && matches!(spec.arch, LmArch::Gpt2(_))
}

/// Tensors laid out back to back: one per layer when `by_layer` is set
/// (its tensors are adjacent in wire order), one per tensor otherwise.
struct Groups {
    /// Each group's tensor (a variable's, when trainable) and its layer.
    tensors: Vec<(Option<usize>, Tensor)>,
    vars: Vec<Var>,
    /// Every tensor by name, as a view into its group.
    views: HashMap<String, Tensor>,
}

impl Groups {
    /// Trainable groups: one variable each, copied from `flat`.
    fn trainable(
        specs: &[TensorSpec],
        flat: &[f32],
        device: &Device,
        by_layer: bool,
    ) -> Result<Self, LmError> {
        let mut vars = Vec::new();
        let mut out = Self::split(specs, by_layer, |at, len| {
            let var = Var::from_slice(&flat[at..at + len], len, device)?;
            let t = var.as_tensor().clone();
            vars.push(var);
            Ok(t)
        })?;
        out.vars = vars;
        Ok(out)
    }

    /// Frozen groups: views into one tensor made from `values` without a
    /// copy, in the dtype they were read in.
    fn frozen(
        specs: &[TensorSpec],
        values: BaseValues,
        device: &Device,
        by_layer: bool,
    ) -> Result<Self, LmError> {
        let len = values.len();
        let whole = match values {
            BaseValues::F32(v) => Tensor::from_vec(v, len, device)?,
            BaseValues::BF16(v) => Tensor::from_vec(v, len, device)?,
            BaseValues::F16(v) => Tensor::from_vec(v, len, device)?,
        };
        Self::split(specs, by_layer, |at, len| Ok(whole.narrow(0, at, len)?))
    }

    /// Groups consecutive `specs` (a layer's, when `by_layer` is set), each
    /// group's tensor made by `group(offset, len)`, with views by name.
    fn split(
        specs: &[TensorSpec],
        by_layer: bool,
        mut group: impl FnMut(usize, usize) -> Result<Tensor, LmError>,
    ) -> Result<Self, LmError> {
        let mut out = Self {
            tensors: Vec::new(),
            vars: Vec::new(),
            views: HashMap::with_capacity(specs.len()),
        };
        let mut i = 0;
        let mut at = 0;
        while i < specs.len() {
            let layer = if by_layer {
                gpt2_layer(&specs[i].name)
            } else {
                None
            };
            let mut j = i + 1;
            while layer.is_some() && j < specs.len() && gpt2_layer(&specs[j].name) == layer {
                j += 1;
            }
            let len: usize = specs[i..j].iter().map(TensorSpec::len).sum();
            let tensor = group(at, len)?;
            let mut offset = 0;
            for t in &specs[i..j] {
                let view = tensor
                    .narrow(0, offset, t.len())?
                    .reshape(t.shape.as_slice())?;
                out.views.insert(t.name.clone(), view);
                offset += t.len();
            }
            out.tensors.push((layer, tensor));
            at += len;
            i = j;
        }
        Ok(out)
    }

    /// Each layer's group, in layer order.
    fn layers(&self) -> Vec<Tensor> {
        self.tensors
            .iter()
            .filter(|(layer, _)| layer.is_some())
            .map(|(_, t)| t.clone())
            .collect()
    }
}

/// A frozen base's values, flat in the family's order, in the dtype the
/// device holds them in: read straight into bf16 or f16 from a checkpoint
/// (see [`super::reader`]), never widened to f32 on the way.
#[derive(Clone, Debug, PartialEq)]
pub enum BaseValues {
    F32(Vec<f32>),
    BF16(Vec<half::bf16>),
    F16(Vec<half::f16>),
}

impl BaseValues {
    /// `flat` held as `dtype`: bf16 and f16 narrow it, anything else keeps
    /// f32.
    pub fn narrowed(flat: Vec<f32>, dtype: DType) -> Self {
        match dtype {
            DType::BF16 => Self::BF16(flat.into_iter().map(half::bf16::from_f32).collect()),
            DType::F16 => Self::F16(flat.into_iter().map(half::f16::from_f32).collect()),
            _ => Self::F32(flat),
        }
    }

    pub fn len(&self) -> usize {
        match self {
            Self::F32(v) => v.len(),
            Self::BF16(v) => v.len(),
            Self::F16(v) => v.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn dtype(&self) -> DType {
        match self {
            Self::F32(_) => DType::F32,
            Self::BF16(_) => DType::BF16,
            Self::F16(_) => DType::F16,
        }
    }
}

/// The base parameters of a LoRA run, resident on a device and shared by
/// every round that uses them. `dtype` may be bf16 or f16 to halve the
/// memory they take; each use widens them to f32.
#[derive(Debug)]
pub struct BaseTensors {
    tensors: HashMap<String, Tensor>,
    /// One blob per layer, for the fused blocks.
    layers: Vec<Tensor>,
    bytes: usize,
}

impl BaseTensors {
    /// Splits a flat vector in the family's tensor order into named
    /// tensors on `device`, stored as `dtype`.
    pub fn from_flat(
        spec: &LanguageSpec,
        flat: Vec<f32>,
        device: &Device,
        dtype: DType,
    ) -> Result<Self, LmError> {
        Self::from_values(spec, BaseValues::narrowed(flat, dtype), device)
    }

    /// Splits `values`, in the family's tensor order, into named tensors on
    /// `device`, in the values' dtype.
    pub fn from_values(
        spec: &LanguageSpec,
        values: BaseValues,
        device: &Device,
    ) -> Result<Self, LmError> {
        let tensors = spec.arch.family().tensors();
        let expected: usize = tensors.iter().map(|t| t.len()).sum();
        if values.len() != expected {
            return Err(LmError::WeightCount {
                what: "base model",
                expected,
                got: values.len(),
            });
        }
        let bytes = expected * values.dtype().size_in_bytes();
        let groups = Groups::frozen(&tensors, values, device, fused_blocks(spec, device))?;
        Ok(Self {
            layers: groups.layers(),
            bytes,
            tensors: groups.views,
        })
    }

    /// Bytes the base takes on its device.
    pub fn bytes(&self) -> usize {
        self.bytes
    }
}

/// One adapted projection: y += scale · (x·Aᵀ)·Bᵀ.
#[derive(Clone, Debug)]
struct Adapter {
    a: Tensor,
    b: Tensor,
    scale: f64,
}

/// GPT-2's layers as fused blocks: each one's settings and blobs.
struct Blocks {
    plan: Vec<Block>,
    params: Vec<Tensor>,
    lora: Vec<Tensor>,
}

/// Every parameter a forward pass reads.
pub struct Weights {
    tensors: HashMap<String, Tensor>,
    base: Option<Arc<BaseTensors>>,
    adapters: HashMap<String, Adapter>,
    trainable: Vec<Var>,
    blocks: Option<Blocks>,
}

pub use crate::dense::WeightLayout as Orientation;
use crate::dense::{Activation, linear_cpu};

impl Weights {
    /// Builds the parameters from the trainable vector, and for LoRA from
    /// `base` (which full fine-tuning does not use).
    pub fn new(
        spec: &LanguageSpec,
        trainable: &[f32],
        base: Option<Arc<BaseTensors>>,
        device: &Device,
    ) -> Result<Self, LmError> {
        let wanted = spec.trainable_tensors();
        let expected: usize = wanted.iter().map(|t| t.len()).sum();
        if trainable.len() != expected {
            return Err(LmError::WeightCount {
                what: "trainable vector",
                expected,
                got: trainable.len(),
            });
        }
        let fused = fused_blocks(spec, device);
        let groups = Groups::trainable(&wanted, trainable, device, fused)?;
        let by_name = groups.views.clone();
        let (tensors, base, adapters) = match &spec.tuning {
            Tuning::Full => (by_name.clone(), None, HashMap::new()),
            Tuning::Lora { lora, .. } => {
                let base = base.ok_or(LmError::NoBase)?;
                let modules = spec.lora_modules()?;
                let scale = f64::from(lora.scale());
                let r = lora.rank as usize;
                let mut adapters = HashMap::with_capacity(modules.len());
                for (i, m) in modules.iter().enumerate() {
                    let take = |factor: &str| {
                        by_name
                            .get(&format!("{}.{factor}.weight", m.path))
                            .cloned()
                            .ok_or_else(|| LmError::MissingTensor(format!("{}.{factor}", m.path)))
                    };
                    let a = match lora.variant {
                        LoraVariant::Plain => take("lora_A")?,
                        LoraVariant::FrozenA => {
                            Tensor::from_vec(lora.a_factor(i, m), (r, m.inputs), device)?
                        }
                    };
                    let b = take("lora_B")?;
                    adapters.insert(m.path.clone(), Adapter { a, b, scale });
                }
                (HashMap::new(), Some(base), adapters)
            }
        };
        let blocks = match (&spec.arch, fused) {
            (LmArch::Gpt2(c), true) => {
                Some(Self::blocks(spec, c, &groups, base.as_deref(), device)?)
            }
            _ => None,
        };
        Ok(Self {
            tensors,
            base,
            adapters,
            trainable: groups.vars,
            blocks,
        })
    }

    /// The fused blocks' settings and blobs.
    fn blocks(
        spec: &LanguageSpec,
        c: &covey_protocol::model::Gpt2Config,
        groups: &Groups,
        base: Option<&BaseTensors>,
        device: &Device,
    ) -> Result<Blocks, LmError> {
        let offsets = Offsets::new(c.n_embd, c.n_inner);
        let layer_groups = groups.layers();
        let none = Tensor::zeros(1, DType::F32, device)?;
        let (params, lora_blobs) = match (&spec.tuning, base) {
            (Tuning::Full, _) => (layer_groups, vec![none; c.n_layer]),
            (Tuning::Lora { .. }, Some(base)) => {
                // A layer may carry no adapter at all (targets elsewhere).
                let mut lora = vec![none; c.n_layer];
                for (layer, t) in &groups.tensors {
                    if let Some(l) = layer {
                        lora[*l] = t.clone();
                    }
                }
                (base.layers.clone(), lora)
            }
            (Tuning::Lora { .. }, None) => return Err(LmError::NoBase),
        };
        if params.len() != c.n_layer {
            return Err(LmError::MissingTensor(format!(
                "{} layer blobs for {} layers",
                params.len(),
                c.n_layer
            )));
        }
        let mut plan: Vec<Block> = (0..c.n_layer)
            .map(|_| Block {
                offsets,
                heads: c.n_head,
                eps: c.layer_norm_epsilon as f32,
                seq_len: 0,
                lora: None,
            })
            .collect();
        if let Tuning::Lora { lora, .. } = &spec.tuning {
            let modules = spec.lora_modules()?;
            let r = lora.rank as usize;
            let mut layers: Vec<Lora> = (0..c.n_layer)
                .map(|_| Lora {
                    rank: r,
                    scale: lora.scale(),
                    adapters: Default::default(),
                })
                .collect();
            // Offsets inside each layer's LoRA blob, in wire order.
            let mut cursor = vec![0usize; c.n_layer];
            for (i, m) in modules.iter().enumerate() {
                let layer =
                    gpt2_layer(&m.path).ok_or_else(|| LmError::MissingTensor(m.path.clone()))?;
                let j = PROJECTIONS
                    .iter()
                    .position(|p| m.path.ends_with(p))
                    .ok_or_else(|| LmError::MissingTensor(m.path.clone()))?;
                let (a_at, frozen_a) = match lora.variant {
                    LoraVariant::Plain => {
                        let at = cursor[layer];
                        cursor[layer] += r * m.inputs;
                        (Some(at), None)
                    }
                    LoraVariant::FrozenA => (None, Some(Arc::new(lora.a_factor(i, m)))),
                };
                let b_at = cursor[layer];
                cursor[layer] += m.outputs * r;
                layers[layer].adapters[j] = Some(BlockAdapter {
                    frozen_a,
                    a_at,
                    b_at,
                });
            }
            for (block, l) in plan.iter_mut().zip(layers) {
                if l.adapters.iter().any(Option::is_some) {
                    block.lora = Some(Arc::new(l));
                }
            }
        }
        Ok(Blocks {
            plan,
            params,
            lora: lora_blobs,
        })
    }

    /// Runs layer `i` as one fused node, when the blocks are fused.
    pub(crate) fn block(
        &self,
        i: usize,
        x: &Tensor,
        seq_len: usize,
    ) -> Option<Result<Tensor, LmError>> {
        let b = self.blocks.as_ref()?;
        let mut plan = b.plan.get(i)?.clone();
        plan.seq_len = seq_len;
        Some(
            super::block::forward(&plan, x, b.params.get(i)?, b.lora.get(i)?)
                .map_err(LmError::from),
        )
    }

    /// The gradient of the trainable vector in `grads`, flat in wire order
    /// (zeros where nothing reached).
    pub fn gradient(&self, grads: &candle_core::backprop::GradStore) -> Result<Vec<f32>, LmError> {
        let mut out = Vec::new();
        for v in &self.trainable {
            match grads.get(v) {
                Some(g) => out.extend(g.flatten_all()?.to_vec1::<f32>()?),
                None => out.extend(std::iter::repeat_n(0.0, v.elem_count())),
            }
        }
        Ok(out)
    }

    /// The trainable variables, in wire order.
    pub fn vars(&self) -> &[Var] {
        &self.trainable
    }

    /// The trainable vector as it stands now.
    pub fn flat(&self) -> Result<Vec<f32>, LmError> {
        let mut out = Vec::new();
        for v in &self.trainable {
            out.extend(v.as_tensor().flatten_all()?.to_vec1::<f32>()?);
        }
        Ok(out)
    }

    /// A parameter by its Hugging Face name, as f32.
    pub fn get(&self, name: &str) -> Result<Tensor, LmError> {
        let t = self
            .tensors
            .get(name)
            .or_else(|| self.base.as_ref().and_then(|b| b.tensors.get(name)))
            .ok_or_else(|| LmError::MissingTensor(name.to_owned()))?;
        if t.dtype() == DType::F32 {
            Ok(t.clone())
        } else {
            Ok(t.to_dtype(DType::F32)?)
        }
    }

    /// A parameter by name as it is stored (bf16 or f16 for a narrow base).
    fn stored(&self, name: &str) -> Result<Tensor, LmError> {
        self.tensors
            .get(name)
            .or_else(|| self.base.as_ref().and_then(|b| b.tensors.get(name)))
            .cloned()
            .ok_or_else(|| LmError::MissingTensor(name.to_owned()))
    }

    /// The rows `ids` of the embedding `name` [V, C], as f32: only the
    /// rows used are widened from a narrow base.
    pub fn embed(&self, name: &str, ids: &Tensor) -> Result<Tensor, LmError> {
        let table = self.stored(name)?;
        let rows = table.index_select(&ids.flatten_all()?, 0)?;
        Ok(if rows.dtype() == DType::F32 {
            rows
        } else {
            rows.to_dtype(DType::F32)?
        })
    }

    /// Logits [N, V] of h [N, C] against the head stored as parameter
    /// `name` [V, C] (see [`Self::head`]); a narrow head is widened a block
    /// of vocabulary at a time, never whole: on the CPU inside the product,
    /// forward and backward, so no wide copy outlives it; elsewhere as a
    /// wide block the graph keeps.
    pub fn head_named(&self, h: &Tensor, name: &str) -> Result<Tensor, LmError> {
        let head = self.stored(name)?;
        if head.dtype() == DType::F32 {
            return self.head(h, &head);
        }
        const ROWS: usize = 8192;
        let vocab = head.dim(0)?;
        let parts = (0..vocab)
            .step_by(ROWS)
            .map(|start| {
                let block = head.narrow(0, start, ROWS.min(vocab - start))?;
                if h.device().is_cpu() {
                    self.head(h, &block)
                } else {
                    self.head(h, &block.to_dtype(DType::F32)?)
                }
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Tensor::cat(&parts, 1)?)
    }

    fn find(&self, name: &str) -> Option<Tensor> {
        self.get(name).ok()
    }

    /// Logits [N, V] of hidden states h [N, C] against an LM head stored
    /// [V, C] (a tied token embedding or lm_head). On the CPU one node, with
    /// no gradient for a frozen head: candle's matmul computes both
    /// gradients, which for GPT-2's frozen 50257 × 768 embedding under LoRA
    /// is a third of a step.
    pub fn head(&self, h: &Tensor, head: &Tensor) -> Result<Tensor, LmError> {
        if h.device().is_cpu() {
            Ok(linear_cpu(
                h,
                head,
                None,
                Orientation::OutIn,
                Activation::None,
            )?)
        } else {
            Ok(h.matmul(&head.t()?)?)
        }
    }

    /// GELU(projection `path` of x): one node on the CPU when no adapter
    /// adds to the projection first.
    pub fn linear_gelu(
        &self,
        x: &Tensor,
        path: &str,
        orientation: Orientation,
    ) -> Result<Tensor, LmError> {
        if x.device().is_cpu() && !self.adapters.contains_key(path) {
            let w = self.stored(&format!("{path}.weight"))?;
            let b = self.find(&format!("{path}.bias"));
            return Ok(linear_cpu(
                x,
                &w,
                b.as_ref(),
                orientation,
                Activation::GeluTanh,
            )?);
        }
        Ok(super::ops::gelu_tanh(&self.linear(
            x,
            path,
            orientation,
        )?)?)
    }

    /// The projection `path` applied to x [N, in]: its weight, its bias if
    /// it has one, and its adapter if LoRA targets it.
    pub fn linear(
        &self,
        x: &Tensor,
        path: &str,
        orientation: Orientation,
    ) -> Result<Tensor, LmError> {
        let b = self.find(&format!("{path}.bias"));
        let mut y = if x.device().is_cpu() {
            // One node for product and bias, with no gradient for a frozen W,
            // which a narrow base keeps narrow (the op widens it).
            let w = self.stored(&format!("{path}.weight"))?;
            linear_cpu(x, &w, b.as_ref(), orientation, Activation::None)?
        } else {
            let w = self.get(&format!("{path}.weight"))?;
            let y = match orientation {
                Orientation::InOut => x.matmul(&w)?,
                Orientation::OutIn => x.matmul(&w.t()?)?,
            };
            match &b {
                Some(b) => y.broadcast_add(b)?,
                None => y,
            }
        };
        if let Some(ad) = self.adapters.get(path) {
            let up = if x.device().is_cpu() {
                let low = linear_cpu(x, &ad.a, None, Orientation::OutIn, Activation::None)?;
                linear_cpu(&low, &ad.b, None, Orientation::OutIn, Activation::None)?
            } else {
                x.matmul(&ad.a.t()?)?.matmul(&ad.b.t()?)?
            };
            y = (y + (up * ad.scale)?)?;
        }
        Ok(y)
    }
}

/// `base` with every adapter of the trainable vector merged in: the
/// projection W (stored as the family stores it) gains scale · B·A.
pub fn merge_lora(
    spec: &LanguageSpec,
    mut base: Vec<f32>,
    trainable: &[f32],
) -> Result<Vec<f32>, LmError> {
    let Tuning::Lora { lora, .. } = &spec.tuning else {
        return Ok(base);
    };
    let family = spec.arch.family();
    let expected: usize = spec.trainable_tensors().iter().map(|t| t.len()).sum();
    if trainable.len() != expected {
        return Err(LmError::WeightCount {
            what: "trainable vector",
            expected,
            got: trainable.len(),
        });
    }
    let mut offsets = HashMap::new();
    let mut at = 0;
    for t in family.tensors() {
        offsets.insert(t.name.clone(), at);
        at += t.len();
    }
    if base.len() != at {
        return Err(LmError::WeightCount {
            what: "base model",
            expected: at,
            got: base.len(),
        });
    }
    let r = lora.rank as usize;
    let scale = lora.scale();
    let layout = family.weight_layout();
    let mut cursor = 0;
    for (i, m) in spec.lora_modules()?.iter().enumerate() {
        let a = match lora.variant {
            LoraVariant::FrozenA => lora.a_factor(i, m),
            LoraVariant::Plain => {
                let a = trainable[cursor..cursor + r * m.inputs].to_vec();
                cursor += r * m.inputs;
                a
            }
        };
        let b = &trainable[cursor..cursor + m.outputs * r];
        cursor += m.outputs * r;
        let name = format!("{}.weight", m.path);
        let start = *offsets
            .get(&name)
            .ok_or_else(|| LmError::MissingTensor(name.clone()))?;
        let w = &mut base[start..start + m.inputs * m.outputs];
        for o in 0..m.outputs {
            for j in 0..m.inputs {
                let delta: f32 = (0..r).map(|k| b[o * r + k] * a[k * m.inputs + j]).sum();
                let at = match layout {
                    covey_protocol::model::WeightLayout::OutIn => o * m.inputs + j,
                    covey_protocol::model::WeightLayout::InOut => j * m.outputs + o,
                };
                w[at] += scale * delta;
            }
        }
    }
    Ok(base)
}
