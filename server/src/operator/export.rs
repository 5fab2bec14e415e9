//! Model export: the trainable tensors as safetensors (PyTorch's
//! `safetensors` package reads them), and for language models a Hugging
//! Face checkpoint (`transformers`' `from_pretrained` loads it, LoRA merged)
//! or the LoRA adapter alone as peft writes one.

use std::{collections::HashMap, path::Path};

use covey_client::{
    assets::AssetCache,
    lm::{
        checkpoint::{self, CheckpointError},
        tokenizer::TokenizerError,
        train::{TextTrainer, merged_weights},
    },
    model_file::order_metadata,
    trainer::TrainError,
};
use covey_protocol::model::{LanguageSpec, ModelSpec};

use crate::state::store::StoredModel;

#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error("cannot write {path}: {source}")]
    Write {
        path: String,
        source: std::io::Error,
    },
    #[error("--format {format} exports language models; version {version} is a {spec} classifier")]
    NotLanguage {
        format: &'static str,
        version: u64,
        spec: String,
    },
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    #[error(transparent)]
    Model(#[from] TrainError),
    #[error(transparent)]
    Tokenizer(#[from] TokenizerError),
}

/// The export formats.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// The trainable tensors under their names, one file.
    Safetensors,
    /// A Hugging Face checkpoint directory, LoRA merged into the weights.
    HuggingFace,
    /// A peft LoRA adapter directory.
    Lora,
}

impl std::str::FromStr for Format {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "safetensors" => Ok(Self::Safetensors),
            "hf" => Ok(Self::HuggingFace),
            "lora" => Ok(Self::Lora),
            other => Err(format!(
                "unknown format '{other}': expected safetensors, hf or lora"
            )),
        }
    }
}

/// Writes `model` to `out` in `format`; `assets` holds a LoRA base and a
/// tokenizer.json the formats may need.
pub fn export(
    model: &StoredModel,
    format: Format,
    assets: &AssetCache,
    out: &Path,
) -> Result<(), ExportError> {
    let language = |format| match &model.header.spec {
        ModelSpec::Language(l) => Ok(l.as_ref()),
        spec => Err(ExportError::NotLanguage {
            format,
            version: model.header.version.0,
            spec: spec.to_string(),
        }),
    };
    match format {
        Format::Safetensors => write_safetensors(model, out),
        Format::HuggingFace => write_hf(language("hf")?, &model.weights, assets, out),
        Format::Lora => Ok(checkpoint::write_adapter(
            out,
            language("lora")?,
            &model.weights,
        )?),
    }
}

/// A Hugging Face checkpoint of `weights` (the trainable vector):
/// config.json, model.safetensors and tokenizer.json.
pub fn write_hf(
    spec: &LanguageSpec,
    weights: &[f32],
    assets: &AssetCache,
    out: &Path,
) -> Result<(), ExportError> {
    let flat = merged_weights(spec, weights, Some(assets))?;
    checkpoint::write_checkpoint(out, &spec.arch, &flat)?;
    let tokenizer = TextTrainer::tokenizer(&spec.tokenizer, Some(assets))?;
    let path = out.join("tokenizer.json");
    std::fs::write(&path, tokenizer.to_json()?).map_err(|source| ExportError::Write {
        path: path.display().to_string(),
        source,
    })
}

/// Writes every tensor of `model` under its spec name, f32 little-endian,
/// with the version, the architecture and the list order in the file's
/// metadata (so `init --model-file` and covey.read_model_file take it back).
pub fn write_safetensors(model: &StoredModel, path: &Path) -> Result<(), ExportError> {
    let tensors = model.header.spec.tensors();
    let metadata = HashMap::from([
        (
            "covey_version".to_owned(),
            model.header.version.0.to_string(),
        ),
        ("architecture".to_owned(), model.header.spec.to_string()),
        order_metadata(&tensors),
    ]);
    Ok(checkpoint::write_safetensors(
        path,
        &tensors,
        &model.weights,
        "",
        metadata,
    )?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::store::ModelHeader;
    use covey_protocol::{
        ModelVersion,
        model::{Architecture, ModelSpec},
    };

    #[test]
    fn exported_tensors_read_back_with_their_shapes() {
        let spec = ModelSpec::mnist(Architecture::LogReg);
        let weights = spec.initial_weights(3);
        let model = StoredModel {
            header: ModelHeader {
                version: ModelVersion(2),
                spec,
                round: None,
                created_unix_ms: 0,
            },
            weights: weights.clone(),
        };
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.safetensors");
        write_safetensors(&model, &path).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        let w = st.tensor("fc.weight").unwrap();
        assert_eq!(w.shape(), &[10, 784]);
        let first = f32::from_le_bytes(w.data()[..4].try_into().unwrap());
        assert_eq!(first, weights[0]);
        let b = st.tensor("fc.bias").unwrap();
        let last = f32::from_le_bytes(b.data()[36..40].try_into().unwrap());
        assert_eq!(last, weights[weights.len() - 1]);
    }
}
