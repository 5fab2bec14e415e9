//! A language model on local disk, for `covey-client evaluate` and
//! `generate`: a Hugging Face checkpoint (what `covey-server export
//! --format hf` writes), optionally with a peft LoRA adapter on top.

use std::{path::Path, sync::Arc};

use candle_core::{DType, Device};
use covey_protocol::model::{
    BaseWeights, LanguageSpec, LmArch, LoraSpec, LoraVariant, TokenizerSpec, Tuning,
};

use super::{
    BaseTensors, LanguageModel, LmError,
    checkpoint::{self, CheckpointError},
    tokenizer::TextTokenizer,
};
use crate::trainer::TrainError;

/// Longest default context for offline evaluation.
const DEFAULT_CONTEXT: usize = 256;

pub struct LocalModel {
    pub model: LanguageModel,
    pub tokenizer: TextTokenizer,
}

/// Which tokenizer a checkpoint directory uses: `choice` (bytes, gpt2 or a
/// path), else its tokenizer.json, else the one its vocabulary implies.
pub fn tokenizer_for(
    dir: &Path,
    arch: &LmArch,
    choice: Option<&str>,
) -> Result<TextTokenizer, TrainError> {
    let vocab = arch.family().vocab_size();
    let tokenizer = match choice {
        Some("bytes") => TextTokenizer::Bytes,
        Some("gpt2") => TextTokenizer::gpt2()?,
        Some(path) => TextTokenizer::from_file(Path::new(path))?,
        None if dir.join("tokenizer.json").exists() => {
            TextTokenizer::from_file(&dir.join("tokenizer.json"))?
        }
        None if vocab == 256 => TextTokenizer::Bytes,
        None if matches!(arch, LmArch::Gpt2(_)) && vocab == 50_257 => TextTokenizer::gpt2()?,
        None => {
            return Err(TrainError::Checkpoint(CheckpointError::Format {
                path: dir.display().to_string(),
                problem: "holds no tokenizer.json; pass --tokenizer".into(),
            }));
        }
    };
    if tokenizer.vocab_size() > vocab {
        return Err(TrainError::TokenizerVocab {
            tokenizer: tokenizer.vocab_size(),
            model: vocab,
        });
    }
    Ok(tokenizer)
}

/// Reads a peft adapter's settings: rank, alpha and target modules.
fn adapter_spec(dir: &Path) -> Result<LoraSpec, CheckpointError> {
    let path = dir.join("adapter_config.json");
    let shown = path.display().to_string();
    let text = std::fs::read_to_string(&path).map_err(|source| CheckpointError::Io {
        path: shown.clone(),
        source,
    })?;
    let v: serde_json::Value =
        serde_json::from_str(&text).map_err(|source| CheckpointError::Json {
            path: shown.clone(),
            source,
        })?;
    let field = |name: &str, problem: &str| CheckpointError::Field {
        path: shown.clone(),
        field: name.into(),
        problem: problem.into(),
    };
    let rank = v["r"]
        .as_u64()
        .ok_or_else(|| field("r", "is not a whole number"))?;
    let alpha = v["lora_alpha"]
        .as_f64()
        .ok_or_else(|| field("lora_alpha", "is not a number"))?;
    let targets = v["target_modules"]
        .as_array()
        .ok_or_else(|| field("target_modules", "is not a list of names"))?
        .iter()
        .map(|t| t.as_str().map(str::to_owned))
        .collect::<Option<Vec<_>>>()
        .ok_or_else(|| field("target_modules", "is not a list of names"))?;
    if v["use_dora"].as_bool() == Some(true) || v["use_rslora"].as_bool() == Some(true) {
        return Err(field(
            "use_dora",
            "DoRA and rsLoRA adapters are not implemented",
        ));
    }
    Ok(LoraSpec {
        rank: u32::try_from(rank).map_err(|_| field("r", "is too large"))?,
        alpha: alpha as f32,
        targets,
        variant: LoraVariant::Plain,
        seed: 0,
    })
}

/// Opens `dir` (and `adapter`) on `device`.
pub fn open(
    dir: &Path,
    adapter: Option<&Path>,
    tokenizer: Option<&str>,
    context: Option<u32>,
    device: &Device,
) -> Result<LocalModel, TrainError> {
    let (arch, flat) = checkpoint::read_checkpoint(dir)?;
    let tok = tokenizer_for(dir, &arch, tokenizer)?;
    let context = context
        .map(|c| c as usize)
        .unwrap_or_else(|| arch.family().max_positions().min(DEFAULT_CONTEXT))
        as u32;
    let tokenizer_spec = TokenizerSpec::Bytes;
    let (spec, trainable, base) = match adapter {
        None => {
            let spec = LanguageSpec {
                arch,
                tokenizer: tokenizer_spec,
                context,
                tuning: Tuning::Full,
            };
            (spec, flat, None)
        }
        Some(adapter) => {
            let spec = LanguageSpec {
                arch,
                tokenizer: tokenizer_spec,
                context,
                tuning: Tuning::Lora {
                    lora: adapter_spec(adapter)?,
                    base: BaseWeights::Seeded(0),
                },
            };
            let base = BaseTensors::from_flat(&spec, flat, device, DType::F32)?;
            let trainable = checkpoint::read_adapter(adapter, &spec)?;
            (spec, trainable, Some(Arc::new(base)))
        }
    };
    // The spec's tokenizer field is only checked for its vocabulary here;
    // the tokenizer itself was checked against the vocabulary above.
    let spec = LanguageSpec {
        tokenizer: if spec.arch.family().vocab_size() >= 256 {
            TokenizerSpec::Bytes
        } else {
            TokenizerSpec::HuggingFace(covey_protocol::model::AssetRef {
                sha256: [0; 32],
                bytes: 0,
            })
        },
        ..spec
    };
    let model = LanguageModel::new(&spec, &trainable, base, device).map_err(|e| match e {
        LmError::Model(m) => TrainError::Model(m),
        other => TrainError::Lm(other),
    })?;
    Ok(LocalModel {
        model,
        tokenizer: tok,
    })
}
