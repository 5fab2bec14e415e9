//! What `init` builds version 0 from: an MNIST classifier, a built-in
//! language model trained from scratch, or a Hugging Face checkpoint on
//! local disk, fully fine-tuned or with LoRA.
//!
//! A checkpoint is read and checked here, once: a missing or misshaped
//! tensor, an unknown family or field, or a tokenizer larger than the
//! vocabulary is refused with its name before the state directory exists.
//! What devices must fetch (a LoRA run's frozen base, a tokenizer.json)
//! becomes an asset named by its SHA-256.

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
};

use covey_client::{
    assets::{AssetCache, AssetError, asset_of},
    lm::{
        self,
        checkpoint::{self, CheckpointError},
        tokenizer::{TextTokenizer, TokenizerError},
    },
};
use covey_protocol::model::{
    Architecture, BaseWeights, LanguageSpec, LmArch, LoraSpec, LoraVariant, ModelError, ModelSpec,
    TokenizerSpec, Tuning,
};

#[derive(Debug, thiserror::Error)]
pub enum PrepareError {
    #[error(
        "unknown model '{0}': expected logreg, 2nn, cnn, gpt2-bytes, gpt2-124m or hf:DIR (a Hugging Face checkpoint)"
    )]
    Unknown(String),
    #[error("{0} is an image classifier: LoRA, --context and --tokenizer apply to language models")]
    NotLanguage(String),
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    #[error("model: {0}")]
    Model(#[from] ModelError),
    #[error("tokenizer: {0}")]
    Tokenizer(#[from] TokenizerError),
    #[error("the tokenizer has {tokenizer} tokens, more than the model's vocabulary of {model}")]
    Vocab { tokenizer: usize, model: usize },
    #[error(
        "{dir} holds no tokenizer.json, and a {family} model with a vocabulary of {vocab} matches no built-in tokenizer; pass --tokenizer"
    )]
    NoTokenizer {
        dir: String,
        family: &'static str,
        vocab: usize,
    },
    #[error(transparent)]
    Asset(#[from] AssetError),
    #[error(transparent)]
    ModelFile(#[from] covey_client::model_file::ModelFileError),
    #[error(
        "--model-file names an external model: LoRA, --context and --tokenizer apply to language models"
    )]
    ExternalOptions,
}

/// LoRA as the operator asks for it.
#[derive(Clone, Debug, PartialEq)]
pub struct LoraChoice {
    pub rank: u32,
    /// Defaults to twice the rank.
    pub alpha: Option<f32>,
    /// Defaults to the family's attention projections.
    pub targets: Vec<String>,
    /// Train A and B (inexact under averaging) instead of FFA-LoRA.
    pub plain: bool,
    pub seed: u64,
}

/// What `init --model` and its flags ask for.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ModelChoice {
    /// logreg, 2nn, cnn, a built-in language model, or `hf:DIR`.
    pub model: String,
    pub lora: Option<LoraChoice>,
    /// Tokens per sequence; defaults to 128 (or the model's positions).
    pub context: Option<u32>,
    /// `bytes`, `gpt2` or the path of a tokenizer.json.
    pub tokenizer: Option<String>,
    /// A safetensors file of named float tensors: an external model, which
    /// devices train in their own code. Replaces `model`.
    pub model_file: Option<PathBuf>,
}

/// Version 0 and what devices fetch to use it.
#[derive(Debug)]
pub struct Prepared {
    pub spec: ModelSpec,
    /// Version 0's trainable vector.
    pub weights: Vec<f32>,
    /// Files to place in the state directory's asset store.
    pub assets: Vec<PathBuf>,
    /// `hf:DIR` or the built-in name.
    pub source: String,
}

impl Prepared {
    /// Writes the model into `config`: its family, and a language model's
    /// spec and source.
    pub fn configure(&self, config: &mut crate::ServerConfig) -> Result<(), serde_json::Error> {
        config.model.architecture = self.spec.family().to_owned();
        config.model.source = self.source.clone();
        if let ModelSpec::External(e) = &self.spec {
            config.model.set_external(e)?;
        }
        config.model.language = match self.spec.as_language() {
            Some(spec) => serde_json::to_string(spec)?,
            None => String::new(),
        };
        Ok(())
    }

