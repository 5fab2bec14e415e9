//! Models Covey does not build itself: a list of named float tensors that
//! devices train in their own code (a PyTorch or numpy training loop behind
//! the Python package), in the order that code lists them.
//!
//! The server never runs such a model, so all it needs is the shapes:
//! aggregation, clipping, noise and secure aggregation see only the flat
//! vector, and every round checks that what a device returns has exactly
//! these shapes.

use std::fmt;

use serde::{Deserialize, Serialize};

use super::{ModelError, TensorSpec};

/// The safetensors metadata key that lists a model file's tensor names in
/// `get_parameters`' order, as a JSON array (safetensors keeps no order).
pub const ORDER_KEY: &str = "covey.order";

/// Most tensors one external model may list.
pub const MAX_TENSORS: usize = 65_536;
/// Most values in all of an external model's tensors (8 GiB of f32); the
/// network's `max_model_bytes` is usually far lower.
pub const MAX_VALUES: u64 = 1 << 31;
/// Longest tensor name, in bytes.
pub const MAX_NAME: usize = 512;
/// Most dimensions of one tensor.
pub const MAX_RANK: usize = 16;

/// The tensors of a model trained outside Covey, in wire order.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExternalSpec {
    pub tensors: Vec<TensorSpec>,
}

impl ExternalSpec {
    pub fn new(tensors: Vec<TensorSpec>) -> Result<Self, ModelError> {
        let spec = Self { tensors };
        spec.validate()?;
        Ok(spec)
    }

    /// Checks counts, names and shapes without trusting any of them, so a
    /// spec from the network cannot overflow a product or allocate without
    /// bound.
    pub fn validate(&self) -> Result<(), ModelError> {
        if self.tensors.is_empty() {
            return Err(ModelError::new(
                "tensors",
                "an external model lists no tensor",
            ));
        }
        if self.tensors.len() > MAX_TENSORS {
            return Err(ModelError::new(
                "tensors",
                format!("{} tensors, more than {MAX_TENSORS}", self.tensors.len()),
            ));
        }
        let mut names = std::collections::HashSet::with_capacity(self.tensors.len());
        let mut total: u64 = 0;
        for (i, t) in self.tensors.iter().enumerate() {
            let field = || format!("tensors[{i}]");
            if t.name.is_empty() || t.name.len() > MAX_NAME {
                return Err(ModelError::new(
                    field(),
                    format!("a name must have 1 to {MAX_NAME} bytes"),
                ));
            }
            if !names.insert(t.name.as_str()) {
                return Err(ModelError::new(
                    field(),
                    format!("'{}' is listed twice", t.name),
                ));
            }
            if t.shape.len() > MAX_RANK {
                return Err(ModelError::new(
                    field(),
                    format!(
                        "'{}' has {} dimensions, more than {MAX_RANK}",
                        t.name,
                        t.shape.len()
                    ),
                ));
            }
            let len = t
                .shape
                .iter()
                .try_fold(1u64, |n, &d| n.checked_mul(d as u64))
                .filter(|&n| n <= MAX_VALUES);
            match len {
                Some(0) => {
                    return Err(ModelError::new(
                        field(),
                        format!("'{}' has shape {:?}, which holds no value", t.name, t.shape),
                    ));
                }
                Some(n) => total += n,
                None => {
                    return Err(ModelError::new(
                        field(),
                        format!(
                            "'{}' has shape {:?}, over {MAX_VALUES} values",
                            t.name, t.shape
                        ),
                    ));
                }
            }
        }
        if total > MAX_VALUES {
            return Err(ModelError::new(
                "tensors",
                format!("{total} values in all, more than {MAX_VALUES}"),
            ));
        }
        Ok(())
    }
}

impl fmt::Display for ExternalSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let values: usize = self.tensors.iter().map(TensorSpec::len).sum();
        write!(
            f,
            "external model ({} tensors, {values} values)",
            self.tensors.len()
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(tensors: &[(&str, &[usize])]) -> ExternalSpec {
        ExternalSpec {
            tensors: tensors
                .iter()
                .map(|(n, s)| TensorSpec::new(*n, s))
                .collect(),
        }
    }

    #[test]
    fn a_list_of_named_tensors_is_a_model() {
        let s = spec(&[
            ("fc.weight", &[10, 784]),
            ("fc.bias", &[10]),
            ("scale", &[]),
        ]);
        s.validate().unwrap();
        assert_eq!(s.to_string(), "external model (3 tensors, 7851 values)");
    }

    #[test]
    fn bad_lists_are_refused_with_the_tensor_named() {
        let e = spec(&[]).validate().unwrap_err();
        assert_eq!(e.field, "tensors");
        let e = spec(&[("w", &[2]), ("w", &[3])]).validate().unwrap_err();
        assert_eq!(e.field, "tensors[1]");
        assert!(e.problem.contains("twice"), "{e}");
        let e = spec(&[("w", &[2, 0])]).validate().unwrap_err();
        assert!(e.problem.contains("no value"), "{e}");
        let e = spec(&[("", &[2])]).validate().unwrap_err();
        assert_eq!(e.field, "tensors[0]");
        // A product that overflows u64 is caught, not wrapped.
        let e = spec(&[("w", &[usize::MAX, usize::MAX, 2])])
            .validate()
            .unwrap_err();
        assert!(e.problem.contains("over"), "{e}");
        let e = spec(&[("a", &[1 << 30]), ("b", &[1 << 30]), ("c", &[1])])
            .validate()
            .unwrap_err();
        assert_eq!(e.field, "tensors");
        let e = spec(&[("deep", &[1; 17])]).validate().unwrap_err();
        assert!(e.problem.contains("dimensions"), "{e}");
    }
}
