//! Local training and evaluation of a language model on a device's text.
//!
//! The trainer keeps what stays the same between rounds: the text,
//! tokenized and packed per tokenizer and context, and a LoRA run's frozen
//! base, resident on the device once it has been loaded and checked.

use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use covey_protocol::message::{LocalMetrics, Task};
use covey_protocol::model::{BaseWeights, LanguageSpec, ModelSpec, TokenizerSpec, Tuning};
use rand::{SeedableRng, seq::SliceRandom};
use rand_chacha::ChaCha8Rng;

use super::{
    BaseTensors, LanguageModel,
    ops::{TokenLoss, cross_entropy_counted, token_losses},
    reader,
    tokenizer::TextTokenizer,
    weights::BaseValues,
};

use crate::{
    assets::AssetCache,
    data::text::{Sequences, TextData, pack},
    optim::optimizer,
    trainer::{TrainError, TrainOutput, Trainer, on_device_pool},
};

/// Sequences evaluated per forward pass.
const EVAL_BATCH: usize = 8;

/// A device's text, tokenized and packed for one tokenizer and context.
struct Packed {
    key: (TokenizerSpec, u32),

    train: Sequences,
    heldout: Sequences,
}

/// Trains language models on one device's text with candle.
pub struct TextTrainer {
    data: TextData,
    device: Device,
    assets: Option<AssetCache>,
    base_dtype: DType,
    packed: Option<Packed>,
    base: Option<(BaseWeights, Arc<BaseTensors>)>,
    progress: bool,
}

impl TextTrainer {
    pub fn new(data: TextData, device: &Device) -> Self {
        Self {
            data,
            device: device.clone(),
            assets: None,
            base_dtype: DType::F32,
            packed: None,
            base: None,
            progress: false,
        }
    }

    /// Where fetched assets (bases, tokenizers) lie.
    pub fn with_assets(mut self, assets: AssetCache) -> Self {
        self.assets = Some(assets);
        self
    }

    /// Holds a LoRA base as bf16 or f16 to halve its memory.
    pub fn with_base_dtype(mut self, dtype: DType) -> Self {
        self.base_dtype = dtype;
        self
    }

    pub fn with_progress(mut self, on: bool) -> Self {
        self.progress = on;
        self
    }

    /// The tokenizer a spec names, loading a fetched one from the assets.
    pub fn tokenizer(
        spec: &TokenizerSpec,
        assets: Option<&AssetCache>,
    ) -> Result<TextTokenizer, TrainError> {
        let file = match (spec, assets) {
            (TokenizerSpec::HuggingFace(a), Some(cache)) => Some(cache.require(a)?),
            _ => None,
        };
        Ok(TextTokenizer::for_spec(spec, file.as_deref())?)
    }

    fn packed(&mut self, spec: &LanguageSpec) -> Result<&Packed, TrainError> {
        let key = (spec.tokenizer, spec.context);
        if self.packed.as_ref().is_none_or(|p| p.key != key) {
            let tokenizer = Self::tokenizer(&spec.tokenizer, self.assets.as_ref())?;
            let vocab = spec.arch.family().vocab_size();
            if tokenizer.vocab_size() > vocab {
                return Err(TrainError::TokenizerVocab {
                    tokenizer: tokenizer.vocab_size(),
                    model: vocab,
                });
            }
            let separator = tokenizer.separator()?;
            let encode =
                |docs: &[crate::data::text::Document]| -> Result<Vec<Vec<u32>>, TrainError> {
                    docs.iter()
                        .map(|d| tokenizer.encode(&d.text).map_err(TrainError::from))
                        .collect()
                };
            let train = pack(
                &encode(&self.data.train)?,
                &separator,
                spec.context as usize,
            );
            let heldout = pack(
                &encode(&self.data.heldout)?,
                &separator,
                spec.context as usize,
            );
            self.packed = Some(Packed {
                key,
                train,
                heldout,
            });
        }
        self.packed.as_ref().ok_or(TrainError::NoData)
    }