    /// The local training a new run of this model starts from: a language
    /// model trains with Adam at [`LANGUAGE_LEARNING_RATE`] (the defaults'
    /// SGD, made for the classifiers, trains a transformer poorly); a
    /// classifier keeps the defaults.
    pub fn training_defaults(&self, config: &mut crate::ServerConfig) {
        if self.spec.as_language().is_some() {
            config.training.local_optimizer = "adam".into();
            config.training.learning_rate = LANGUAGE_LEARNING_RATE;
        }
    }
}

/// Local Adam's learning rate for a language model: at 0.002 the byte-level
/// GPT-2 stalls at a bigram model's accuracy, at 0.0005 it leaves it
/// (BENCHMARKS.md, "Learning rate").
pub const LANGUAGE_LEARNING_RATE: f32 = 0.0005;

/// The default context: short enough for a phone's memory.
const DEFAULT_CONTEXT: u32 = 128;

impl ModelChoice {
    /// Builds version 0. `scratch` is a directory (on the state
    /// directory's volume) where a LoRA base is written before it is
    /// moved into the asset store.
    pub fn prepare(&self, seed: u64, scratch: &Path) -> Result<Prepared, PrepareError> {
        if let Some(path) = &self.model_file {
            if self.lora.is_some() || self.context.is_some() || self.tokenizer.is_some() {
                return Err(PrepareError::ExternalOptions);
            }
            let (spec, weights) = covey_client::model_file::read_model_file(path)?;
            return Ok(Prepared {
                spec: ModelSpec::External(spec),
                weights,
                assets: Vec::new(),
                source: path.display().to_string(),
            });
        }
        if let Ok(arch) = self.model.parse::<Architecture>() {
            if self.lora.is_some() || self.context.is_some() || self.tokenizer.is_some() {
                return Err(PrepareError::NotLanguage(self.model.clone()));
            }
            let spec = ModelSpec::mnist(arch);
            return Ok(Prepared {
                weights: spec.initial_weights(seed),
                spec,
                assets: Vec::new(),
                source: self.model.clone(),
            });
        }
        let (arch, builtin_tokenizer, checkpoint) = match self.model.strip_prefix("hf:") {
            Some(dir) => {
                let dir = PathBuf::from(dir);
                let (arch, flat) = checkpoint::read_checkpoint(&dir)?;
                (arch, None, Some((dir, flat)))
            }
            None => match lm::builtin(&self.model) {
                Some((arch, tokenizer)) => (arch, Some(tokenizer), None),
                None => return Err(PrepareError::Unknown(self.model.clone())),
            },
        };
        let family = arch.family();
        let mut assets = Vec::new();
        let tokenizer =
            self.tokenizer(&arch, builtin_tokenizer, checkpoint.as_ref(), &mut assets)?;
        let context = self
            .context
            .unwrap_or_else(|| DEFAULT_CONTEXT.min(family.max_positions() as u32));
        let tuning = match &self.lora {
            None => Tuning::Full,
            Some(l) => {
                let targets = if l.targets.is_empty() {
                    family
                        .default_lora_targets()
                        .iter()
                        .map(|t| t.to_string())
                        .collect()
                } else {
                    l.targets.clone()
                };
                let lora = LoraSpec {
                    rank: l.rank,
                    alpha: l.alpha.unwrap_or(2.0 * l.rank as f32),
                    targets,
                    variant: if l.plain {
                        LoraVariant::Plain
                    } else {
                        LoraVariant::FrozenA
                    },
                    seed: l.seed,
                };
                let base = match &checkpoint {
                    None => BaseWeights::Seeded(seed),
                    Some((_, flat)) => {
                        // The base as devices read it: one f32 safetensors
                        // file of the family's tensors.
                        std::fs::create_dir_all(scratch).map_err(|source| AssetError::Io {
                            path: scratch.display().to_string(),
                            source,
                        })?;
                        let path = scratch.join("base.safetensors");
                        checkpoint::write_safetensors(
                            &path,
                            &family.tensors(),
                            flat,
                            "",
                            HashMap::from([("covey".to_owned(), "lora base".to_owned())]),
                        )?;
                        let asset = asset_of(&path)?;
                        assets.push(path);
                        BaseWeights::Asset(asset)
                    }
                };
                Tuning::Lora { lora, base }
            }
        };
        let spec = LanguageSpec {
            arch,
            tokenizer,
            context,
            tuning,
        };
        spec.validate()?;
        let weights = match (&spec.tuning, &checkpoint) {
            (Tuning::Full, Some((_, flat))) => flat.clone(),
            (Tuning::Full, None) => spec.initial_base(seed),
            (Tuning::Lora { .. }, _) => spec.initial_trainable(seed),
        };
        Ok(Prepared {
            spec: ModelSpec::Language(Box::new(spec)),
            weights,
            assets,
            source: self.model.clone(),
        })
    }

