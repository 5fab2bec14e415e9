//! Transformer language models: a family's configuration, the tokenizer
//! that turns a device's text into its vocabulary, and how it is tuned.

use std::fmt;

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Normal};
use serde::{Deserialize, Serialize};

use super::{Gpt2Config, LlamaConfig, LoraSpec, ModelError, Projection, TensorSpec, WeightLayout};

/// Largest size of any one dimension a spec may name: far above any real
/// model's, and low enough that no product of a few of them overflows.
pub(crate) const MAX_DIM: usize = 1 << 20;
/// Largest layer count.
pub(crate) const MAX_LAYERS: usize = 1 << 10;
/// Largest parameter count of a whole model (64 G values).
const MAX_PARAMS: usize = 1 << 36;

/// What one transformer family defines. A new family is one module that
/// implements this, plus its variant in [`LmArch`].
pub trait Family {
    /// `gpt2`, `llama`: Hugging Face's `model_type`.
    fn name(&self) -> &'static str;
    /// Checks the configuration, naming the field at fault.
    fn validate(&self) -> Result<(), ModelError>;
    fn vocab_size(&self) -> usize;
    /// Longest sequence the position encoding covers.
    fn max_positions(&self) -> usize;
    fn layers(&self) -> usize;
    fn width(&self) -> usize;
    /// Every parameter tensor, in Hugging Face's names (without a prefix
    /// such as `transformer.`) and shapes, in wire order.
    fn tensors(&self) -> Vec<TensorSpec>;
    /// The linear projections LoRA can adapt, in wire order.
    fn projections(&self) -> Vec<Projection>;
    /// The attention projections, LoRA's default targets.
    fn default_lora_targets(&self) -> &'static [&'static str];
    /// How the projections' weights are stored.
    fn weight_layout(&self) -> WeightLayout;
    /// How a model trained from scratch draws tensor `t` at version 0.
    fn init(&self, t: &TensorSpec) -> Init;
}

/// A tensor's initial values.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Init {
    Normal { std: f32 },
    Ones,
    Zeros,
}

/// The transformer families.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum LmArch {
    Gpt2(Gpt2Config),
    Llama(LlamaConfig),
}

impl LmArch {
    pub fn family(&self) -> &dyn Family {
        match self {
            Self::Gpt2(c) => c,
            Self::Llama(c) => c,
        }
    }
}

/// A file a device fetches once and caches, named by its content.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct AssetRef {
    #[serde(with = "hex32")]
    pub sha256: [u8; 32],
    pub bytes: u64,
}

/// 32 bytes as 64 hex digits in human-readable formats (config files),
/// as raw bytes on the wire.
mod hex32 {
    use serde::{Deserialize, Deserializer, Serialize, Serializer, de::Error};

    pub fn serialize<S: Serializer>(v: &[u8; 32], s: S) -> Result<S::Ok, S::Error> {
        if s.is_human_readable() {
            let hex: String = v.iter().map(|b| format!("{b:02x}")).collect();
            s.serialize_str(&hex)
        } else {
            v.serialize(s)
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<[u8; 32], D::Error> {
        if !d.is_human_readable() {
            return <[u8; 32]>::deserialize(d);
        }
        let hex = String::deserialize(d)?;
        let bad = || D::Error::custom(format!("'{hex}' is not 64 hex digits"));
        if hex.len() != 64 || !hex.is_ascii() {
            return Err(bad());
        }
        let mut out = [0u8; 32];
        for (i, byte) in out.iter_mut().enumerate() {
            *byte = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).map_err(|_| bad())?;
        }
        Ok(out)
    }
}

impl AssetRef {
    pub fn hex(&self) -> String {
        self.sha256.iter().map(|b| format!("{b:02x}")).collect()
    }
}

impl fmt::Debug for AssetRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sha256:{} ({} bytes)", self.hex(), self.bytes)
    }
}

/// How a device turns its text into token ids.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum TokenizerSpec {
    /// One token per byte of UTF-8: a vocabulary of 256, nothing to fetch.
    Bytes,
    /// GPT-2's byte-level BPE (r50k_base), built into the client.
    Gpt2Bpe,
    /// A Hugging Face `tokenizer.json`, fetched by hash.
    HuggingFace(AssetRef),
}

impl TokenizerSpec {
    /// The vocabulary a model needs at least, where it is known without
    /// loading the tokenizer.
    pub fn min_vocab(&self) -> Option<usize> {
        match self {
            Self::Bytes => Some(256),
            Self::Gpt2Bpe => Some(50_257),
            Self::HuggingFace(_) => None,
        }
    }
}

impl fmt::Display for TokenizerSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Bytes => f.write_str("bytes"),
            Self::Gpt2Bpe => f.write_str("gpt2 bpe"),
            Self::HuggingFace(a) => write!(f, "tokenizer.json {}", &a.hex()[..12]),
        }
    }
}

/// Where a LoRA run's frozen base weights come from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum BaseWeights {
    /// [`LanguageSpec::initial_base`] with this seed: nothing to fetch.
    Seeded(u64),
    /// A safetensors file of the family's tensors, fetched once by hash.
    Asset(AssetRef),
}

