//! A language model's parameters on a device, by Hugging Face name: the
//! frozen base, the trainable vector as candle variables, and the LoRA
//! factors on the projections they adapt.

use std::{collections::HashMap, sync::Arc};

use candle_core::{DType, Device, Tensor, Var};
use covey_protocol::model::{LanguageSpec, LoraVariant, Tuning};

use super::LmError;

/// The base parameters of a LoRA run, resident on a device and shared by
/// every round that uses them. `dtype` may be bf16 or f16 to halve the
/// memory they take; each use widens them to f32.
#[derive(Debug)]
pub struct BaseTensors {
    tensors: HashMap<String, Tensor>,
}

impl BaseTensors {
    /// Splits a flat vector in the family's tensor order into named
    /// tensors on `device`, stored as `dtype`.
    pub fn from_flat(
        spec: &LanguageSpec,
        flat: &[f32],
        device: &Device,
        dtype: DType,
    ) -> Result<Self, LmError> {
        let tensors = spec.arch.family().tensors();
        let expected: usize = tensors.iter().map(|t| t.len()).sum();
        if flat.len() != expected {
            return Err(LmError::WeightCount {
                what: "base model",
                expected,
                got: flat.len(),
            });
        }
        let mut at = 0;
        let mut out = HashMap::with_capacity(tensors.len());
        for t in tensors {
            let values = &flat[at..at + t.len()];
            at += t.len();
            let tensor = Tensor::from_slice(values, t.shape.as_slice(), device)?.to_dtype(dtype)?;
            out.insert(t.name, tensor);
        }
        Ok(Self { tensors: out })
    }

    /// Bytes the base takes on its device.
    pub fn bytes(&self) -> usize {
        self.tensors
            .values()
            .map(|t| t.elem_count() * t.dtype().size_in_bytes())
            .sum()
    }
}

/// One adapted projection: y += scale · (x·Aᵀ)·Bᵀ.
#[derive(Clone, Debug)]
struct Adapter {
    a: Tensor,
    b: Tensor,
    scale: f64,
}

/// Every parameter a forward pass reads.
pub struct Weights {
    tensors: HashMap<String, Tensor>,
    base: Option<Arc<BaseTensors>>,
    adapters: HashMap<String, Adapter>,
    trainable: Vec<Var>,
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
        let mut vars = Vec::with_capacity(wanted.len());
        let mut by_name = HashMap::with_capacity(wanted.len());
        let mut at = 0;
        for t in &wanted {
            let values = &trainable[at..at + t.len()];
            at += t.len();
            let var = Var::from_slice(values, t.shape.as_slice(), device)?;
            by_name.insert(t.name.clone(), var.as_tensor().clone());
            vars.push(var);
        }
        match &spec.tuning {
            Tuning::Full => Ok(Self {
                tensors: by_name,
                base: None,
                adapters: HashMap::new(),
                trainable: vars,
            }),
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
                Ok(Self {
                    tensors: HashMap::new(),
                    base: Some(base),
                    adapters,
                    trainable: vars,
                })
            }
        }
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
            let w = self.get(&format!("{path}.weight"))?;
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
        let w = self.get(&format!("{path}.weight"))?;
        let b = self.find(&format!("{path}.bias"));
        let mut y = if x.device().is_cpu() {
            // One node for product and bias, with no gradient for a frozen W.
            linear_cpu(x, &w, b.as_ref(), orientation, Activation::None)?
        } else {
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