    /// The tokenizer: as asked, else the built-in model's, else the
    /// checkpoint's tokenizer.json, else GPT-2's BPE for a GPT-2 of its
    /// vocabulary. A tokenizer.json becomes an asset.
    fn tokenizer(
        &self,
        arch: &LmArch,
        builtin: Option<TokenizerSpec>,
        checkpoint: Option<&(PathBuf, Vec<f32>)>,
        assets: &mut Vec<PathBuf>,
    ) -> Result<TokenizerSpec, PrepareError> {
        let family = arch.family();
        let vocab = family.vocab_size();
        let file = match self.tokenizer.as_deref() {
            Some("bytes") => return Ok(TokenizerSpec::Bytes),
            Some("gpt2") => return Ok(TokenizerSpec::Gpt2Bpe),
            Some(path) => PathBuf::from(path),
            None => match (builtin, checkpoint) {
                (Some(t), _) => return Ok(t),
                (None, Some((dir, _))) => {
                    let file = dir.join("tokenizer.json");
                    if !file.exists() {
                        if matches!(arch, LmArch::Gpt2(_)) && vocab == 50_257 {
                            return Ok(TokenizerSpec::Gpt2Bpe);
                        }
                        return Err(PrepareError::NoTokenizer {
                            dir: dir.display().to_string(),
                            family: family.name(),
                            vocab,
                        });
                    }
                    file
                }
                (None, None) => return Err(PrepareError::Unknown(self.model.clone())),
            },
        };
        let tokenizer = TextTokenizer::from_file(&file)?;
        if tokenizer.vocab_size() > vocab {
            return Err(PrepareError::Vocab {
                tokenizer: tokenizer.vocab_size(),
                model: vocab,
            });
        }
        let asset = asset_of(&file)?;
        assets.push(file);
        Ok(TokenizerSpec::HuggingFace(asset))
    }
}