    /// The frozen base of a LoRA spec, loaded once and kept.
    fn base(&mut self, spec: &LanguageSpec) -> Result<Option<Arc<BaseTensors>>, TrainError> {
        let Tuning::Lora { base, .. } = &spec.tuning else {
            return Ok(None);
        };
        if let Some((key, tensors)) = &self.base
            && key == base
        {
            return Ok(Some(tensors.clone()));
        }
        self.base = None;
        let tensors = Arc::new(load_base(
            spec,
            self.assets.as_ref(),
            &self.device,
            self.base_dtype,
        )?);
        self.base = Some((*base, tensors.clone()));
        Ok(Some(tensors))
    }

    fn language(spec: &ModelSpec) -> Result<&LanguageSpec, TrainError> {
        spec.as_language().ok_or_else(|| TrainError::WrongData {
            model: spec.to_string(),
            data: "text",
        })
    }
}

/// A LoRA spec's frozen base on `device`: drawn from its seed, or read
/// from its fetched safetensors file.
pub fn load_base(
    spec: &LanguageSpec,
    assets: Option<&AssetCache>,
    device: &Device,
    dtype: DType,
) -> Result<BaseTensors, TrainError> {
    let values = match base_source(spec)? {
        BaseWeights::Seeded(seed) => BaseValues::narrowed(spec.initial_base(*seed), dtype),
        BaseWeights::Asset(a) => {
            let path = [assets.ok_or(TrainError::NoAssetCache)?.require(a)?];
            match dtype {
                DType::BF16 => BaseValues::BF16(reader::read_tensors(&path, &spec.arch)?),
                DType::F16 => BaseValues::F16(reader::read_tensors(&path, &spec.arch)?),
                _ => BaseValues::F32(reader::read_tensors(&path, &spec.arch)?),
            }
        }
    };
    Ok(BaseTensors::from_values(spec, values, device)?)
}

/// Where a LoRA spec's frozen base comes from.
fn base_source(spec: &LanguageSpec) -> Result<&BaseWeights, TrainError> {
    match &spec.tuning {
        Tuning::Lora { base, .. } => Ok(base),
        Tuning::Full => Err(TrainError::Lm(super::LmError::NoBase)),
    }
}

/// A LoRA spec's frozen base, flat in the family's tensor order.
pub fn base_flat(spec: &LanguageSpec, assets: Option<&AssetCache>) -> Result<Vec<f32>, TrainError> {
    Ok(match base_source(spec)? {
        BaseWeights::Seeded(seed) => spec.initial_base(*seed),
        BaseWeights::Asset(a) => {
            let cache = assets.ok_or(TrainError::NoAssetCache)?;
            reader::read_tensors(&[cache.require(a)?], &spec.arch)?
        }
    })
}

/// Every parameter of the model, flat in the family's order: the trainable
/// vector itself under full fine-tuning; under LoRA the base with each
/// adapter's scale · B·A added into the projection it adapts.
pub fn merged_weights(
    spec: &LanguageSpec,
    trainable: &[f32],
    assets: Option<&AssetCache>,
) -> Result<Vec<f32>, TrainError> {
    match &spec.tuning {
        Tuning::Full => Ok(trainable.to_vec()),
        Tuning::Lora { .. } => {
            let base = base_flat(spec, assets)?;
            Ok(super::weights::merge_lora(spec, base, trainable)?)
        }
    }
}

/// Loss, perplexity's log, and next-token accuracy of `model` on `seqs`.
pub fn evaluate_sequences(
    model: &LanguageModel,
    seqs: &Sequences,
    device: &Device,
) -> Result<TokenLoss, TrainError> {
    let mut total = TokenLoss::default();
    let all: Vec<u32> = (0..seqs.len() as u32).collect();
    for chunk in all.chunks(EVAL_BATCH) {
        let (inputs, targets) = seqs.batch(chunk);
        model.check_ids(&inputs)?;
        let ids = Tensor::from_vec(inputs, (chunk.len(), seqs.context), device)?;
        let logits = model.forward(&ids)?;
        total += token_losses(&logits, &targets)?;
    }
    Ok(total)
}

