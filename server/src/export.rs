//! Model export as safetensors, readable by PyTorch's `safetensors` package.

use std::{collections::HashMap, path::Path};

use safetensors::tensor::{Dtype, TensorView};

use crate::store::StoredModel;

#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error("safetensors: {0}")]
    Format(#[from] safetensors::SafeTensorError),
    #[error("cannot write {path}: {source}")]
    Write {
        path: String,
        source: std::io::Error,
    },
}

/// Writes every tensor of `model` under its spec name, f32 little-endian,
/// with the version and architecture in the file's metadata.
pub fn write_safetensors(model: &StoredModel, path: &Path) -> Result<(), ExportError> {
    let bytes: Vec<u8> = model.weights.iter().flat_map(|v| v.to_le_bytes()).collect();
    let mut views = Vec::new();
    let mut offset = 0;
    for t in model.header.spec.tensors() {
        let len = t.len() * 4;
        views.push((
            t.name.clone(),
            TensorView::new(Dtype::F32, t.shape.clone(), &bytes[offset..offset + len])?,
        ));
        offset += len;
    }
    let metadata = HashMap::from([
        (
            "covey_version".to_owned(),
            model.header.version.0.to_string(),
        ),
        ("architecture".to_owned(), model.header.spec.to_string()),
    ]);
    let out = safetensors::serialize(views, Some(metadata))?;
    std::fs::write(path, out).map_err(|source| ExportError::Write {
        path: path.display().to_string(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::ModelHeader;
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