/// Puts prepared assets into the store at `cache`, moving files that were
/// written into `scratch` and copying the operator's own.
pub fn store_assets(
    cache: &AssetCache,
    assets: &[PathBuf],
    scratch: &Path,
) -> Result<(), AssetError> {
    for path in assets {
        if path.starts_with(scratch) {
            cache.adopt(path)?;
        } else {
            cache.insert(path)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reference(name: &str) -> String {
        format!(
            "hf:{}/../client/tests/data/lm/{name}",
            env!("CARGO_MANIFEST_DIR")
        )
    }

    fn choice(model: &str) -> ModelChoice {
        ModelChoice {
            model: model.into(),
            ..Default::default()
        }
    }

    /// A language model's config trains with local Adam at the rate that
    /// leaves the bigram plateau; a classifier's keeps SGD.
    #[test]
    fn a_language_model_is_configured_for_adam() {
        let dir = tempfile::tempdir().unwrap();
        let mut config = crate::ServerConfig::default();
        let classifier = choice("2nn").prepare(1, dir.path()).unwrap();
        classifier.training_defaults(&mut config);
        let defaults = crate::ServerConfig::default().training;
        assert_eq!(config.training.local_optimizer, "sgd");
        assert_eq!(config.training.learning_rate, defaults.learning_rate);
        let language = choice("gpt2-bytes").prepare(1, dir.path()).unwrap();
        language.training_defaults(&mut config);
        assert_eq!(config.training.local_optimizer, "adam");
        assert_eq!(config.training.learning_rate, LANGUAGE_LEARNING_RATE);
        assert!(config.settings().is_ok());
    }

    #[test]
    fn classifiers_and_built_ins_need_no_assets() {
        let dir = tempfile::tempdir().unwrap();
        let p = choice("cnn").prepare(1, dir.path()).unwrap();
        assert_eq!(p.weights.len(), 1_663_370);
        assert!(p.assets.is_empty());
        let p = choice("gpt2-bytes").prepare(1, dir.path()).unwrap();
        let spec = p.spec.as_language().unwrap();
        assert_eq!(spec.tokenizer, TokenizerSpec::Bytes);
        assert_eq!(spec.context, 128);
        assert_eq!(p.weights.len(), p.spec.param_count());
        let mut lora = choice("gpt2-bytes");
        lora.lora = Some(LoraChoice {
            rank: 4,
            alpha: None,
            targets: Vec::new(),
            plain: false,
            seed: 2,
        });
        let p = lora.prepare(1, dir.path()).unwrap();
        let Tuning::Lora { lora, base } = &p.spec.as_language().unwrap().tuning else {
            panic!("LoRA was asked for");
        };
        assert_eq!(*base, BaseWeights::Seeded(1));
        assert_eq!(lora.alpha, 8.0);
        assert_eq!(lora.targets, ["c_attn", "attn.c_proj"]);
        assert!(p.weights.iter().all(|&w| w == 0.0));
        let mut bad = choice("cnn");
        bad.context = Some(64);
        assert!(matches!(
            bad.prepare(1, dir.path()),
            Err(PrepareError::NotLanguage(_))
        ));
        assert!(matches!(
            choice("bert").prepare(1, dir.path()),
            Err(PrepareError::Unknown(_))
        ));
    }

    #[test]
    fn a_lora_checkpoint_becomes_a_base_asset_and_zero_adapters() {
        let dir = tempfile::tempdir().unwrap();
        let mut c = choice(&reference("llama"));
        c.tokenizer = Some("bytes".into());
        c.lora = Some(LoraChoice {
            rank: 2,
            alpha: Some(4.0),
            targets: vec!["q_proj".into()],
            plain: false,
            seed: 0,
        });
        let p = c.prepare(0, dir.path()).unwrap();
        assert_eq!(p.assets.len(), 1);
        let spec = p.spec.as_language().unwrap();
        let Tuning::Lora {
            base: BaseWeights::Asset(a),
            ..
        } = spec.tuning
        else {
            panic!("a checkpoint's base is an asset");
        };
        assert_eq!(asset_of(&p.assets[0]).unwrap(), a);
        // The base file reads back as the checkpoint.
        let (_, flat) =
            checkpoint::read_checkpoint(&PathBuf::from(&reference("llama")[3..])).unwrap();
        assert_eq!(
            covey_client::lm::reader::read_tensors::<f32>(&p.assets, &spec.arch).unwrap(),
            flat
        );
        let cache = AssetCache::new(dir.path().join("assets")).unwrap();
        store_assets(&cache, &p.assets, dir.path()).unwrap();
        assert!(cache.verified(&a).unwrap().is_some());
    }

    #[test]
    fn tokenizers_must_fit_the_vocabulary() {
        let dir = tempfile::tempdir().unwrap();
        // The reference tokenizer has 300 tokens: it fits the 300-token models.
        let file = format!(
            "{}/../client/tests/data/lm/tokenizer/tokenizer.json",
            env!("CARGO_MANIFEST_DIR")
        );
        let mut c = choice(&reference("gpt2"));
        c.tokenizer = Some(file.clone());
        let p = c.prepare(0, dir.path()).unwrap();
        assert!(matches!(
            p.spec.as_language().unwrap().tokenizer,
            TokenizerSpec::HuggingFace(_)
        ));
        assert_eq!(p.assets, [PathBuf::from(&file)]);
        c.tokenizer = Some("gpt2".into());
        let err = c.prepare(0, dir.path()).unwrap_err().to_string();
        assert!(err.contains("vocab_size"), "{err}");
        c.tokenizer = None;
        let err = c.prepare(0, dir.path()).unwrap_err().to_string();
        assert!(err.contains("holds no tokenizer.json"), "{err}");
    }
}
