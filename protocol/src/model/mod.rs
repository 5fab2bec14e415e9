//! Model specifications: what the server and every client agree on before
//! a single weight moves.
//!
//! A model is data: a family plus its configuration, sent in every task, so
//! a client builds exactly the model whose weights it receives. The flat
//! vector that travels (the global model down, an update up) holds the
//! *trainable* tensors alone, in [`ModelSpec::tensors`] order: all of them
//! for a classifier or a fully fine-tuned language model, the LoRA factors
//! for an adapter run, whose frozen base is named by its hash instead. An
//! external model is only its tensors' names and shapes: devices train it
//! in their own code (the Python package), and Covey moves the vector.

use std::fmt;

use serde::{Deserialize, Serialize};

pub mod classifier;
pub mod external;
pub mod gpt2;
pub mod language;
pub mod llama;
pub mod lora;

pub use classifier::{Architecture, ClassifierSpec, InputShape};
pub use external::ExternalSpec;
pub use gpt2::Gpt2Config;
pub use language::{AssetRef, BaseWeights, Family, LanguageSpec, LmArch, TokenizerSpec, Tuning};
pub use llama::LlamaConfig;
pub use lora::{LoraSpec, LoraVariant, Projection};

/// One named tensor of a model, in the order the flat weight vector holds it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TensorSpec {
    pub name: String,
    pub shape: Vec<usize>,
}

impl TensorSpec {
    pub fn new(name: impl Into<String>, shape: &[usize]) -> Self {
        Self {
            name: name.into(),
            shape: shape.to_vec(),
        }
    }

    pub fn len(&self) -> usize {
        self.shape.iter().product()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// How a projection's weight matrix is stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum WeightLayout {
    /// [out, in]: torch.nn.Linear (LLaMA's projections, the classifiers).
    OutIn,
    /// [in, out]: GPT-2's Conv1D.
    InOut,
}

/// A model spec that cannot be built, with the field at fault.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {problem}")]
pub struct ModelError {
    pub field: String,
    pub problem: String,
}

impl ModelError {
    pub fn new(field: impl Into<String>, problem: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            problem: problem.into(),
        }
    }
}

/// Every model Covey trains.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum ModelSpec {
    /// An image classifier (McMahan et al. 2017).
    Classifier(ClassifierSpec),
    /// A transformer language model, fully fine-tuned or with LoRA.
    Language(Box<LanguageSpec>),
    /// Named float tensors trained by the device's own code.
    External(ExternalSpec),
}

impl ModelSpec {
    pub fn mnist(architecture: Architecture) -> Self {
        Self::Classifier(ClassifierSpec::mnist(architecture))
    }

    /// Checks every field, so a spec from the network or a config file is
    /// refused with its reason before anything is allocated for it.
    pub fn validate(&self) -> Result<(), ModelError> {
        match self {
            Self::Classifier(_) => Ok(()),
            Self::Language(l) => l.validate(),
            Self::External(e) => e.validate(),
        }
    }

    /// The trainable tensors, in wire order.
    pub fn tensors(&self) -> Vec<TensorSpec> {
        match self {
            Self::Classifier(c) => c.tensors(),
            Self::Language(l) => l.trainable_tensors(),
            Self::External(e) => e.tensors.clone(),
        }
    }

    /// Values in the flat vector that travels: the trainable parameters.
    pub fn param_count(&self) -> usize {
        self.tensors().iter().map(TensorSpec::len).sum()
    }

    /// Deterministic weights for version 0 of a model trained from scratch
    /// (a checkpoint's weights replace them when one is given). An external
    /// model's version 0 comes from its model file; zeros stand in only
    /// where a test initialises a store without one.
    pub fn initial_weights(&self, seed: u64) -> Vec<f32> {
        match self {
            Self::Classifier(c) => c.initial_weights(seed),
            Self::Language(l) => l.initial_trainable(seed),
            Self::External(_) => vec![0.0; self.param_count()],
        }
    }

    /// The family's short name: `logreg`, `2nn`, `cnn`, `gpt2`, `llama` or
    /// `external`.
    pub fn family(&self) -> &'static str {
        match self {
            Self::Classifier(c) => c.architecture.name(),
            Self::Language(l) => l.arch.family().name(),
            Self::External(_) => "external",
        }
    }

    /// The files a device fetches by hash to build this model.
    pub fn assets(&self) -> Vec<AssetRef> {
        match self {
            Self::Classifier(_) | Self::External(_) => Vec::new(),
            Self::Language(l) => l.assets(),
        }
    }

    pub fn as_language(&self) -> Option<&LanguageSpec> {
        match self {
            Self::Language(l) => Some(l),
            Self::Classifier(_) | Self::External(_) => None,
        }
    }
}

impl fmt::Display for ModelSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Classifier(c) => write!(f, "{}", c.architecture),
            Self::Language(l) => write!(f, "{l}"),
            Self::External(e) => write!(f, "{e}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifier_specs_keep_their_wire_vector() {
        let spec = ModelSpec::mnist(Architecture::Cnn);
        assert_eq!(spec.param_count(), 1_663_370);
        assert_eq!(spec.family(), "cnn");
        assert_eq!(spec.to_string(), "cnn");
        assert_eq!(spec.initial_weights(4).len(), spec.param_count());
        assert!(spec.validate().is_ok());
    }
}
