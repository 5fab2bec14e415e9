//! Central evaluation: every new version on the operator's held-out data,
//! before it commits. MNIST's t10k files for the classifiers; for language
//! models, a folder of text (`*.txt`, `*.jsonl`) scored by loss (whose exp
//! is the perplexity) and next-token accuracy.

use std::{path::Path, sync::Arc};

use covey_client::{
    Device,
    assets::AssetCache,
    data::{
        DataError, DataView, Mnist,
        text::{Sequences, TextError, pack, read_documents},
    },
    lm::{
        BaseTensors, LanguageModel,
        train::{TextTrainer, evaluate_sequences, load_base, metrics},
    },
    trainer::{DeviceData, TrainError, evaluate},
};
use covey_protocol::{
    message::LocalMetrics,
    model::{ModelSpec, Tuning},
};

#[derive(Debug, thiserror::Error)]
pub enum TestSetError {
    #[error("evaluation test set: {0}")]
    Images(#[from] DataError),
    #[error("evaluation test set: {0}")]
    Text(#[from] TextError),
    #[error("evaluation test set: {0}")]
    Model(#[from] TrainError),
    #[error("evaluation test set {0}: no token to predict")]
    Empty(String),
    #[error(
        "evaluation test set: the server cannot run an external model; devices evaluate it (federated evaluation through their `evaluate`)"
    )]
    External,
}

/// A held-out set, resident and ready for every version.
pub enum TestSet {
    Images(DeviceData),
    Text {
        sequences: Sequences,
        base: Option<Arc<BaseTensors>>,
    },
}

impl TestSet {
    /// Loads the test set at `path` for `spec`'s kind of model; `assets`
    /// holds what a language model needs (a tokenizer.json, a LoRA base).
    pub fn load(path: &Path, spec: &ModelSpec, assets: &AssetCache) -> Result<Self, TestSetError> {
        match spec {
            ModelSpec::Classifier(_) => {
                let data = Mnist::load(path, "t10k")?;
                let view = DataView::all(Arc::new(data));
                Ok(Self::Images(DeviceData::new(&view, &Device::Cpu)?))
            }
            ModelSpec::Language(l) => {
                let docs = read_documents(path)?;
                let tokenizer = TextTrainer::tokenizer(&l.tokenizer, Some(assets))?;
                let separator = tokenizer.separator().map_err(TrainError::from)?;
                let ids = docs
                    .iter()
                    .map(|d| tokenizer.encode(&d.text))
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(TrainError::from)?;
                let sequences = pack(&ids, &separator, l.context as usize);
                if sequences.is_empty() {
                    return Err(TestSetError::Empty(path.display().to_string()));
                }
                let base = match l.tuning {
                    Tuning::Full => None,
                    Tuning::Lora { .. } => Some(Arc::new(load_base(
                        l,
                        Some(assets),
                        &Device::Cpu,
                        candle_core::DType::F32,
                    )?)),
                };
                Ok(Self::Text { sequences, base })
            }
            ModelSpec::External(_) => Err(TestSetError::External),
        }
    }

    /// Loss and accuracy of `weights` (the trainable vector).
    pub fn evaluate(&self, spec: &ModelSpec, weights: &[f32]) -> Result<LocalMetrics, TrainError> {
        match (self, spec) {
            (Self::Images(data), _) => evaluate(spec, weights, data),
            (Self::Text { sequences, base }, ModelSpec::Language(l)) => {
                let model = LanguageModel::new(l, weights, base.clone(), &Device::Cpu)?;
                let t = rayon::scope(|_| evaluate_sequences(&model, sequences, &Device::Cpu))?;
                Ok(metrics(t))
            }
            (Self::Text { .. }, other) => Err(TrainError::WrongData {
                model: other.to_string(),
                data: "text",
            }),
        }
    }
}
