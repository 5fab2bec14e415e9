//! The device's own training code as a [`Trainer`]: a Flower-style
//! `NumPyClient` whose `fit` and `evaluate` the session calls with the
//! global model as numpy arrays.
//!
//! What `fit` returns is checked here, tensor by tensor, before anything
//! leaves: the count, every shape, a float dtype and finite values. The
//! update is `returned − global` against the model as it arrived (kept in
//! a temporary file while `fit` runs, `spill`), not the arrays `fit` was
//! handed, which it may have changed in place.

use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Instant,
};

use covey_client::trainer::{TrainError, TrainOutput, Trainer};
use covey_protocol::{
    message::{ConfigValue, LocalMetrics, LocalOptimizer, Task},
    model::{ModelSpec, TensorSpec},
};
use numpy::{
    PyArray1, PyArrayDescrMethods, PyArrayDyn, PyArrayMethods, PyUntypedArray,
    PyUntypedArrayMethods,
};
use pyo3::{
    prelude::*,
    types::{PyDict, PyList, PySlice, PyTuple},
};
use tracing::{debug, warn};

use crate::spill::Spill;

/// A Python object with `fit` and optionally `evaluate`.
pub struct PyTrainer {
    client: Py<PyAny>,
    /// Nanoseconds spent inside `fit` itself, shared with the caller so
    /// the time the core adds around it can be told apart.
    fit_nanos: Arc<AtomicU64>,
}

impl PyTrainer {
    pub fn new(client: Py<PyAny>) -> Self {
        Self {
            client,
            fit_nanos: Arc::default(),
        }
    }

    /// Total time inside `fit`, readable after the trainer is handed on.
    pub fn fit_time(&self) -> Arc<AtomicU64> {
        self.fit_nanos.clone()
    }
}

impl Trainer for PyTrainer {
    fn train(&mut self, task: &Task, global: &[f32]) -> Result<TrainOutput, TrainError> {
        self.train_owned(task, global.to_vec())
    }

    /// `global` itself becomes `fit`'s arrays, and the model as received
    /// waits on disk: while `fit` runs the core holds one model-sized
    /// buffer, and the update's own buffer is made only once `fit`'s arrays
    /// are released. Without a temporary file the copy stays in memory.
    fn train_owned(&mut self, task: &Task, global: Vec<f32>) -> Result<TrainOutput, TrainError> {
        let tensors = task.spec.tensors();
        let mut base = match Spill::new(&global) {
            Ok(spill) => Base::Disk(spill),
            Err(e) => {
                debug!("no temporary file for the received model, keeping it in memory: {e}");
                Base::Memory(global.clone())
            }
        };
        Python::attach(|py| {
            let parameters = parameters(py, &tensors, global).map_err(|e| failed(py, "fit", e))?;
            let config = fit_config(py, task).map_err(|e| failed(py, "fit", e))?;
            let started = Instant::now();
            let out = self
                .client
                .bind(py)
                .call_method1("fit", (parameters, config));
            let nanos = started.elapsed().as_nanos().try_into().unwrap_or(u64::MAX);
            self.fit_nanos.fetch_add(nanos, Ordering::Relaxed);
            let out = out.map_err(|e| failed(py, "fit", e))?;
            let (returned, num_examples, metrics) = triple(&out, "fit")?;
            update(&tensors, &mut base, &returned)?;
            // Released before the update's buffer is made: unless `fit`
            // kept them, the arrays it was handed and returned are freed.
            drop((returned, out));
            let delta = base.into_delta()?;
            let num_examples = examples(&num_examples, "fit")?;
            if num_examples == 0 {
                // The server weights by it and refuses an update from none.
                return Err(TrainError::External(
                    "fit returned num_examples = 0; an update must come from at least one example"
                        .into(),
                ));
            }
            let metrics = LocalMetrics {
                loss: metric(&metrics, "loss")?.unwrap_or(f32::NAN),
                accuracy: metric(&metrics, "accuracy")?.unwrap_or(f32::NAN),
            };
            Ok(TrainOutput {
                delta,
                num_examples,
                metrics,
            })
        })
    }