/// Which parameters train, and so which travel.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Tuning {
    /// Every parameter trains and travels.
    Full,
    /// Low-rank adapters on some projections; the base stays frozen on
    /// the device and only the adapters travel.
    Lora { lora: LoraSpec, base: BaseWeights },
}

/// A transformer language model as the server sends it in a task.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LanguageSpec {
    pub arch: LmArch,
    pub tokenizer: TokenizerSpec,
    /// Tokens per training and evaluation sequence.
    pub context: u32,
    pub tuning: Tuning,
}

impl LanguageSpec {
    pub fn validate(&self) -> Result<(), ModelError> {
        let family = self.arch.family();
        family.validate()?;
        let total = family
            .tensors()
            .iter()
            .try_fold(0usize, |sum, t| sum.checked_add(t.len()))
            .filter(|&n| n <= MAX_PARAMS)
            .ok_or_else(|| ModelError::new(family.name(), "over 64 G parameters"))?;
        debug_assert!(total > 0);
        let context = self.context as usize;
        if context < 2 || context > family.max_positions() {
            return Err(ModelError::new(
                "context",
                format!(
                    "{context} tokens: must be at least 2 and at most the model's {} positions",
                    family.max_positions()
                ),
            ));
        }
        if let Some(min) = self.tokenizer.min_vocab()
            && family.vocab_size() < min
        {
            return Err(ModelError::new(
                "vocab_size",
                format!(
                    "{} is smaller than the {} tokenizer's {min} tokens",
                    family.vocab_size(),
                    self.tokenizer
                ),
            ));
        }
        if let Tuning::Lora { lora, .. } = &self.tuning {
            lora.validate()?;
            lora.modules(family)?;
        }
        Ok(())
    }

    /// The files a device fetches by hash: a tokenizer.json, a LoRA base.
    pub fn assets(&self) -> Vec<AssetRef> {
        let mut out = Vec::new();
        if let TokenizerSpec::HuggingFace(a) = self.tokenizer {
            out.push(a);
        }
        if let Tuning::Lora {
            base: BaseWeights::Asset(a),
            ..
        } = self.tuning
        {
            out.push(a);
        }
        out
    }

    /// The tensors that train and travel, in wire order.
    pub fn trainable_tensors(&self) -> Vec<TensorSpec> {
        match &self.tuning {
            Tuning::Full => self.arch.family().tensors(),
            Tuning::Lora { lora, .. } => lora
                .modules(self.arch.family())
                .map(|modules| lora.tensors(&modules))
                .unwrap_or_default(),
        }
    }

    /// The projections LoRA adapts; empty for full fine-tuning.
    pub fn lora_modules(&self) -> Result<Vec<Projection>, ModelError> {
        match &self.tuning {
            Tuning::Full => Ok(Vec::new()),
            Tuning::Lora { lora, .. } => lora.modules(self.arch.family()),
        }
    }

    /// Every base parameter drawn from `seed` as the family initialises a
    /// model trained from scratch, flat in [`Family::tensors`] order.
    pub fn initial_base(&self, seed: u64) -> Vec<f32> {
        let family = self.arch.family();
        let tensors = family.tensors();
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut out = Vec::with_capacity(tensors.iter().map(TensorSpec::len).sum());
        for t in &tensors {
            match family.init(t) {
                Init::Ones => out.extend(std::iter::repeat_n(1.0, t.len())),
                Init::Zeros => out.extend(std::iter::repeat_n(0.0, t.len())),
                Init::Normal { std } => match Normal::new(0.0f32, std) {
                    Ok(normal) => out.extend((0..t.len()).map(|_| normal.sample(&mut rng))),
                    Err(_) => out.extend(std::iter::repeat_n(0.0, t.len())),
                },
            }
        }
        out
    }

    /// The trainable vector at version 0 from scratch: the whole model for
    /// full fine-tuning, fresh adapters (B = 0, so the model starts as its
    /// base) for LoRA.
    pub fn initial_trainable(&self, seed: u64) -> Vec<f32> {
        match &self.tuning {
            Tuning::Full => self.initial_base(seed),
            Tuning::Lora { lora, .. } => match lora.modules(self.arch.family()) {
                Ok(modules) => lora.initial(&modules),
                Err(_) => Vec::new(),
            },
        }
    }
}

impl fmt::Display for LanguageSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let family = self.arch.family();
        let params: usize = family.tensors().iter().map(TensorSpec::len).sum();
        write!(
            f,
            "{} ({} layers, width {}, {:.1}M parameters, {} tokenizer, context {})",
            family.name(),
            family.layers(),
            family.width(),
            params as f64 / 1e6,
            self.tokenizer,
            self.context
        )?;
        match &self.tuning {
            Tuning::Full => f.write_str(", full fine-tuning"),
            Tuning::Lora { lora, .. } => write!(f, ", {lora}"),
        }
    }
}

