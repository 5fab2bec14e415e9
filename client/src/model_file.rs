//! Model files of external models (those devices train in their own code):
//! a safetensors file of named float tensors, as `covey-server init
//! --model-file` reads it, `covey.write_initial_model` writes it and
//! `covey-server export` writes a version.
//!
//! safetensors keeps no tensor order (its header is a JSON map), and the
//! order is what binds a tensor to its place in `get_parameters`' list. So
//! the order comes from the file's `covey.order` metadata, which
//! `covey.write_initial_model` writes, or from names that are the list's
//! indices (`0`, `1`, ...); a file with neither is refused rather than
//! guessed at.

use std::{collections::HashMap, path::Path};

use covey_protocol::model::{ExternalSpec, ModelError, TensorSpec, external::ORDER_KEY};
use safetensors::{Dtype, SafeTensors};

use crate::lm::{
    checkpoint::{CheckpointError, write_safetensors},
    reader::widen,
};

#[derive(Debug, thiserror::Error)]
pub enum ModelFileError {
    #[error("cannot read the model file {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{path} is not a safetensors file: {source}")]
    Format {
        path: String,
        source: safetensors::SafeTensorError,
    },
    #[error("{path}: tensor '{name}' is {dtype:?}; an update is floats (F32, F16, BF16 or F64)")]
    Dtype {
        path: String,
        name: String,
        dtype: Dtype,
    },
    #[error("{path}: tensor '{name}' holds a non-finite value (NaN or infinity)")]
    NonFinite { path: String, name: String },
    #[error(
        "{path}: the tensors have no order (no `{ORDER_KEY}` metadata, and names that are not 0, 1, ...); write the file with covey.write_initial_model"
    )]
    NoOrder { path: String },
    #[error("{path}: the `{ORDER_KEY}` metadata {problem}")]
    BadOrder { path: String, problem: String },
    #[error("{path}: {source}")]
    Model { path: String, source: ModelError },
    #[error(transparent)]
    Write(#[from] CheckpointError),
}

/// Writes `flat` as `spec`'s tensors, f32, with the list order in the
/// metadata; `spec` is checked first, as the server will check it.
pub fn write_model_file(
    path: &Path,
    spec: &ExternalSpec,
    flat: &[f32],
) -> Result<(), ModelFileError> {
    spec.validate().map_err(|source| ModelFileError::Model {
        path: path.display().to_string(),
        source,
    })?;
    let metadata = HashMap::from([order_metadata(&spec.tensors)]);
    Ok(write_safetensors(path, &spec.tensors, flat, "", metadata)?)
}

/// The `covey.order` metadata entry for `tensors`, so a reader gets the
/// list back in its order.
pub fn order_metadata(tensors: &[TensorSpec]) -> (String, String) {
    let order: Vec<&str> = tensors.iter().map(|t| t.name.as_str()).collect();
    // A list of strings always serializes.
    let json = serde_json::to_string(&order).unwrap_or_default();
    (ORDER_KEY.to_owned(), json)
}

/// The model file's tensors in list order, and version 0's flat vector.
pub fn read_model_file(path: &Path) -> Result<(ExternalSpec, Vec<f32>), ModelFileError> {
    let name = path.display().to_string();
    let bytes = std::fs::read(path).map_err(|source| ModelFileError::Read {
        path: name.clone(),
        source,
    })?;
    let format = |source| ModelFileError::Format {
        path: name.clone(),
        source,
    };
    let (_, metadata) = SafeTensors::read_metadata(&bytes).map_err(format)?;
    let file = SafeTensors::deserialize(&bytes).map_err(format)?;
    let views: HashMap<String, _> = file.tensors().into_iter().collect();
    let order = order(&name, metadata.metadata().as_ref(), &views)?;
    let mut tensors = Vec::with_capacity(order.len());
    let mut flat = Vec::new();
    for tensor in order {
        // `order` lists every name of `views` exactly once.
        let Some(view) = views.get(&tensor) else {
            return Err(ModelFileError::BadOrder {
                path: name,
                problem: format!("names '{tensor}', which the file does not hold"),
            });
        };
        let values = widen(view.dtype(), view.data()).ok_or_else(|| ModelFileError::Dtype {
            path: name.clone(),
            name: tensor.clone(),
            dtype: view.dtype(),
        })?;
        if !values.iter().all(|v| v.is_finite()) {
            return Err(ModelFileError::NonFinite {
                path: name,
                name: tensor,
            });
        }
        flat.extend(values);
        tensors.push(TensorSpec::new(tensor, view.shape()));
    }
    let spec = ExternalSpec::new(tensors).map_err(|source| ModelFileError::Model {
        path: name.clone(),
        source,
    })?;
    Ok((spec, flat))
}