    fn evaluate(
        &mut self,
        spec: ModelSpec,
        weights: &[f32],
    ) -> Result<Option<(LocalMetrics, u64)>, TrainError> {
        let tensors = spec.tensors();
        Python::attach(|py| {
            let client = self.client.bind(py);
            if !client.hasattr("evaluate").unwrap_or(false) {
                return Ok(None);
            }
            let parameters = parameters(py, &tensors, weights.to_vec())
                .map_err(|e| failed(py, "evaluate", e))?;
            let config = PyDict::new(py);
            let out = client
                .call_method1("evaluate", (parameters, config))
                .map_err(|e| failed(py, "evaluate", e))?;
            let (loss, num_examples, metrics) = triple(&out, "evaluate")?;
            let loss: f64 = loss.extract().map_err(|_| {
                TrainError::External("evaluate returned a loss that is not a number".into())
            })?;
            let accuracy = metric(&metrics, "accuracy")?;
            if accuracy.is_none() {
                warn!(
                    "evaluate's metrics hold no 'accuracy' in [0, 1]; the server counts only reports with one"
                );
            }
            Ok(Some((
                LocalMetrics {
                    loss: loss as f32,
                    accuracy: accuracy.unwrap_or(f32::NAN),
                },
                examples(&num_examples, "evaluate")?,
            )))
        })
    }
}

/// Prints the traceback where the device's owner sees it (stderr, as
/// Python would) and turns the exception into a skipped round.
fn failed(py: Python<'_>, method: &str, e: PyErr) -> TrainError {
    e.display(py);
    TrainError::External(format!("{method} raised {e}"))
}

/// The model as `fit` takes it: one numpy array per tensor, each a view of
/// `flat`, which numpy now owns (no copy), so `fit` may change them in place.
fn parameters<'py>(
    py: Python<'py>,
    tensors: &[TensorSpec],
    flat: Vec<f32>,
) -> PyResult<Bound<'py, PyList>> {
    let all = PyArray1::from_vec(py, flat);
    let mut views = Vec::with_capacity(tensors.len());
    let mut offset = 0;
    for t in tensors {
        let end = offset + t.len();
        let slice = PySlice::new(py, offset as isize, end as isize, 1);
        let view = all.as_any().get_item(slice)?;
        views.push(view.call_method1("reshape", (PyTuple::new(py, &t.shape)?,))?);
        offset = end;
    }
    PyList::new(py, views)
}

/// `config` for `fit`: the task's round and hyperparameters, then the
/// operator's `[fit_config]`.
fn fit_config<'py>(py: Python<'py>, task: &Task) -> PyResult<Bound<'py, PyDict>> {
    let config = PyDict::new(py);
    config.set_item("round", task.round.0)?;
    config.set_item("base_version", task.base_version.0)?;
    config.set_item("epochs", task.hyper.epochs)?;
    config.set_item("batch_size", task.hyper.batch_size)?;
    config.set_item("learning_rate", task.hyper.learning_rate)?;
    config.set_item("proximal_mu", task.hyper.proximal_mu)?;
    config.set_item(
        "optimizer",
        match task.hyper.optimizer {
            LocalOptimizer::Sgd => "sgd",
            LocalOptimizer::Adam { .. } => "adam",
        },
    )?;
    config.set_item("seed", task.seed)?;
    for (k, v) in &task.config.0 {
        match v {
            ConfigValue::Bool(b) => config.set_item(k, b)?,
            ConfigValue::Int(i) => config.set_item(k, i)?,
            ConfigValue::Float(f) => config.set_item(k, f)?,
            ConfigValue::Text(s) => config.set_item(k, s)?,
        }
    }
    Ok(config)
}

/// The three items `fit` and `evaluate` return.
type Triple<'py> = (Bound<'py, PyAny>, Bound<'py, PyAny>, Bound<'py, PyAny>);

/// Flower's return shape: a tuple (or list) of three.
fn triple<'py>(out: &Bound<'py, PyAny>, method: &str) -> Result<Triple<'py>, TrainError> {
    let wrong = || {
        TrainError::External(format!(
            "{method} must return a tuple of three (parameters or loss, num_examples, metrics)"
        ))
    };
    if out.len().map_err(|_| wrong())? != 3 {
        return Err(wrong());
    }
    let item = |i: usize| out.get_item(i).map_err(|_| wrong());
    Ok((item(0)?, item(1)?, item(2)?))
}

fn examples(n: &Bound<'_, PyAny>, method: &str) -> Result<u64, TrainError> {
    n.extract::<u64>().map_err(|_| {
        TrainError::External(format!(
            "{method} returned a num_examples that is not a non-negative integer"
        ))
    })
}

