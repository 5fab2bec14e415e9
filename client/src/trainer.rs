//! Local training with candle: the model named by the task's spec, SGD for
//! E epochs at batch B, optionally with FedProx's proximal term.

use candle_core::{D, DType, Device, Tensor, Var};
use covey_protocol::{
    message::{LocalMetrics, Task},
    model::{Architecture, ClassifierSpec, ModelSpec},
};
use rand::{SeedableRng, seq::SliceRandom};
use rand_chacha::ChaCha8Rng;

use crate::{
    conv::{conv2d_same_cnhw, relu_max_pool2, relu_max_pool2_portable},
    data::DataView,
    dense::dense_cpu,
    optim::optimizer,
    progress,
};

#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error("candle: {0}")]
    Candle(#[from] candle_core::Error),
    #[error("global model has {got} values, the {arch} spec needs {expected}")]
    WeightCount {
        arch: Architecture,
        expected: usize,
        got: usize,
    },
    #[error("the local dataset is empty")]
    NoData,
    #[error("the model's input is {spec} features, the local data has {data}")]
    InputMismatch { spec: usize, data: usize },
    #[error("device '{0}': expected auto, cpu, cuda or cuda:N")]
    BadDevice(String),
    #[error("training produced a non-finite loss; lower the learning rate")]
    Diverged,
    #[error("the training thread panicked: {0}")]
    Panicked(String),
    #[error("this device holds {data}, and cannot train the task's model: {model}")]
    WrongData { model: String, data: &'static str },
    #[error("the task's model cannot be built here: {0}")]
    Model(#[from] covey_protocol::model::ModelError),
    #[error(transparent)]
    Lm(#[from] crate::lm::LmError),
    #[error(transparent)]
    Text(#[from] crate::data::text::TextError),
    #[error(transparent)]
    Tokenizer(#[from] crate::lm::tokenizer::TokenizerError),
    #[error(transparent)]
    Checkpoint(#[from] crate::lm::checkpoint::CheckpointError),
    #[error(transparent)]
    Asset(#[from] crate::assets::AssetError),
    #[error("the task names a fetched asset, and this device keeps no asset cache")]
    NoAssetCache,
    #[error("the tokenizer has {tokenizer} tokens, more than the model's vocabulary of {model}")]
    TokenizerVocab { tokenizer: usize, model: usize },
    /// The device's own training code (the Python package's `fit` or
    /// `evaluate`) failed or returned something unusable; nothing is sent.
    #[error("the device's training code: {0}")]
    External(String),
}

/// What a client sends back after training.
#[derive(Clone, Debug, PartialEq)]
pub struct TrainOutput {
    /// w_local − w_global, flat in spec order.
    pub delta: Vec<f32>,
    pub num_examples: u64,
    pub metrics: LocalMetrics,
}

/// Local training, as the session loop sees it. Implemented by
/// [`CandleTrainer`]; tests can script exact updates through it.
pub trait Trainer: Send {
    fn train(&mut self, task: &Task, global: &[f32]) -> Result<TrainOutput, TrainError>;

    /// [`Self::train`] with the model handed over, so a trainer may write
    /// the update over it instead of holding a third model-sized buffer
    /// (the Python trainer does). The session calls this one.
    fn train_owned(&mut self, task: &Task, global: Vec<f32>) -> Result<TrainOutput, TrainError> {
        self.train(task, &global)
    }

    /// Metrics of `weights` on the device's held-out data and how many
    /// examples that is; `None` when the device holds none.
    fn evaluate(
        &mut self,
        _spec: ModelSpec,
        _weights: &[f32],
    ) -> Result<Option<(LocalMetrics, u64)>, TrainError> {
        Ok(None)
    }
}

/// Parses `--device`: `auto` picks CUDA when built with the `cuda` feature
/// and a GPU is present, the CPU otherwise.
pub fn select_device(name: &str) -> Result<Device, TrainError> {
    match name {
        "cpu" => Ok(Device::Cpu),
        "auto" => Ok(Device::cuda_if_available(0).unwrap_or(Device::Cpu)),
        "cuda" => Ok(Device::new_cuda(0)?),
        other => {
            let n = other
                .strip_prefix("cuda:")
                .and_then(|n| n.parse().ok())
                .ok_or_else(|| TrainError::BadDevice(other.to_owned()))?;
            Ok(Device::new_cuda(n)?)
        }
    }
}

/// The classifier a spec names, or an error saying this data cannot train
/// the spec's model.
pub fn classifier(spec: &ModelSpec) -> Result<ClassifierSpec, TrainError> {
    match spec {
        ModelSpec::Classifier(c) => Ok(*c),
        other => Err(TrainError::WrongData {
            model: other.to_string(),
            data: "images",
        }),
    }
}

/// A model's weights as candle variables, built from a flat vector.
pub struct Network {
    spec: ClassifierSpec,
    vars: Vec<Var>,
}

impl Network {
    pub fn from_flat(
        spec: ClassifierSpec,
        flat: &[f32],
        device: &Device,
    ) -> Result<Self, TrainError> {
        let expected = spec.param_count();
        if flat.len() != expected {
            return Err(TrainError::WeightCount {
                arch: spec.architecture,
                expected,
                got: flat.len(),
            });
        }
        let mut at = 0;
        let mut vars = Vec::new();
        for t in spec.tensors() {
            let len = t.len();
            let tensor = Tensor::from_slice(&flat[at..at + len], t.shape.as_slice(), device)?;
            vars.push(Var::from_tensor(&tensor)?);
            at += len;
        }
        Ok(Self { spec, vars })
    }

    pub fn vars(&self) -> &[Var] {
        &self.vars
    }

    /// `x · Wᵀ + b`, then ReLU when `relu` is set: one fused node on the CPU.
    fn linear(x: &Tensor, w: &Var, b: &Var, relu: bool) -> candle_core::Result<Tensor> {
        if x.device().is_cpu() {
            return dense_cpu(x, w, b, relu);
        }
        let y = x.matmul(&w.t()?)?.broadcast_add(b)?;
        if relu { y.relu() } else { Ok(y) }
    }

    /// Logits for a batch of flattened inputs `[B, features]`.
    pub fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let v = &self.vars;
        match self.spec.architecture {
            Architecture::LogReg => Self::linear(x, &v[0], &v[1], false),
            Architecture::Mlp2nn => {
                let h = Self::linear(x, &v[0], &v[1], true)?;
                let h = Self::linear(&h, &v[2], &v[3], true)?;
                Self::linear(&h, &v[4], &v[5], false)
            }
            Architecture::Cnn if x.device().is_cpu() => self.cnn_cpu(x),
            Architecture::Cnn => self.cnn_portable(x),
        }
    }

    /// The CNN with channel-major activations and one matrix product per
    /// convolution (see `conv`); pooling treats [K, B] like [N, C].
    fn cnn_cpu(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let (v, input) = (&self.vars, self.spec.input);
        let b = x.dim(0)?;
        let x = x
            .reshape((
                b,
                input.channels as usize,
                input.height as usize,
                input.width as usize,
            ))?
            .transpose(0, 1)?;
        let h = relu_max_pool2(&conv2d_same_cnhw(&x, &v[0], &v[1])?)?;
        let h = relu_max_pool2(&conv2d_same_cnhw(&h, &v[2], &v[3])?)?;
        let h = h.transpose(0, 1)?.contiguous()?.flatten_from(1)?;
        let h = Self::linear(&h, &v[4], &v[5], true)?;
        Self::linear(&h, &v[6], &v[7], false)
    }

    /// The same CNN from candle's own ops, for CUDA.
    fn cnn_portable(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let (v, input) = (&self.vars, self.spec.input);
        let b = x.dim(0)?;
        let x = x.reshape((
            b,
            input.channels as usize,
            input.height as usize,
            input.width as usize,
        ))?;
        let conv = |x: &Tensor, w: &Var, bias: &Var| -> candle_core::Result<Tensor> {
            let y = x.conv2d(w, 2, 1, 1, 1)?;
            relu_max_pool2_portable(&y.broadcast_add(&bias.reshape((1, bias.dim(0)?, 1, 1))?)?)
        };
        let h = conv(&x, &v[0], &v[1])?;
        let h = conv(&h, &v[2], &v[3])?;
        let h = h.flatten_from(1)?;
        let h = Self::linear(&h, &v[4], &v[5], true)?;
        Self::linear(&h, &v[6], &v[7], false)
    }

    pub fn flat(&self) -> Result<Vec<f32>, TrainError> {
        let mut out = Vec::with_capacity(self.spec.param_count());
        for v in &self.vars {
            out.extend(v.as_tensor().flatten_all()?.to_vec1::<f32>()?);
        }
        Ok(out)
    }
}

/// A dataset resident on the training device: inputs scaled to [0, 1].
pub struct DeviceData {
    images: Tensor,
    labels: Tensor,
    len: usize,
}

impl DeviceData {
    pub fn new(view: &DataView, device: &Device) -> Result<Self, TrainError> {
        if view.is_empty() {
            return Err(TrainError::NoData);
        }
        let features = view.data.image_len();
        let mut pixels = Vec::with_capacity(view.len() * features);
        for &i in &view.indices {
            pixels.extend(view.data.image(i).iter().map(|&p| f32::from(p) / 255.0));
        }
        let labels: Vec<u32> = view
            .indices
            .iter()
            .map(|&i| u32::from(view.data.labels[i]))
            .collect();
        Ok(Self {
            images: Tensor::from_vec(pixels, (view.len(), features), device)?,
            labels: Tensor::from_vec(labels, view.len(), device)?,
            len: view.len(),
        })
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn features(&self) -> usize {
        self.images.dims()[1]
    }

    fn batch(&self, indices: &[u32]) -> candle_core::Result<(Tensor, Tensor)> {
        let idx = Tensor::from_slice(indices, indices.len(), self.images.device())?;
        Ok((
            self.images.index_select(&idx, 0)?,
            self.labels.index_select(&idx, 0)?,
        ))
    }
}

/// How many rows of `logits` put their maximum on the label in `labels`.
fn correct_predictions(logits: &Tensor, labels: &Tensor) -> candle_core::Result<u64> {
    let hits = logits
        .argmax(D::Minus1)?
        .eq(labels)?
        .to_dtype(DType::U32)?
        .sum_all()?
        .to_scalar::<u32>()?;
    Ok(u64::from(hits))
}

/// Runs `work` for a model on `device`. On the CPU it runs on a worker of
/// rayon's pool, where each step's products and ops split across the pool
/// in place; called from outside it, every one of them would hand its work
/// to the pool and wait (BENCHMARKS.md: +20–30% samples/s on 2 cores).
pub(crate) fn on_device_pool<R: Send>(device: &Device, work: impl FnOnce() -> R + Send) -> R {
    if device.is_cpu() {
        rayon::scope(|_| work())
    } else {
        work()
    }
}

/// Loss and accuracy of `weights` on `data`, in batches of 1,000.
pub fn evaluate(
    spec: &ModelSpec,
    weights: &[f32],
    data: &DeviceData,
) -> Result<LocalMetrics, TrainError> {
    let spec = classifier(spec)?;
    on_device_pool(data.images.device(), || evaluate_here(spec, weights, data))
}

fn evaluate_here(
    spec: ClassifierSpec,
    weights: &[f32],
    data: &DeviceData,
) -> Result<LocalMetrics, TrainError> {
    let net = Network::from_flat(spec, weights, data.images.device())?;
    let mut loss = 0.0f64;
    let mut correct = 0u64;
    let all: Vec<u32> = (0..data.len as u32).collect();
    for chunk in all.chunks(1000) {
        let (x, y) = data.batch(chunk)?;
        let logits = net.forward(&x)?;
        loss += f64::from(candle_nn::loss::cross_entropy(&logits, &y)?.to_scalar::<f32>()?)
            * chunk.len() as f64;
        correct += correct_predictions(&logits, &y)?;
    }
    Ok(LocalMetrics {
        loss: (loss / data.len as f64) as f32,
        accuracy: correct as f32 / data.len as f32,
    })
}

/// Trains on one client's data with candle.
pub struct CandleTrainer {
    data: DeviceData,
    holdout: Option<DeviceData>,
    progress: bool,
}

impl CandleTrainer {
    pub fn new(view: &DataView, device: &Device) -> Result<Self, TrainError> {
        Ok(Self {
            data: DeviceData::new(view, device)?,
            holdout: None,
            progress: false,
        })
    }

    /// Held-out data for federated evaluation; it never trains.
    pub fn with_holdout(mut self, view: &DataView) -> Result<Self, TrainError> {
        let device = self.data.images.device().clone();
        self.holdout = Some(DeviceData::new(view, &device)?);
        Ok(self)
    }

    /// Shows an indicatif bar on a terminal, plain log lines otherwise.
    pub fn with_progress(mut self, on: bool) -> Self {
        self.progress = on;
        self
    }
}

impl Trainer for CandleTrainer {
    fn evaluate(
        &mut self,
        spec: ModelSpec,
        weights: &[f32],
    ) -> Result<Option<(LocalMetrics, u64)>, TrainError> {
        match &self.holdout {
            Some(data) => Ok(Some((evaluate(&spec, weights, data)?, data.len() as u64))),
            None => Ok(None),
        }
    }

    fn train(&mut self, task: &Task, global: &[f32]) -> Result<TrainOutput, TrainError> {
        let device = self.data.images.device().clone();
        on_device_pool(&device, || self.train_here(task, global))
    }
}

impl CandleTrainer {
    fn train_here(&mut self, task: &Task, global: &[f32]) -> Result<TrainOutput, TrainError> {
        let spec = classifier(&task.spec)?;
        if spec.input.features() != self.data.features() {
            return Err(TrainError::InputMismatch {
                spec: spec.input.features(),
                data: self.data.features(),
            });
        }
        let device = self.data.images.device().clone();
        let net = Network::from_flat(spec, global, &device)?;
        // A deep copy: `detach` alone shares storage with the variables,
        // which SGD updates in place.
        let anchor: Vec<Tensor> = if task.hyper.proximal_mu > 0.0 {
            net.vars()
                .iter()
                .map(|v| v.as_tensor().copy().map(|t| t.detach()))
                .collect::<candle_core::Result<_>>()?
        } else {
            Vec::new()
        };
        let mut sgd = optimizer(
            task.hyper.optimizer,
            net.vars().to_vec(),
            f64::from(task.hyper.learning_rate),
        );
        let mut rng = ChaCha8Rng::seed_from_u64(task.seed);
        let batch = task.hyper.batch_size.max(1) as usize;
        let mut order: Vec<u32> = (0..self.data.len as u32).collect();
        let epochs = task.hyper.epochs;
        let steps = u64::from(epochs) * order.len().div_ceil(batch) as u64;
        let bar = self
            .progress
            .then(|| progress::bar(steps, progress::BATCHES, format!("round {}", task.round.0)))
            .flatten();
        let mut metrics = LocalMetrics::default();
        for epoch in 0..epochs {
            order.shuffle(&mut rng);
            let (mut loss_sum, mut correct, mut seen) = (0.0f64, 0u64, 0usize);
            for chunk in order.chunks(batch) {
                let (x, y) = self.data.batch(chunk)?;
                let logits = net.forward(&x)?;
                let mut loss = candle_nn::loss::cross_entropy(&logits, &y)?;
                if !anchor.is_empty() {
                    let mut prox = Tensor::zeros((), DType::F32, &device)?;
                    for (v, a) in net.vars().iter().zip(&anchor) {
                        prox = (prox + (v.as_tensor() - a)?.sqr()?.sum_all()?)?;
                    }
                    loss = (loss + (prox * f64::from(task.hyper.proximal_mu / 2.0))?)?;
                }
                sgd.backward_step(&loss)?;
                if epoch + 1 == epochs {
                    let l = loss.to_scalar::<f32>()?;
                    if !l.is_finite() {
                        return Err(TrainError::Diverged);
                    }
                    loss_sum += f64::from(l) * chunk.len() as f64;
                    correct += correct_predictions(&logits, &y)?;
                    seen += chunk.len();
                }
                if let Some(bar) = &bar {
                    bar.inc(1);
                }
            }
            if epoch + 1 == epochs && seen > 0 {
                metrics = LocalMetrics {
                    loss: (loss_sum / seen as f64) as f32,
                    accuracy: correct as f32 / seen as f32,
                };
            }
            if self.progress && bar.is_none() {
                tracing::info!(
                    round = task.round.0,
                    epoch = epoch + 1,
                    epochs,
                    "local epoch done"
                );
            }
        }
        if let Some(bar) = bar {
            bar.finish_and_clear();
        }
        let mut delta = net.flat()?;
        for (d, g) in delta.iter_mut().zip(global) {
            *d -= g;
        }
        if delta.iter().any(|v| !v.is_finite()) {
            return Err(TrainError::Diverged);
        }
        Ok(TrainOutput {
            delta,
            num_examples: self.data.len as u64,
            metrics,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::Mnist;
    use covey_protocol::{ModelVersion, RoundId, UpdateEncoding, message::Hyperparameters};
    use std::sync::Arc;

    /// Two separable classes: bright top half versus bright bottom half.
    fn toy(n: usize) -> DataView {
        let mut pixels = Vec::new();
        let mut labels = Vec::new();
        for i in 0..n {
            let label = (i % 2) as u8;
            for p in 0..784 {
                let top = p < 392;
                let on = (label == 0) == top;
                pixels.push(if on {
                    200 + (i % 50) as u8
                } else {
                    (i % 30) as u8
                });
            }
            labels.push(label);
        }
        DataView::all(Arc::new(Mnist {
            rows: 28,
            cols: 28,
            pixels,
            labels,
        }))
    }

    fn task(arch: Architecture, lr: f32, epochs: u32) -> Task {
        Task {
            round: RoundId(1),
            base_version: ModelVersion(0),
            spec: ModelSpec::mnist(arch),
            hyper: Hyperparameters {
                epochs,
                batch_size: 10,
                learning_rate: lr,
                proximal_mu: 0.0,
                optimizer: Default::default(),
            },
            update_encoding: UpdateEncoding::F32,
            chunk_len: 1024,
            deadline_ms: 60_000,
            seed: 1,
            privacy: covey_protocol::message::UpdatePrivacy::Plain,
            secure_aggregation: None,
            config: Default::default(),
        }
    }

    #[test]
    fn the_cpu_cnn_matches_the_portable_one_in_logits_and_gradients() {
        let spec = ClassifierSpec::mnist(Architecture::Cnn);
        let net = Network::from_flat(spec, &spec.initial_weights(3), &Device::Cpu).unwrap();
        let view = toy(12);
        let data = DeviceData::new(&view, &Device::Cpu).unwrap();
        let (x, y) = data.batch(&(0..12).collect::<Vec<u32>>()).unwrap();
        let fast = net.cnn_cpu(&x).unwrap();
        let portable = net.cnn_portable(&x).unwrap();
        use crate::conv::tests::{max_abs, max_gap as gap};
        assert!(
            gap(&fast, &portable) < 1e-4,
            "logits differ by {}",
            gap(&fast, &portable)
        );
        let grads = |logits: &Tensor| {
            candle_nn::loss::cross_entropy(logits, &y)
                .unwrap()
                .backward()
                .unwrap()
        };
        let (a, b) = (grads(&fast), grads(&portable));
        for (i, var) in net.vars().iter().enumerate() {
            let (ga, gb) = (a.get(var).unwrap(), b.get(var).unwrap());
            let scale = max_abs(gb);
            assert!(
                gap(ga, gb) <= 1e-4 * scale.max(1e-3),
                "tensor {i}: {} of {scale}",
                gap(ga, gb)
            );
        }
    }

    #[test]
    fn every_architecture_learns_a_separable_task() {
        let view = toy(200);
        let data = DeviceData::new(&view, &Device::Cpu).unwrap();
        for arch in [
            Architecture::LogReg,
            Architecture::Mlp2nn,
            Architecture::Cnn,
        ] {
            let t = task(arch, 0.05, 2);
            let global = t.spec.initial_weights(0);
            let before = evaluate(&t.spec, &global, &data).unwrap();
            let mut trainer = CandleTrainer::new(&view, &Device::Cpu).unwrap();
            let out = trainer.train(&t, &global).unwrap();
            assert_eq!(out.delta.len(), t.spec.param_count());
            assert_eq!(out.num_examples, 200);
            let trained: Vec<f32> = global.iter().zip(&out.delta).map(|(g, d)| g + d).collect();
            let after = evaluate(&t.spec, &trained, &data).unwrap();
            assert!(
                after.loss < before.loss,
                "{arch}: loss {} -> {}",
                before.loss,
                after.loss
            );
            assert!(after.accuracy > 0.95, "{arch}: accuracy {}", after.accuracy);
        }
    }

    #[test]
    fn zero_learning_rate_gives_a_zero_update_and_training_is_seeded() {
        let view = toy(40);
        let mut trainer = CandleTrainer::new(&view, &Device::Cpu).unwrap();
        let t = task(Architecture::LogReg, 0.0, 1);
        let global = t.spec.initial_weights(0);
        assert!(
            trainer
                .train(&t, &global)
                .unwrap()
                .delta
                .iter()
                .all(|&d| d == 0.0)
        );
        let t = task(Architecture::LogReg, 0.1, 1);
        let a = trainer.train(&t, &global).unwrap();
        let b = trainer.train(&t, &global).unwrap();
        assert_eq!(a, b);
    }

    #[test]
    fn the_proximal_term_pulls_towards_the_global_model() {
        let view = toy(100);
        let mut trainer = CandleTrainer::new(&view, &Device::Cpu).unwrap();
        let mut t = task(Architecture::LogReg, 0.1, 3);
        let global = t.spec.initial_weights(0);
        let free = trainer.train(&t, &global).unwrap();
        t.hyper.proximal_mu = 5.0;
        let prox = trainer.train(&t, &global).unwrap();
        let norm = |d: &[f32]| d.iter().map(|v| v * v).sum::<f32>().sqrt();
        assert!(norm(&prox.delta) < norm(&free.delta));
    }

    #[test]
    fn held_out_evaluation_reports_metrics_and_counts_only_with_data() {
        let view = toy(60);
        let spec = ModelSpec::mnist(Architecture::LogReg);
        let weights = spec.initial_weights(0);
        let mut bare = CandleTrainer::new(&view, &Device::Cpu).unwrap();
        assert_eq!(bare.evaluate(spec.clone(), &weights).unwrap(), None);
        let holdout = toy(30);
        let mut trainer = CandleTrainer::new(&view, &Device::Cpu)
            .unwrap()
            .with_holdout(&holdout)
            .unwrap();
        let (metrics, n) = trainer.evaluate(spec.clone(), &weights).unwrap().unwrap();
        assert_eq!(n, 30);
        let direct = evaluate(
            &spec,
            &weights,
            &DeviceData::new(&holdout, &Device::Cpu).unwrap(),
        )
        .unwrap();
        assert_eq!(metrics, direct);
    }

    /// Built with `cuda`, on a machine with a GPU: the same weights and data
    /// give the same logits, gradients and trained update on the GPU (candle's
    /// ops) as on the CPU (the fused ops), within float tolerance.
    /// `cargo test -p covey-client --features cuda cuda_`
    #[cfg(feature = "cuda")]
    #[test]
    fn cuda_matches_the_cpu_on_fixed_inputs() {
        let gpu = Device::new_cuda(0).expect("built with cuda: this test needs a GPU");
        let view = toy(100);
        for arch in [Architecture::Mlp2nn, Architecture::Cnn] {
            let spec = ClassifierSpec::mnist(arch);
            let weights = spec.initial_weights(5);
            let mut logits = Vec::new();
            let mut grads = Vec::new();
            for device in [&Device::Cpu, &gpu] {
                let net = Network::from_flat(spec, &weights, device).unwrap();
                let data = DeviceData::new(&view, device).unwrap();
                let (x, y) = data.batch(&(0..32).collect::<Vec<u32>>()).unwrap();
                let out = net.forward(&x).unwrap();
                let g = candle_nn::loss::cross_entropy(&out, &y)
                    .unwrap()
                    .backward()
                    .unwrap();
                logits.push(out.to_device(&Device::Cpu).unwrap());
                grads.push(
                    net.vars()
                        .iter()
                        .map(|v| g.get(v).unwrap().to_device(&Device::Cpu).unwrap())
                        .collect::<Vec<_>>(),
                );
            }
            use crate::conv::tests::{max_abs, max_gap as gap};
            assert!(gap(&logits[0], &logits[1]) < 1e-4, "{arch} logits");
            for (i, (a, b)) in grads[0].iter().zip(&grads[1]).enumerate() {
                let scale = max_abs(a).max(1e-3);
                assert!(gap(a, b) <= 1e-4 * scale, "{arch} gradient {i}");
            }
            // A whole local epoch (10 SGD steps): rounding differences grow,
            // but stay far below the update itself.
            let t = task(arch, 0.05, 1);
            let cpu = CandleTrainer::new(&view, &Device::Cpu)
                .unwrap()
                .train(&t, &weights)
                .unwrap();
            let cuda = CandleTrainer::new(&view, &gpu)
                .unwrap()
                .train(&t, &weights)
                .unwrap();
            let largest = cpu.delta.iter().fold(0f32, |m, d| m.max(d.abs()));
            let worst = cpu
                .delta
                .iter()
                .zip(&cuda.delta)
                .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
            assert!(worst <= 1e-3 * largest, "{arch}: {worst} of {largest}");
            assert!((cpu.metrics.loss - cuda.metrics.loss).abs() < 1e-3);
        }
    }

    #[test]
    fn wrong_weights_and_devices_are_named() {
        let spec = ClassifierSpec::mnist(Architecture::LogReg);
        let err = Network::from_flat(spec, &[0.0; 3], &Device::Cpu)
            .err()
            .unwrap();
        assert_eq!(
            err.to_string(),
            "global model has 3 values, the logreg spec needs 7850"
        );
        assert!(matches!(
            select_device("tpu"),
            Err(TrainError::BadDevice(_))
        ));
        assert!(matches!(select_device("cpu"), Ok(Device::Cpu)));
    }
}
