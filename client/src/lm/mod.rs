//! Transformer language models: GPT-2 and the LLaMA family, built from a
//! [`LanguageSpec`] and trained on a device's own text.
//!
//! The data's path: [`tokenizer`] turns text into ids, [`crate::data::text`]
//! packs them into sequences, [`weights`] assembles the parameters (a
//! checkpoint's, a seeded base's, LoRA's), the family modules run the
//! forward pass on [`ops`], whose every op has a gradient, and [`train`]
//! runs local epochs and evaluation.

use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use covey_protocol::model::{Gpt2Config, LanguageSpec, LmArch, ModelError, TokenizerSpec};

mod block;
pub mod checkpoint;
pub mod generate;
mod gpt2;
mod llama;
pub mod local;
pub mod ops;
pub mod reader;
pub mod tokenizer;
pub mod train;
pub mod weights;

pub use weights::BaseTensors;
use weights::Weights;

/// The models built in by name, trained from scratch: nothing to download.
pub const BUILTIN: &[&str] = &["gpt2-bytes", "gpt2-124m"];

/// A built-in model's family configuration and tokenizer:
/// - `gpt2-bytes`: GPT-2 of 4 layers, width 256, 4 heads and 128 positions
///   over raw bytes (about 3.3 M parameters);
/// - `gpt2-124m`: GPT-2 124M's shape with GPT-2's BPE.
pub fn builtin(name: &str) -> Option<(LmArch, TokenizerSpec)> {
    match name {
        "gpt2-bytes" => Some((LmArch::Gpt2(Gpt2Config::bytes()), TokenizerSpec::Bytes)),
        "gpt2-124m" => Some((
            LmArch::Gpt2(Gpt2Config::gpt2_124m()),
            TokenizerSpec::Gpt2Bpe,
        )),
        _ => None,
    }
}

#[derive(Debug, thiserror::Error)]
pub enum LmError {
    #[error("candle: {0}")]
    Candle(#[from] candle_core::Error),
    #[error("model spec: {0}")]
    Model(#[from] ModelError),
    #[error("the {what} has {got} values, the model needs {expected}")]
    WeightCount {
        what: &'static str,
        expected: usize,
        got: usize,
    },
    #[error("tensor {0} is missing")]
    MissingTensor(String),
    #[error("a LoRA model needs its base weights, and none were given")]
    NoBase,
    #[error("token id {id} is outside the model's vocabulary of {vocab}")]
    TokenOutOfRange { id: u32, vocab: usize },
    #[error("{got} tokens exceed the model's context of {max}")]
    TooLong { got: usize, max: usize },
    #[error(transparent)]
    Tokenizer(#[from] tokenizer::TokenizerError),
}

/// A language model ready to run: its spec, its parameters and, for the
/// LLaMA family, its rotary tables.
pub struct LanguageModel {
    spec: LanguageSpec,
    weights: Weights,
    rotary: Option<Arc<ops::Rotary>>,
}

impl LanguageModel {
    /// The model whose trainable vector is `trainable`; a LoRA model also
    /// needs its frozen `base`.
    pub fn new(
        spec: &LanguageSpec,
        trainable: &[f32],
        base: Option<Arc<BaseTensors>>,
        device: &Device,
    ) -> Result<Self, LmError> {
        spec.validate()?;
        let weights = Weights::new(spec, trainable, base, device)?;
        let rotary = match &spec.arch {
            LmArch::Llama(c) => Some(Arc::new(ops::Rotary::new(
                &c.inverse_frequencies(),
                spec.context as usize,
            ))),
            LmArch::Gpt2(_) => None,
        };
        Ok(Self {
            spec: spec.clone(),
            weights,
            rotary,
        })
    }

    pub fn spec(&self) -> &LanguageSpec {
        &self.spec
    }

    pub fn weights(&self) -> &Weights {
        &self.weights
    }

    pub fn vocab_size(&self) -> usize {
        self.spec.arch.family().vocab_size()
    }

    /// Logits [B·T, V] for token ids [B, T] (u32), T at most the context.
    pub fn forward(&self, ids: &Tensor) -> Result<Tensor, LmError> {
        let (_, t) = ids.dims2()?;
        let max = self.spec.context as usize;
        if t > max {
            return Err(LmError::TooLong { got: t, max });
        }
        let ids = ids.to_dtype(DType::U32)?;
        match (&self.spec.arch, &self.rotary) {
            (LmArch::Gpt2(c), _) => gpt2::forward(c, &self.weights, &ids),
            (LmArch::Llama(c), Some(rotary)) => llama::forward(c, &self.weights, rotary, &ids),
            (LmArch::Llama(_), None) => Err(LmError::MissingTensor("rotary tables".into())),
        }
    }

    /// Checks every id is inside the vocabulary, so a bad id is an error
    /// naming it rather than an out-of-bounds read.
    pub fn check_ids(&self, ids: &[u32]) -> Result<(), LmError> {
        let vocab = self.vocab_size();
        match ids.iter().find(|&&id| id as usize >= vocab) {
            Some(&id) => Err(LmError::TokenOutOfRange { id, vocab }),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests;