/// The list order of the file's tensors.
fn order<V>(
    path: &str,
    metadata: Option<&HashMap<String, String>>,
    views: &HashMap<String, V>,
) -> Result<Vec<String>, ModelFileError> {
    let bad = |problem: String| ModelFileError::BadOrder {
        path: path.to_owned(),
        problem,
    };
    if let Some(listed) = metadata.and_then(|m| m.get(ORDER_KEY)) {
        let names: Vec<String> = serde_json::from_str(listed)
            .map_err(|e| bad(format!("is not a JSON list of names: {e}")))?;
        if names.len() != views.len() {
            return Err(bad(format!(
                "lists {} names, and the file holds {} tensors",
                names.len(),
                views.len()
            )));
        }
        if let Some(missing) = names.iter().find(|n| !views.contains_key(*n)) {
            return Err(bad(format!(
                "names '{missing}', which the file does not hold"
            )));
        }
        // Same length, every name present: duplicates would leave a tensor out.
        let distinct: std::collections::HashSet<_> = names.iter().collect();
        if distinct.len() != names.len() {
            return Err(bad("lists a name twice".into()));
        }
        return Ok(names);
    }
    let mut indexed: Vec<(usize, &String)> = views
        .keys()
        .map(|k| {
            k.parse::<usize>()
                .ok()
                .filter(|i| k == &i.to_string())
                .map(|i| (i, k))
        })
        .collect::<Option<_>>()
        .ok_or_else(|| ModelFileError::NoOrder {
            path: path.to_owned(),
        })?;
    indexed.sort_unstable();
    if indexed.iter().enumerate().any(|(i, (n, _))| i != *n) {
        return Err(ModelFileError::NoOrder {
            path: path.to_owned(),
        });
    }
    Ok(indexed.into_iter().map(|(_, k)| k.clone()).collect())
}

#[cfg(test)]
mod tests {
    use safetensors::tensor::TensorView;

    use super::*;

