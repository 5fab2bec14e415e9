//! numpy arrays to and from model files (`covey_client::model_file`): what
//! `covey.write_initial_model` writes for `covey-server init --model-file`,
//! and what `covey.read_model_file` loads from `covey-server export`.

use covey_protocol::model::{ExternalSpec, TensorSpec};
use numpy::{
    PyArray1, PyArrayDescrMethods, PyArrayDyn, PyArrayMethods, PyUntypedArray,
    PyUntypedArrayMethods,
};
use pyo3::{exceptions::PyValueError, prelude::*, types::PyTuple};

/// `arrays` named `names`, as a spec and its flat f32 values; a non-float
/// or non-array entry is refused with its index and name.
pub fn collect(
    names: &[String],
    arrays: &[Bound<'_, PyAny>],
) -> PyResult<(ExternalSpec, Vec<f32>)> {
    if names.len() != arrays.len() {
        return Err(PyValueError::new_err(format!(
            "{} names for {} arrays",
            names.len(),
            arrays.len()
        )));
    }
    let mut tensors = Vec::with_capacity(names.len());
    let mut flat = Vec::new();
    for (i, (name, item)) in names.iter().zip(arrays).enumerate() {
        let bad =
            |problem: &str| PyValueError::new_err(format!("parameters[{i}] ('{name}') {problem}"));
        let array = item
            .cast::<PyUntypedArray>()
            .map_err(|_| bad("is not a numpy array"))?;
        if array.dtype().kind() != b'f' {
            return Err(bad("is not a float array"));
        }
        let f32s = match array.cast::<PyArrayDyn<f32>>() {
            Ok(a) => a.clone(),
            Err(_) => array
                .call_method1("astype", ("float32",))?
                .cast_into::<PyArrayDyn<f32>>()?,
        };
        let ro = f32s.readonly();
        match ro.as_slice() {
            Ok(values) => flat.extend_from_slice(values),
            Err(_) => flat.extend(ro.as_array().iter().copied()),
        }
        tensors.push(TensorSpec::new(name.clone(), array.shape()));
    }
    let spec = ExternalSpec::new(tensors).map_err(|e| PyValueError::new_err(e.to_string()))?;
    Ok((spec, flat))
}

/// The file's tensors in list order, as (name, float32 array) pairs.
pub fn arrays<'py>(
    py: Python<'py>,
    spec: &ExternalSpec,
    flat: Vec<f32>,
) -> PyResult<Vec<Bound<'py, PyTuple>>> {
    let all = PyArray1::from_vec(py, flat);
    let mut out = Vec::with_capacity(spec.tensors.len());
    let mut offset = 0;
    for t in &spec.tensors {
        let end = offset + t.len();
        let slice = pyo3::types::PySlice::new(py, offset as isize, end as isize, 1);
        let view = all
            .as_any()
            .get_item(slice)?
            .call_method1("reshape", (PyTuple::new(py, &t.shape)?,))?;
        out.push(PyTuple::new(
            py,
            [t.name.clone().into_pyobject(py)?.into_any(), view],
        )?);
        offset = end;
    }
    Ok(out)
}