/// A number in `metrics` (a dict, or None), if it is there.
fn metric(metrics: &Bound<'_, PyAny>, key: &str) -> Result<Option<f32>, TrainError> {
    if metrics.is_none() {
        return Ok(None);
    }
    let Ok(dict) = metrics.cast::<PyDict>() else {
        return Err(TrainError::External("metrics must be a dict".into()));
    };
    match dict.get_item(key) {
        Ok(Some(v)) => v
            .extract::<f64>()
            .map(|v| Some(v as f32))
            .map_err(|_| TrainError::External(format!("metrics['{key}'] is not a number"))),
        _ => Ok(None),
    }
}

/// The model as received, for the update.
enum Base {
    Disk(Spill),
    Memory(Vec<f32>),
}

impl Base {
    /// Replaces the values of the tensor at `offset` by `returned − base`;
    /// whether all are finite.
    fn subtract(
        &mut self,
        offset: usize,
        returned: impl Iterator<Item = f32>,
    ) -> Result<bool, TrainError> {
        match self {
            Self::Disk(spill) => spill.subtract_from(offset, returned).map_err(|e| {
                TrainError::External(format!("the received model's temporary file: {e}"))
            }),
            Self::Memory(values) => {
                let mut finite = true;
                for (g, r) in values[offset..].iter_mut().zip(returned) {
                    *g = r - *g;
                    finite &= g.is_finite();
                }
                Ok(finite)
            }
        }
    }

    fn into_delta(self) -> Result<Vec<f32>, TrainError> {
        match self {
            Self::Disk(spill) => spill.into_vec().map_err(|e| {
                TrainError::External(format!("the received model's temporary file: {e}"))
            }),
            Self::Memory(values) => Ok(values),
        }
    }
}

/// Turns `base` into `returned − base`, after checking `returned` against
/// the task's tensors; the first problem is reported with the tensor's
/// index and name (and `base` is then garbage, never sent).
fn update(
    tensors: &[TensorSpec],
    base: &mut Base,
    returned: &Bound<'_, PyAny>,
) -> Result<(), TrainError> {
    let count = returned.len().map_err(|_| {
        TrainError::External("fit must return its parameters as a list of numpy arrays".into())
    })?;
    if count != tensors.len() {
        return Err(TrainError::External(format!(
            "fit returned {count} arrays; the model has {} tensors",
            tensors.len()
        )));
    }
    let mut offset = 0;
    for (i, t) in tensors.iter().enumerate() {
        let bad = |problem: String| {
            TrainError::External(format!("fit's parameters[{i}] ('{}') {problem}", t.name))
        };
        let item = returned
            .get_item(i)
            .map_err(|e| bad(format!("cannot be read: {e}")))?;
        let array = item
            .cast::<PyUntypedArray>()
            .map_err(|_| bad(format!("is a {}, not a numpy array", type_name(&item))))?;
        if array.shape() != t.shape.as_slice() {
            return Err(bad(format!(
                "has shape {:?}; the model's is {:?}",
                array.shape(),
                t.shape
            )));
        }
        let dtype = array.dtype();
        if dtype.kind() != b'f' {
            return Err(bad(format!(
                "has dtype {}; parameters must be floats",
                dtype.str().map(|s| s.to_string()).unwrap_or_default()
            )));
        }
        // float64 (numpy's default), float16: converted once, by numpy.
        let f32s = match array.cast::<PyArrayDyn<f32>>() {
            Ok(a) => a.clone(),
            Err(_) => array
                .call_method1("astype", ("float32",))
                .and_then(|a| Ok(a.cast_into::<PyArrayDyn<f32>>()?))
                .map_err(|e| bad(format!("cannot be converted to float32: {e}")))?,
        };
        let ro = f32s.readonly();
        let finite = match ro.as_slice() {
            Ok(values) => base.subtract(offset, values.iter().copied())?,
            // Non-contiguous (a transposed view, say): logical order.
            Err(_) => base.subtract(offset, ro.as_array().iter().copied())?,
        };
        if !finite {
            return Err(bad("holds NaN or infinity".into()));
        }
        offset += t.len();
    }
    Ok(())
}

fn type_name(value: &Bound<'_, PyAny>) -> String {
    value
        .get_type()
        .name()
        .map(|n| n.to_string())
        .unwrap_or_else(|_| "value".into())
}