    #[test]
    fn a_written_file_reads_back_in_its_order() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.safetensors");
        let spec = ExternalSpec::new(vec![
            TensorSpec::new("z.weight", &[2, 3]),
            TensorSpec::new("a.bias", &[3]),
        ])
        .unwrap();
        let flat: Vec<f32> = (0..9).map(|i| i as f32 * 0.5).collect();
        write_model_file(&path, &spec, &flat).unwrap();
        assert_eq!(read_model_file(&path).unwrap(), (spec.clone(), flat));
        let e = write_model_file(&path, &spec, &[1.0]).unwrap_err();
        assert!(e.to_string().contains("1 values"), "{e}");
    }

    fn f32_bytes(v: &[f32]) -> Vec<u8> {
        v.iter().flat_map(|x| x.to_le_bytes()).collect()
    }

    fn write(
        dir: &Path,
        tensors: &[(&str, Dtype, Vec<usize>, Vec<u8>)],
        metadata: Option<HashMap<String, String>>,
    ) -> std::path::PathBuf {
        let views: Vec<(String, TensorView<'_>)> = tensors
            .iter()
            .map(|(n, d, s, b)| ((*n).to_owned(), TensorView::new(*d, s.clone(), b).unwrap()))
            .collect();
        let path = dir.join("init.safetensors");
        safetensors::serialize_to_file(views, metadata, &path).unwrap();
        path
    }

    #[test]
    fn the_order_metadata_sets_the_list_order_and_dtypes_widen() {
        let dir = tempfile::tempdir().unwrap();
        let bf16: Vec<u8> = [1.5f32, -2.0]
            .iter()
            .flat_map(|x| half::bf16::from_f32(*x).to_le_bytes())
            .collect();
        let f64s: Vec<u8> = [0.25f64].iter().flat_map(|x| x.to_le_bytes()).collect();
        let path = write(
            dir.path(),
            &[
                (
                    "b.weight",
                    Dtype::F32,
                    vec![2, 2],
                    f32_bytes(&[1.0, 2.0, 3.0, 4.0]),
                ),
                ("a.bias", Dtype::BF16, vec![2], bf16),
                ("z", Dtype::F64, vec![], f64s),
            ],
            Some(HashMap::from([(
                ORDER_KEY.to_owned(),
                r#"["z", "b.weight", "a.bias"]"#.to_owned(),
            )])),
        );
        let (spec, flat) = read_model_file(&path).unwrap();
        let names: Vec<_> = spec.tensors.iter().map(|t| t.name.as_str()).collect();
        assert_eq!(names, ["z", "b.weight", "a.bias"]);
        assert_eq!(spec.tensors[0].shape, Vec::<usize>::new());
        assert_eq!(spec.tensors[1].shape, [2, 2]);
        assert_eq!(flat, [0.25, 1.0, 2.0, 3.0, 4.0, 1.5, -2.0]);
    }

    #[test]
    fn index_names_order_numerically() {
        let dir = tempfile::tempdir().unwrap();
        let tensors: Vec<_> = (0..12)
            .map(|i| (i.to_string(), vec![1], f32_bytes(&[i as f32])))
            .collect();
        let refs: Vec<_> = tensors
            .iter()
            .map(|(n, s, b)| (n.as_str(), Dtype::F32, s.clone(), b.clone()))
            .collect();
        let (spec, flat) = read_model_file(&write(dir.path(), &refs, None)).unwrap();
        assert_eq!(spec.tensors[10].name, "10");
        assert_eq!(flat, (0..12).map(|i| i as f32).collect::<Vec<_>>());
    }

    #[test]
    fn files_without_an_order_or_with_bad_values_are_refused_by_name() {
        let dir = tempfile::tempdir().unwrap();
        let one = |n: &str, d, b: Vec<u8>| (n.to_owned(), d, vec![b.len() / d_size(d)], b);
        fn d_size(d: Dtype) -> usize {
            d.bitsize() / 8
        }
        let case = |tensors: Vec<(String, Dtype, Vec<usize>, Vec<u8>)>, meta: Option<&str>| {
            let refs: Vec<_> = tensors
                .iter()
                .map(|(n, d, s, b)| (n.as_str(), *d, s.clone(), b.clone()))
                .collect();
            let meta = meta.map(|m| HashMap::from([(ORDER_KEY.to_owned(), m.to_owned())]));
            read_model_file(&write(dir.path(), &refs, meta))
                .unwrap_err()
                .to_string()
        };
        let e = case(vec![one("fc.weight", Dtype::F32, f32_bytes(&[1.0]))], None);
        assert!(e.contains("no order"), "{e}");
        // Indices with a gap are not a list.
        let e = case(
            vec![
                one("0", Dtype::F32, f32_bytes(&[1.0])),
                one("2", Dtype::F32, f32_bytes(&[1.0])),
            ],
            None,
        );
        assert!(e.contains("no order"), "{e}");
        let e = case(
            vec![one("w", Dtype::F32, f32_bytes(&[1.0]))],
            Some(r#"["w", "v"]"#),
        );
        assert!(e.contains("lists 2 names"), "{e}");
        let e = case(
            vec![one("w", Dtype::F32, f32_bytes(&[1.0]))],
            Some(r#"["v"]"#),
        );
        assert!(e.contains("'v'"), "{e}");
        let e = case(vec![one("w", Dtype::F32, f32_bytes(&[1.0]))], Some("w"));
        assert!(e.contains("JSON list"), "{e}");
        let e = case(vec![one("0", Dtype::I64, vec![0; 8])], None);
        assert!(e.contains("'0' is I64"), "{e}");
        let e = case(
            vec![one("0", Dtype::F32, f32_bytes(&[1.0, f32::NAN]))],
            None,
        );
        assert!(e.contains("'0' holds a non-finite"), "{e}");
        std::fs::write(dir.path().join("junk"), b"\xff\xff\xff\xff\xff\xff\xff\x7f").unwrap();
        let e = read_model_file(&dir.path().join("junk"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("not a safetensors file"), "{e}");
        let e = read_model_file(&dir.path().join("absent"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("cannot read the model file"), "{e}");
    }
}