/// Checks `value` is in 1..=max for a dimension named `field`.
pub(crate) fn dimension(field: &str, value: usize, max: usize) -> Result<(), ModelError> {
    if value == 0 || value > max {
        return Err(ModelError::new(
            field,
            format!("{value} is out of range 1..={max}"),
        ));
    }
    Ok(())
}

/// Checks `value` is finite and positive.
pub(crate) fn positive(field: &str, value: f64) -> Result<(), ModelError> {
    if !(value.is_finite() && value > 0.0) {
        return Err(ModelError::new(
            field,
            format!("{value} must be a positive number"),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{LoraVariant, ModelSpec};

    fn lora(targets: &[&str], variant: LoraVariant) -> Tuning {
        Tuning::Lora {
            lora: LoraSpec {
                rank: 4,
                alpha: 8.0,
                targets: targets.iter().map(|t| t.to_string()).collect(),
                variant,
                seed: 7,
            },
            base: BaseWeights::Seeded(1),
        }
    }

    fn tiny(tuning: Tuning) -> LanguageSpec {
        LanguageSpec {
            arch: LmArch::Gpt2(Gpt2Config::bytes()),
            tokenizer: TokenizerSpec::Bytes,
            context: 64,
            tuning,
        }
    }

    #[test]
    fn the_byte_model_has_about_three_million_parameters() {
        let spec = tiny(Tuning::Full);
        spec.validate().unwrap();
        let n = ModelSpec::Language(Box::new(spec.clone())).param_count();
        assert_eq!(n, 3_257_856);
        assert_eq!(spec.initial_trainable(3).len(), n);
        assert_eq!(spec.initial_trainable(3), spec.initial_trainable(3));
        assert_ne!(spec.initial_trainable(3), spec.initial_trainable(4));
    }

    #[test]
    fn lora_trains_and_sends_only_its_factors() {
        let ffa = tiny(lora(&["c_attn"], LoraVariant::FrozenA));
        ffa.validate().unwrap();
        let tensors = ffa.trainable_tensors();
        // B of c_attn in each of the 4 layers: [3 * 256, 4].
        assert_eq!(tensors.len(), 4);
        assert_eq!(tensors[0].name, "h.0.attn.c_attn.lora_B.weight");
        assert_eq!(tensors[0].shape, vec![768, 4]);
        assert!(ffa.initial_trainable(0).iter().all(|&v| v == 0.0));
        let plain = tiny(lora(&["c_attn", "attn.c_proj"], LoraVariant::Plain));
        let tensors = plain.trainable_tensors();
        assert_eq!(tensors.len(), 16);
        assert_eq!(tensors[0].name, "h.0.attn.c_attn.lora_A.weight");
        assert_eq!(tensors[0].shape, vec![4, 256]);
        let init = plain.initial_trainable(0);
        assert!(init[..4 * 256].iter().any(|&v| v != 0.0));
        assert!(init[4 * 256..4 * 256 + 768 * 4].iter().all(|&v| v == 0.0));
    }

    #[test]
    fn bad_specs_name_the_field() {
        let mut spec = tiny(Tuning::Full);
        spec.context = 4096;
        assert_eq!(spec.validate().unwrap_err().field, "context");
        let spec = tiny(lora(&["q_proj"], LoraVariant::FrozenA));
        let err = spec.validate().unwrap_err();
        assert_eq!(err.field, "lora.targets");
        assert!(err.problem.contains("q_proj"), "{err}");
        let mut spec = tiny(Tuning::Full);
        spec.tokenizer = TokenizerSpec::Gpt2Bpe;
        assert_eq!(spec.validate().unwrap_err().field, "vocab_size");
        let mut c = Gpt2Config::bytes();
        c.n_head = 3;
        let mut spec = tiny(Tuning::Full);
        spec.arch = LmArch::Gpt2(c);
        assert_eq!(spec.validate().unwrap_err().field, "n_head");
    }

    #[test]
    fn asset_hashes_are_hex_in_json_and_bytes_on_the_wire() {
        let mut spec = tiny(Tuning::Full);
        spec.tokenizer = TokenizerSpec::HuggingFace(AssetRef {
            sha256: [0xab; 32],
            bytes: 7,
        });
        let json = serde_json::to_string(&spec).unwrap();
        assert!(json.contains(&"ab".repeat(32)), "{json}");
        assert_eq!(serde_json::from_str::<LanguageSpec>(&json).unwrap(), spec);
        let bad = json.replace(&"ab".repeat(32), "zz");
        assert!(serde_json::from_str::<LanguageSpec>(&bad).is_err());
        let wire = postcard::to_stdvec(&spec).unwrap();
        assert!(wire.len() < json.len());
    }

    #[test]
    fn specs_survive_the_wire() {
        let spec = ModelSpec::Language(Box::new(tiny(lora(&["c_fc"], LoraVariant::Plain))));
        let bytes = postcard::to_stdvec(&spec).unwrap();
        let back: ModelSpec = postcard::from_bytes(&bytes).unwrap();
        assert_eq!(back, spec);
        assert!(back.to_string().starts_with("gpt2 (4 layers, width 256"));
    }
}