/// Metrics as the protocol carries them: mean loss (its exp is the
/// perplexity) and next-token accuracy.
pub fn metrics(t: TokenLoss) -> LocalMetrics {
    let n = t.tokens.max(1) as f64;
    LocalMetrics {
        loss: (t.nll / n) as f32,
        accuracy: (t.correct as f64 / n) as f32,
    }
}

impl Trainer for TextTrainer {
    fn train(&mut self, task: &Task, global: &[f32]) -> Result<TrainOutput, TrainError> {
        let device = self.device.clone();
        on_device_pool(&device, || self.train_here(task, global))
    }

    fn evaluate(
        &mut self,
        spec: ModelSpec,
        weights: &[f32],
    ) -> Result<Option<(LocalMetrics, u64)>, TrainError> {
        let spec = Self::language(&spec)?.clone();
        if self.data.heldout.is_empty() {
            return Ok(None);
        }
        let base = self.base(&spec)?;
        let device = self.device.clone();
        let packed = self.packed(&spec)?;
        if packed.heldout.is_empty() {
            return Ok(None);
        }
        on_device_pool(&device, || {
            let model = LanguageModel::new(&spec, weights, base, &device)?;
            let t = evaluate_sequences(&model, &packed.heldout, &device)?;
            Ok(Some((metrics(t), t.tokens)))
        })
    }
}

impl TextTrainer {
    fn train_here(&mut self, task: &Task, global: &[f32]) -> Result<TrainOutput, TrainError> {
        let spec = Self::language(&task.spec)?.clone();
        let base = self.base(&spec)?;
        let device = self.device.clone();
        let progress = self.progress;
        let packed = self.packed(&spec)?;
        let seqs = &packed.train;
        if seqs.is_empty() {
            return Err(TrainError::NoData);
        }
        let model = LanguageModel::new(&spec, global, base, &device)?;
        let mut sgd = optimizer(
            task.hyper.optimizer,
            model.weights().vars().to_vec(),
            f64::from(task.hyper.learning_rate),
        );
        let mut rng = ChaCha8Rng::seed_from_u64(task.seed);
        let batch = task.hyper.batch_size.max(1) as usize;
        let mut order: Vec<u32> = (0..seqs.len() as u32).collect();
        let epochs = task.hyper.epochs;
        let steps = u64::from(epochs) * order.len().div_ceil(batch) as u64;
        let bar = progress
            .then(|| {
                crate::progress::bar(
                    steps,
                    crate::progress::BATCHES,
                    format!("round {}", task.round.0),
                )
            })
            .flatten();
        let mut last = TokenLoss::default();
        for epoch in 0..epochs {
            order.shuffle(&mut rng);
            let final_epoch = epoch + 1 == epochs;
            for chunk in order.chunks(batch) {
                let (inputs, targets) = seqs.batch(chunk);
                model.check_ids(&inputs)?;
                let ids = Tensor::from_vec(inputs, (chunk.len(), seqs.context), &device)?;
                let logits = model.forward(&ids)?;
                let target = Tensor::from_slice(&targets, targets.len(), &device)?;
                let (loss, t) = cross_entropy_counted(&logits, &target)?;
                sgd.backward_step(&loss)?;
                if final_epoch {
                    if !t.nll.is_finite() {
                        return Err(TrainError::Diverged);
                    }
                    last += t;
                }
                if let Some(bar) = &bar {
                    bar.inc(1);
                }
            }
            if progress && bar.is_none() {
                tracing::info!(
                    round = task.round.0,
                    epoch = epoch + 1,
                    epochs,
                    "local epoch done"
                );
            }
        }
        if let Some(bar) = bar {
            bar.finish_and_clear();
        }
        let mut delta = model.weights().flat()?;
        for (d, g) in delta.iter_mut().zip(global) {
            *d -= g;
        }
        if delta.iter().any(|v| !v.is_finite()) {
            return Err(TrainError::Diverged);
        }
        Ok(TrainOutput {
            delta,
            num_examples: seqs.tokens() as u64,
            metrics: metrics(last),
        })
    }
}
