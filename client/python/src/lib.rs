//! `covey._covey`: the Rust core of the `covey` Python package.
//!
//! `run_client` drives the same session as `covey-client run` (mutual TLS
//! over QUIC, check-in and backoff, clipping, DP noise, quantization,
//! SecAgg+ masking, certificate renewal, upload resume) around a Python
//! object's `fit` and `evaluate`. The GIL is released for everything but
//! those calls, and the calling thread checks for Ctrl-C every 100 ms.
//!
//! The pure-Python side (`python/covey/__init__.py`) holds `NumPyClient` and
//! the documented signatures.
// Unsafe code only in `alloc`, the allocator, for a measured need.
#![deny(unsafe_code)]

#[cfg(unix)]
mod alloc;
mod model_file;
mod spill;
mod trainer;

use std::{path::PathBuf, time::Duration};

use covey_client::{ClientOptions, assets::AssetCache};
use covey_protocol::identity::IdentityBundle;
use pyo3::{exceptions::PyRuntimeError, prelude::*};

pub use trainer::PyTrainer;

pyo3::create_exception!(_covey, CoveyError, pyo3::exceptions::PyException);

/// How often the blocked caller looks for Ctrl-C.
const SIGNAL_POLL: Duration = Duration::from_millis(100);

/// Serves `client` until the server ends the run; returns what it did.
#[pyfunction]
#[pyo3(signature = (
    client,
    identity,
    *,
    server = None,
    require_secure_aggregation = false,
    give_up_after = None,
    max_model_bytes = 1 << 30,
    cache = None,
))]
#[allow(clippy::too_many_arguments)]
fn run_client(
    py: Python<'_>,
    client: Py<PyAny>,
    identity: PathBuf,
    server: Option<String>,
    require_secure_aggregation: bool,
    give_up_after: Option<f64>,
    max_model_bytes: u64,
    cache: Option<PathBuf>,
) -> PyResult<Summary> {
    init_logging();
    let bundle = IdentityBundle::load(&identity).map_err(|e| CoveyError::new_err(e.to_string()))?;
    if !client.bind(py).hasattr("fit")? {
        return Err(pyo3::exceptions::PyTypeError::new_err(
            "the client has no fit(parameters, config) method",
        ));
    }
    let server_addr = match server {
        None => None,
        Some(s) => Some(s.parse().map_err(|_| {
            CoveyError::new_err(format!("server '{s}': expected an IP address and port"))
        })?),
    };
    let give_up_after = match give_up_after {
        None => None,
        Some(s) if s.is_finite() && s > 0.0 => Some(Duration::from_secs_f64(s)),
        Some(s) => {
            return Err(pyo3::exceptions::PyValueError::new_err(format!(
                "give_up_after = {s}: expected a positive number of seconds"
            )));
        }
    };
    let cache = cache.unwrap_or_else(|| identity.with_extension("assets"));
    let cache = AssetCache::new(&cache)
        .map_err(|e| CoveyError::new_err(format!("asset cache {}: {e}", cache.display())))?;
    let options = ClientOptions {
        server_addr,
        give_up_after,
        require_secure_aggregation,
        identity_path: Some(identity),
        max_model_bytes,
        assets: Some(cache),
        ..ClientOptions::default()
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| PyRuntimeError::new_err(format!("cannot start the async runtime: {e}")))?;
    let trainer = PyTrainer::new(client);
    let fit_nanos = trainer.fit_time();
    let trainer = Box::new(trainer);
    let outcome = py.detach(|| {
        runtime.block_on(async {
            let session = covey_client::run(&bundle, trainer, options);
            tokio::pin!(session);
            let mut ticks = tokio::time::interval(SIGNAL_POLL);
            loop {
                tokio::select! {
                    done = &mut session => return Ok(done),
                    _ = ticks.tick() => {
                        // On the caller's thread: where Python runs its
                        // signal handlers.
                        Python::attach(|py| py.check_signals())?;
                    }
                }
            }
        })
    });
    // A `fit` still running on a blocking thread must not hold up Ctrl-C.
    runtime.shutdown_background();
    match outcome {
        Ok(Ok(s)) => Ok(Summary {
            rounds_trained: s.rounds_trained,
            updates_accepted: s.updates_accepted,
            updates_rejected: s.updates_rejected,
            final_version: s.final_version.map(|v| v.0),
            bytes_up: s.bytes_up,
            bytes_down: s.bytes_down,
            connections: s.connections,
            round_seconds: s.round_time.as_secs_f64(),
            train_seconds: s.train_time.as_secs_f64(),
            fit_seconds: fit_nanos.load(std::sync::atomic::Ordering::Relaxed) as f64 * 1e-9,
        }),
        Ok(Err(e)) => Err(CoveyError::new_err(e.to_string())),
        // KeyboardInterrupt, raised to the caller once the session is dropped
        // (which closes its connection).
        Err(interrupt) => Err(interrupt),
    }
}

/// What one `run_client` did.
#[pyclass(frozen, get_all, module = "covey")]
#[derive(Clone, Debug)]
pub struct Summary {
    pub rounds_trained: u64,
    pub updates_accepted: u64,
    pub updates_rejected: u64,
    /// The global version when the server ended the run.
    pub final_version: Option<u64>,
    pub bytes_up: u64,
    pub bytes_down: u64,
    /// Connections made to the server; more than one means the device
    /// reconnected (a lost link, a server restart) and went on.
    pub connections: u32,
    /// Wall time of the rounds this device served, task to receipt.
    pub round_seconds: f64,
    /// The part of it between handing the model to `fit` and having the
    /// checked update back (`fit` plus the numpy conversions).
    pub train_seconds: f64,
    /// The part of it inside `fit` itself.
    pub fit_seconds: f64,
}

#[pymethods]
impl Summary {
    fn __repr__(&self) -> String {
        format!(
            "Summary(rounds_trained={}, updates_accepted={}, updates_rejected={}, final_version={}, bytes_up={}, bytes_down={}, connections={}, round_seconds={:.3}, train_seconds={:.3}, fit_seconds={:.3})",
            self.rounds_trained,
            self.updates_accepted,
            self.updates_rejected,
            self.final_version
                .map_or_else(|| "None".to_owned(), |v| v.to_string()),
            self.bytes_up,
            self.bytes_down,
            self.connections,
            self.round_seconds,
            self.train_seconds,
            self.fit_seconds
        )
    }
}

/// Writes `arrays` (float numpy arrays) to `path` as safetensors under
/// `names`, in that order, for `covey-server init --model-file`.
#[pyfunction]
fn write_model_file(
    py: Python<'_>,
    path: PathBuf,
    names: Vec<String>,
    arrays: Vec<Bound<'_, PyAny>>,
) -> PyResult<()> {
    let (spec, flat) = model_file::collect(&names, &arrays)?;
    py.detach(|| covey_client::model_file::write_model_file(&path, &spec, &flat))
        .map_err(|e| CoveyError::new_err(e.to_string()))
}

/// The tensors of a model file (`covey-server export`, or one
/// `write_model_file` wrote) in list order, as (name, array) pairs.
#[pyfunction]
fn read_model_file<'py>(
    py: Python<'py>,
    path: PathBuf,
) -> PyResult<Vec<Bound<'py, pyo3::types::PyTuple>>> {
    let (spec, flat) = py
        .detach(|| covey_client::model_file::read_model_file(&path))
        .map_err(|e| CoveyError::new_err(e.to_string()))?;
    model_file::arrays(py, &spec, flat)
}

/// Logs through `tracing` to stderr, filtered by `COVEY_LOG` as the Rust
/// client's are; a second `run_client` keeps the first subscriber.
fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("COVEY_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,quinn=warn,quinn_proto=warn"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .try_init();
}

#[pymodule]
fn _covey(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(run_client, m)?)?;
    m.add_function(wrap_pyfunction!(write_model_file, m)?)?;
    m.add_function(wrap_pyfunction!(read_model_file, m)?)?;
    m.add_class::<Summary>()?;
    m.add("CoveyError", m.py().get_type::<CoveyError>())?;
    m.add("PROTOCOL_VERSION", covey_protocol::PROTOCOL_VERSION)?;
    Ok(())
}
