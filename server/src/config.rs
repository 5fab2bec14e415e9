//! The operator's config file: TOML, every setting documented in the file
//! `init` writes.

use std::{net::SocketAddr, num::NonZeroUsize, path::Path, time::Duration};

use covey_privacy::{
    ClipNorm,
    accountant::{Delta, Epsilon, NoiseMultiplier, SamplingRate, smallest_noise},
    distributed::{DistributedPlan, noiseless_quantizer},
    quantize::Quantizer,
};
use covey_protocol::{
    ModelVersion, UpdateEncoding,
    buffered::BufferConfig,
    message::{ConfigValue, FitConfig},
    message::{Hyperparameters, LocalOptimizer},
    model::{Architecture, ExternalSpec, LanguageSpec, ModelSpec, TensorSpec},
    round::{RoundConfig, Selection},
    secagg::{SecAggParams, Threshold},
};
use serde::{Deserialize, Serialize};

use crate::{
    fold::aggregate::OptimizerKind,
    fold::robust::Aggregator,
    rounds::compliance::{MinCohort, Retention},
    rounds::decay::Decay,
    rounds::dp::{AccountantKind, AdaptiveClip, DpMode, DpSettings, PrivacyLedger},
    state::sealing::KekSource,
};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerConfig {
    pub server: Network,
    pub model: Model,
    pub rounds: Rounds,
    pub training: Training,
    pub aggregation: Aggregation,
    #[serde(default)]
    pub evaluation: Evaluation,
    #[serde(default)]
    pub privacy: Privacy,
    #[serde(default)]
    pub secure_aggregation: SecureAggregation,
    #[serde(default)]
    pub compliance: Compliance,
    #[serde(default)]
    pub storage: Storage,
    #[serde(default)]
    pub metrics: MetricsEndpoint,
    #[serde(default)]
    pub dashboard: DashboardConfig,
    /// Passed as-is to devices' own training code in every task.
    #[serde(default, skip_serializing_if = "toml::Table::is_empty")]
    pub fit_config: toml::Table,
}

/// Where Prometheus scrapes the server; off unless an address is given.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsEndpoint {
    /// TCP address serving `GET /metrics` (OpenMetrics text).
    pub listen: Option<SocketAddr>,
}

/// The web dashboard (`server/src/dashboard`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DashboardConfig {
    pub enabled: bool,
    /// A loopback address serves HTTP, with the auditor's view for anyone
    /// on this host; any other address serves HTTPS and needs a login.
    /// Port 0 picks a free port; the port is logged and the URL written to
    /// `dashboard.url` in the state directory.
    pub listen: SocketAddr,
    /// HTTPS off loopback uses the server's own certificate (named
    /// `covey-server`, issued by the federation's CA) unless these name a
    /// PEM certificate chain and key for the host's real name.
    pub certificate: Option<std::path::PathBuf>,
    pub key: Option<std::path::PathBuf>,
}

impl Default for DashboardConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            certificate: None,
            key: None,
        }
    }
}

/// Where the database's key-encryption key comes from.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Storage {
    /// `file:PATH` (relative to the state directory) or `env:VARIABLE`.
    pub kek: String,
}

impl Default for Storage {
    fn default() -> Self {
        Self {
            kek: "file:kek.key".into(),
        }
    }
}

impl Storage {
    pub fn kek_source(&self) -> Result<KekSource, ConfigError> {
        KekSource::parse(&self.kek).map_err(|e| invalid("storage.kek", e))
    }
}

/// What an auditor holds the server to.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Compliance {
    /// k: the fewest participants any released aggregate may come from.
    pub min_cohort: usize,
    /// Days round records are kept after they end; 0 keeps them forever.
    pub keep_rounds_days: f64,
    /// Newest model versions kept; 0 keeps all.
    pub keep_versions: usize,
}

impl Default for Compliance {
    fn default() -> Self {
        Self {
            min_cohort: 2,
            keep_rounds_days: 0.0,
            keep_versions: 0,
        }
    }
}

impl Compliance {
    pub fn retention(&self) -> Result<Retention, ConfigError> {
        let days = self.keep_rounds_days;
        if !(days.is_finite() && (0.0..=36_500.0).contains(&days)) {
            return Err(invalid(
                "compliance.keep_rounds_days",
                format!("must be between 0 (forever) and 36500, got {days}"),
            ));
        }
        Ok(Retention {
            rounds: (days > 0.0).then(|| Duration::from_secs_f64(days * 86_400.0)),
            versions: NonZeroUsize::new(self.keep_versions),
        })
    }
}

/// Every key is optional, so configs written before a key existed still load.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SecureAggregation {
    pub enabled: bool,
    pub neighbors: u32,
    pub threshold: f64,
    pub phase_timeout_secs: f64,
    /// Without DP: the L2 clip every update gets so the sum fits the ring.
    pub clip: f64,
    /// Without DP: the ring's bits. With distributed DP, `[privacy] bits`.
    pub bits: u32,
}

impl Default for SecureAggregation {
    fn default() -> Self {
        Self {
            enabled: false,
            neighbors: 10,
            threshold: 0.6,
            phase_timeout_secs: 30.0,
            clip: 10.0,
            bits: 20,
        }
    }
}

/// Secure aggregation's settings, checked.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SecAggSettings {
    pub params: SecAggParams,
    /// How long the key phases and the unmask phase wait for stragglers.
    pub phase_timeout: Duration,
    /// Without DP: the clip and quantizer of the masked updates (with
    /// distributed DP, the privacy plan's).
    pub noiseless: Option<(ClipNorm, Quantizer)>,
}

impl SecureAggregation {
    fn settings(
        &self,
        dp: Option<&DpSettings>,
        spec: &ModelSpec,
        rounds: &Rounds,
    ) -> Result<Option<SecAggSettings>, ConfigError> {
        if !self.enabled {
            return Ok(None);
        }
        let noiseless = match dp.map(|d| d.mode) {
            Some(DpMode::Distributed(plan)) => {
                if plan.quantizer.bits != self.bits {
                    return Err(invalid(
                        "secure_aggregation.bits",
                        format!(
                            "with distributed DP the ring is [privacy] bits ({}); set both to the same value",
                            plan.quantizer.bits
                        ),
                    ));
                }
                None
            }
            Some(DpMode::Central { .. }) => {
                return Err(invalid(
                    "secure_aggregation.enabled",
                    "central DP needs the server to see the sum before noising it; use [privacy] mode = \"distributed\" or \"off\" with secure aggregation",
                ));
            }
            None => {
                let clip = ClipNorm::new(self.clip)
                    .map_err(|e| invalid("secure_aggregation.clip", e.to_string()))?;
                let cohort =
                    (rounds.clients_per_round as f64 * (1.0 + rounds.over_selection)).ceil() as u64;
                let quantizer = noiseless_quantizer(
                    spec.param_count() as u64,
                    clip,
                    cohort.max(1),
                    self.bits,
                    rotation_seed(rounds),
                )
                .map_err(|e| invalid("secure_aggregation.bits", e.to_string()))?;
                Some((clip, quantizer))
            }
        };
        let threshold = if self.threshold > 0.5 && self.threshold <= 1.0 {
            Threshold::Fraction(self.threshold)
        } else if self.threshold >= 2.0 && self.threshold.fract() == 0.0 && self.threshold < 1e6 {
            Threshold::Count(self.threshold as u32)
        } else {
            return Err(invalid(
                "secure_aggregation.threshold",
                format!(
                    "must be a fraction of the neighbours in (0.5, 1] or a whole count of at least 2, got {}",
                    self.threshold
                ),
            ));
        };
        let params = SecAggParams {
            neighbors: self.neighbors,
            threshold,
        };
        params
            .validate()
            .map_err(|e| invalid("secure_aggregation.threshold", e))?;
        if !(self.phase_timeout_secs.is_finite() && self.phase_timeout_secs > 0.0) {
            return Err(invalid(
                "secure_aggregation.phase_timeout_secs",
                "must be a positive number",
            ));
        }
        Ok(Some(SecAggSettings {
            params,
            phase_timeout: Duration::from_secs_f64(self.phase_timeout_secs),
            noiseless,
        }))
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Network {
    pub listen: SocketAddr,
    pub public_addr: String,
    pub max_frame_bytes: usize,
    pub max_concurrent_uploads: usize,
    pub idle_timeout_secs: u64,
    pub keep_alive_secs: u64,
    #[serde(default = "Network::default_max_connections")]
    pub max_connections: usize,
    #[serde(default = "Network::default_max_connections_per_client")]
    pub max_connections_per_client: usize,
    #[serde(default = "Network::default_client_requests_per_sec")]
    pub client_requests_per_sec: f64,
    #[serde(default = "Network::default_client_request_burst")]
    pub client_request_burst: u32,
    #[serde(default = "Network::default_max_model_bytes")]
    pub max_model_bytes: u64,
    #[serde(default = "Network::default_transfer_timeout_secs")]
    pub transfer_timeout_secs: f64,
}

impl Network {
    fn default_max_connections() -> usize {
        4096
    }
    fn default_max_connections_per_client() -> usize {
        4
    }
    fn default_client_requests_per_sec() -> f64 {
        20.0
    }
    fn default_client_request_burst() -> u32 {
        100
    }
    fn default_max_model_bytes() -> u64 {
        1 << 30
    }
    fn default_transfer_timeout_secs() -> f64 {
        300.0
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Model {
    /// The family: logreg, 2nn, cnn, gpt2 or llama.
    pub architecture: String,
    pub init_seed: u64,
    /// A language model's spec as `init` built it (family configuration,
    /// tokenizer, context, LoRA and the frozen base's hash), as JSON.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub language: String,
    /// Where version 0 came from: a built-in name, `hf:DIR` or the model
    /// file of an external model.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub source: String,
    /// An external model's tensors (names and shapes, in the devices'
    /// order) as `init` read them from `--model-file`, as JSON.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub tensors: String,
}

/// One tensor of an external model as config.toml lists it.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct ListedTensor {
    name: String,
    shape: Vec<usize>,
}

impl Model {
    /// Writes `spec`'s tensors into [`Self::tensors`].
    pub fn set_external(&mut self, spec: &ExternalSpec) -> Result<(), serde_json::Error> {
        let listed: Vec<ListedTensor> = spec
            .tensors
            .iter()
            .map(|t| ListedTensor {
                name: t.name.clone(),
                shape: t.shape.clone(),
            })
            .collect();
        self.tensors = serde_json::to_string(&listed)?;
        Ok(())
    }

    /// The language-model or external-model lines of config.toml, empty for
    /// a classifier.
    fn documented_language(&self) -> String {
        if !self.tensors.is_empty() {
            return format!(
                "# Where version 0 came from: the model file `init --model-file` read.\n\
                 source = {}\n\
                 # The external model's tensors, names and shapes in the order devices' get_parameters\n\
                 # lists them. Devices train it in their own code (the Python package); the server\n\
                 # refuses to start if it differs from the database's.\n\
                 tensors = {}\n",
                toml::Value::String(self.source.clone()),
                toml::Value::String(self.tensors.clone()),
            );
        }
        if self.language.is_empty() {
            return String::new();
        }
        format!(
            "# Where version 0 came from: a built-in model or hf:DIR, a Hugging Face checkpoint.\n\
             source = {}\n\
             # The language model `init` built: the family's configuration, the tokenizer, tokens\n\
             # per sequence, and full or LoRA tuning with the frozen base's SHA-256. Devices build\n\
             # exactly this model; the server refuses to start if it differs from the database's.\n\
             language = {}\n",
            toml::Value::String(self.source.clone()),
            toml::Value::String(self.language.clone()),
        )
    }

    /// The model these settings name.
    pub fn spec(&self) -> Result<ModelSpec, ConfigError> {
        if self.architecture != "external" && !self.tensors.is_empty() {
            return Err(invalid(
                "model.tensors",
                format!("the {} model takes no tensor list", self.architecture),
            ));
        }
        match self.architecture.as_str() {
            "external" => {
                if self.tensors.is_empty() || !self.language.is_empty() {
                    return Err(invalid(
                        "model.tensors",
                        "an external model needs its tensor list and no language spec; `covey-server init --model-file` writes it",
                    ));
                }
                let listed: Vec<ListedTensor> = serde_json::from_str(&self.tensors)
                    .map_err(|e| invalid("model.tensors", e.to_string()))?;
                let tensors = listed
                    .into_iter()
                    .map(|t| TensorSpec {
                        name: t.name,
                        shape: t.shape,
                    })
                    .collect();
                let spec = ExternalSpec::new(tensors)
                    .map_err(|e| invalid("model.tensors", e.to_string()))?;
                Ok(ModelSpec::External(spec))
            }
            "gpt2" | "llama" => {
                if self.language.is_empty() {
                    return Err(invalid(
                        "model.language",
                        format!(
                            "a {} model needs its spec; `covey-server init` writes it",
                            self.architecture
                        ),
                    ));
                }
                let spec: LanguageSpec = serde_json::from_str(&self.language)
                    .map_err(|e| invalid("model.language", e.to_string()))?;
                let family = spec.arch.family().name();
                if family != self.architecture {
                    return Err(invalid(
                        "model.architecture",
                        format!(
                            "'{}' but model.language holds a {family} model",
                            self.architecture
                        ),
                    ));
                }
                spec.validate()
                    .map_err(|e| invalid("model.language", e.to_string()))?;
                Ok(ModelSpec::Language(Box::new(spec)))
            }
            name => {
                let architecture: Architecture = name.parse().map_err(|e: String| {
                    invalid(
                        "model.architecture",
                        format!("{e}, gpt2, llama or external"),
                    )
                })?;
                if !self.language.is_empty() {
                    return Err(invalid(
                        "model.language",
                        format!("the {architecture} classifier takes no language spec"),
                    ));
                }
                Ok(ModelSpec::mnist(architecture))
            }
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rounds {
    pub rounds: u64,
    pub min_clients: usize,
    pub clients_per_round: usize,
    pub over_selection: f64,
    pub quorum: usize,
    pub round_timeout_secs: f64,
    pub selection_seed: u64,
    #[serde(default = "Rounds::default_rejoin_grace_secs")]
    pub rejoin_grace_secs: f64,
    /// `sync` (rounds) or `fedbuff` (asynchronous buffered aggregation).
    #[serde(default = "Rounds::default_mode")]
    pub mode: String,
    /// FedBuff: clients training at once; 0 means twice clients_per_round.
    #[serde(default)]
    pub concurrency: usize,
    /// FedBuff: updates whose base is more versions old are refused.
    #[serde(default = "Rounds::default_max_staleness")]
    pub max_staleness: u64,
}

impl Rounds {
    fn default_rejoin_grace_secs() -> f64 {
        10.0
    }
    fn default_mode() -> String {
        "sync".into()
    }
    fn default_max_staleness() -> u64 {
        4
    }

    pub fn is_fedbuff(&self) -> bool {
        self.mode == "fedbuff"
    }

    /// FedBuff's buffer, or `None` in synchronous mode.
    fn buffer(&self) -> Result<Option<BufferConfig>, ConfigError> {
        match self.mode.as_str() {
            "sync" => Ok(None),
            "fedbuff" => {
                let size = self.clients_per_round;
                let config = BufferConfig {
                    size,
                    concurrency: if self.concurrency == 0 {
                        2 * size
                    } else {
                        self.concurrency
                    },
                    max_staleness: self.max_staleness,
                    task_timeout: Duration::from_secs_f64(self.round_timeout_secs),
                    rejoin_grace: Duration::from_secs_f64(self.rejoin_grace_secs),
                    target_version: ModelVersion(self.rounds),
                };
                config
                    .validate()
                    .map_err(|e| invalid("rounds.concurrency", e.to_string()))?;
                Ok(Some(config))
            }
            other => Err(invalid(
                "rounds.mode",
                format!("unknown mode '{other}': expected sync or fedbuff"),
            )),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Training {
    pub epochs: u32,
    pub batch_size: u32,
    pub learning_rate: f32,
    pub proximal_mu: f32,
    pub update_encoding: String,
    pub chunk_len: u32,
    /// sgd, adam or adamw:DECAY.
    #[serde(default = "Training::default_local_optimizer")]
    pub local_optimizer: String,
    /// none, step:EVERY:FACTOR or cosine:FLOOR (`rounds::decay`).
    #[serde(default = "Training::default_learning_rate_decay")]
    pub learning_rate_decay: String,
}

impl Training {
    fn default_local_optimizer() -> String {
        "sgd".into()
    }

    fn default_learning_rate_decay() -> String {
        "none".into()
    }

    /// The devices' optimizer, from `local_optimizer`.
    pub fn local_optimizer(&self) -> Result<LocalOptimizer, ConfigError> {
        match self.local_optimizer.as_str() {
            "sgd" => Ok(LocalOptimizer::Sgd),
            "adam" => Ok(LocalOptimizer::ADAM),
            other => match other.strip_prefix("adamw:").map(str::parse::<f32>) {
                Some(Ok(decay)) if decay.is_finite() && decay >= 0.0 => {
                    let LocalOptimizer::Adam {
                        beta1,
                        beta2,
                        epsilon,
                        ..
                    } = LocalOptimizer::ADAM
                    else {
                        return Ok(LocalOptimizer::ADAM);
                    };
                    Ok(LocalOptimizer::Adam {
                        beta1,
                        beta2,
                        epsilon,
                        weight_decay: decay,
                    })
                }
                _ => Err(invalid(
                    "training.local_optimizer",
                    format!(
                        "'{other}': expected sgd, adam or adamw:DECAY (a weight decay of 0 or more)"
                    ),
                )),
            },
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Aggregation {
    #[serde(default = "default_aggregator")]
    pub aggregator: String,
    pub optimizer: String,
    pub server_learning_rate: f32,
    pub momentum: f32,
    pub beta1: f32,
    pub beta2: f32,
    pub tau: f32,
}

fn default_aggregator() -> String {
    "mean".into()
}

impl Aggregation {
    /// The server optimizer these settings name, checked.
    pub fn optimizer(&self) -> Result<OptimizerKind, String> {
        let a = self;
        let unit = |name: &str, v: f32| {
            if (0.0..1.0).contains(&v) {
                Ok(v)
            } else {
                Err(format!("{name} must be in [0, 1), got {v}"))
            }
        };
        if !(a.server_learning_rate.is_finite() && a.server_learning_rate > 0.0) {
            return Err(format!(
                "server_learning_rate must be positive, got {}",
                a.server_learning_rate
            ));
        }
        if !(a.tau.is_finite() && a.tau > 0.0) {
            return Err(format!("tau must be positive, got {}", a.tau));
        }
        let lr = a.server_learning_rate;
        Ok(match a.optimizer.as_str() {
            "fedavg" => OptimizerKind::FedAvg { lr },
            "fedavgm" => OptimizerKind::FedAvgM {
                lr,
                momentum: unit("momentum", a.momentum)?,
            },
            "fedadam" => OptimizerKind::FedAdam {
                lr,
                beta1: unit("beta1", a.beta1)?,
                beta2: unit("beta2", a.beta2)?,
                tau: a.tau,
            },
            "fedyogi" => OptimizerKind::FedYogi {
                lr,
                beta1: unit("beta1", a.beta1)?,
                beta2: unit("beta2", a.beta2)?,
                tau: a.tau,
            },
            other => {
                return Err(format!(
                    "unknown optimizer '{other}': expected fedavg, fedavgm, fedadam or fedyogi"
                ));
            }
        })
    }
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Evaluation {
    pub test_data: String,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Privacy {
    pub mode: String,
    pub clip: f64,
    pub adaptive_clip: bool,
    pub target_quantile: f64,
    pub clip_learning_rate: f64,
    pub clip_count_noise: f64,
    pub noise_multiplier: f64,
    pub population: u64,
    pub target_epsilon: f64,
    pub delta: f64,
    pub bits: u32,
    /// rdp or pld; configs written before it existed mean rdp.
    #[serde(default = "default_accountant")]
    pub accountant: String,
}

fn default_accountant() -> String {
    "rdp".into()
}

impl Default for Privacy {
    fn default() -> Self {
        Self {
            mode: "off".into(),
            clip: 1.0,
            adaptive_clip: false,
            target_quantile: 0.5,
            clip_learning_rate: 0.2,
            clip_count_noise: 0.0,
            noise_multiplier: 1.0,
            population: 0,
            target_epsilon: 8.0,
            delta: 1e-5,
            bits: 20,
            accountant: default_accountant(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("config {path} is not valid: {source}")]
    Parse {
        path: String,
        source: Box<toml::de::Error>,
    },
    #[error("config setting {setting}: {problem}")]
    Invalid {
        setting: &'static str,
        problem: String,
    },
}

/// The quantizer's Hadamard rotation seed. The rotation is public: it
/// spreads norm, it hides nothing.
fn rotation_seed(rounds: &Rounds) -> u64 {
    rounds.selection_seed ^ 0x0005_eed0_f4ad_4a3d
}

fn invalid(setting: &'static str, problem: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        setting,
        problem: problem.into(),
    }
}

impl Privacy {
    /// Refuses a budget that not even one round fits: such a run would
    /// start, commit nothing and end at version 0. Says what a round costs
    /// and which noise multiplier would fit one.
    fn first_round_fits(
        &self,
        dp: &DpSettings,
        spec: &ModelSpec,
        rounds: &Rounds,
    ) -> Result<(), ConfigError> {
        let first = |dp: &DpSettings| PrivacyLedger::new(dp.initial_clip).epsilon_after_next(dp);
        let cost = first(dp);
        if cost <= dp.target_epsilon.get() {
            return Ok(());
        }
        let fits = smallest_noise(dp.target_epsilon, |z| {
            let mut other = self.clone();
            other.noise_multiplier = z.get();
            match other.settings(spec, rounds) {
                Ok(Some(d)) => first(&d),
                _ => f64::INFINITY,
            }
        });
        Err(invalid(
            "privacy.noise_multiplier",
            format!(
                "one round costs ε = {cost:.2}, over target_epsilon = {}, so no round could commit; {}",
                dp.target_epsilon.get(),
                match fits {
                    Some(z) => format!(
                        "noise_multiplier = {:.3} or more fits at least one round (now {})",
                        z.get(),
                        self.noise_multiplier
                    ),
                    None =>
                        "no noise multiplier up to 1000 fits one round: raise target_epsilon".into(),
                }
            ),
        ))
    }

    /// The typed DP settings, `None` when privacy is off.
    fn settings(
        &self,
        spec: &ModelSpec,
        rounds: &Rounds,
    ) -> Result<Option<DpSettings>, ConfigError> {
        let clients_per_round = rounds.clients_per_round;
        let distributed = match self.mode.as_str() {
            "off" => return Ok(None),
            "central" => false,
            "distributed" => true,
            other => {
                return Err(invalid(
                    "privacy.mode",
                    format!("unknown mode '{other}': expected off, central or distributed"),
                ));
            }
        };
        let clip = ClipNorm::new(self.clip).map_err(|e| invalid("privacy.clip", e.to_string()))?;
        let z = NoiseMultiplier::new(self.noise_multiplier)
            .map_err(|e| invalid("privacy.noise_multiplier", e.to_string()))?;
        if self.population < clients_per_round as u64 {
            return Err(invalid(
                "privacy.population",
                format!(
                    "the number of enrolled devices ({}) must be at least rounds.clients_per_round ({clients_per_round}); it sets the sampling rate",
                    self.population
                ),
            ));
        }
        // FedBuff picks whoever is free, not a Poisson sample: no
        // amplification by sampling is claimed (q = 1).
        let rate = if rounds.is_fedbuff() {
            1.0
        } else {
            clients_per_round as f64 / self.population as f64
        };
        let q =
            SamplingRate::new(rate).map_err(|e| invalid("privacy.population", e.to_string()))?;
        let delta = Delta::new(self.delta).map_err(|e| invalid("privacy.delta", e.to_string()))?;
        if !(self.target_epsilon.is_finite() && self.target_epsilon > 0.0) {
            return Err(invalid(
                "privacy.target_epsilon",
                format!("must be a positive number, got {}", self.target_epsilon),
            ));
        }
        let target = Epsilon::new(self.target_epsilon)
            .map_err(|e| invalid("privacy.target_epsilon", e.to_string()))?;
        let accountant = match self.accountant.as_str() {
            "rdp" => AccountantKind::Rdp,
            "pld" if distributed => {
                return Err(invalid(
                    "privacy.accountant",
                    "pld accounts the subsampled Gaussian of central DP; distributed DP's sum of discrete Gaussians is accounted by zCDP, so use rdp",
                ));
            }
            "pld" => AccountantKind::Pld,
            other => {
                return Err(invalid(
                    "privacy.accountant",
                    format!("unknown accountant '{other}': expected rdp or pld"),
                ));
            }
        };
        let expected_cohort = clients_per_round as f64;
        if distributed && self.adaptive_clip {
            return Err(invalid(
                "privacy.adaptive_clip",
                "adaptive clipping needs the count of clipped updates, which distributed DP does not reveal; use a fixed clip",
            ));
        }
        let adaptive = if self.adaptive_clip {
            // Andrew et al.'s σ_b = m/20, but at least z, so a small cohort
            // keeps most of the noise on the update (z_Δ ≤ 1.16·z).
            let count_noise = if self.clip_count_noise > 0.0 {
                self.clip_count_noise
            } else {
                (expected_cohort / 20.0).max(z.get())
            };
            Some(
                AdaptiveClip::new(
                    z,
                    self.target_quantile,
                    self.clip_learning_rate,
                    count_noise,
                )
                .map_err(|e| invalid("privacy", e))?,
            )
        } else {
            None
        };
        let mode = if distributed {
            let plan = DistributedPlan::new(
                spec.param_count() as u64,
                clip,
                z,
                rounds.quorum as u64,
                self.population,
                self.bits,
                rotation_seed(rounds),
            )
            .map_err(|e| invalid("privacy", e.to_string()))?;
            DpMode::Distributed(plan)
        } else {
            DpMode::Central { adaptive }
        };
        Ok(Some(DpSettings {
            mode,
            initial_clip: clip,
            noise_multiplier: z,
            sampling_rate: q,
            expected_cohort,
            delta,
            target_epsilon: target,
            accountant,
        }))
    }
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            server: Network {
                listen: SocketAddr::from(([127, 0, 0, 1], 7443)),
                public_addr: "127.0.0.1:7443".into(),
                max_frame_bytes: 4 << 20,
                max_concurrent_uploads: 8,
                idle_timeout_secs: 30,
                keep_alive_secs: 5,
                max_connections: Network::default_max_connections(),
                max_connections_per_client: Network::default_max_connections_per_client(),
                client_requests_per_sec: Network::default_client_requests_per_sec(),
                client_request_burst: Network::default_client_request_burst(),
                max_model_bytes: Network::default_max_model_bytes(),
                transfer_timeout_secs: Network::default_transfer_timeout_secs(),
            },
            model: Model {
                architecture: "2nn".into(),
                init_seed: 0,
                language: String::new(),
                source: String::new(),
                tensors: String::new(),
            },
            rounds: Rounds {
                rounds: 10,
                min_clients: 2,
                clients_per_round: 2,
                over_selection: 0.0,
                quorum: 2,
                round_timeout_secs: 600.0,
                selection_seed: 0,
                rejoin_grace_secs: Rounds::default_rejoin_grace_secs(),
                mode: Rounds::default_mode(),
                concurrency: 0,
                max_staleness: Rounds::default_max_staleness(),
            },
            training: Training {
                epochs: 1,
                batch_size: 10,
                learning_rate: 0.05,
                proximal_mu: 0.0,
                update_encoding: "f32".into(),
                local_optimizer: Training::default_local_optimizer(),
                learning_rate_decay: Training::default_learning_rate_decay(),
                chunk_len: 1 << 18,
            },
            aggregation: Aggregation {
                aggregator: default_aggregator(),
                optimizer: "fedavg".into(),
                server_learning_rate: 1.0,
                momentum: 0.9,
                beta1: 0.9,
                beta2: 0.99,
                tau: 1e-3,
            },
            evaluation: Evaluation::default(),
            privacy: Privacy::default(),
            secure_aggregation: SecureAggregation::default(),
            compliance: Compliance::default(),
            storage: Storage::default(),
            metrics: MetricsEndpoint::default(),
            dashboard: DashboardConfig::default(),
            fit_config: toml::Table::new(),
        }
    }
}

/// The settings, checked and typed, that the rest of the server uses.
#[derive(Clone, Debug)]
pub struct Settings {
    pub spec: ModelSpec,
    pub round: RoundConfig,
    /// The devices' settings with the first version's learning rate;
    /// private so every task goes through [`Settings::hyper_at`] and its
    /// decay.
    hyper: Hyperparameters,
    pub decay: Decay,
    pub encoding: UpdateEncoding,
    pub optimizer: OptimizerKind,
    pub aggregator: Aggregator,
    /// Differential privacy, when on.
    pub dp: Option<DpSettings>,
    /// Secure aggregation, when on (with distributed DP).
    pub secagg: Option<SecAggSettings>,
    /// FedBuff's buffer, in buffered mode.
    pub buffer: Option<BufferConfig>,
    pub min_cohort: MinCohort,
    pub retention: Retention,
    /// `[fit_config]`, for devices' own training code.
    pub fit_config: FitConfig,
}

impl Settings {
    /// What a device training from `base` is told: the learning rate after
    /// `training.learning_rate_decay`.
    pub fn hyper_at(&self, base: ModelVersion) -> Hyperparameters {
        Hyperparameters {
            learning_rate: self.decay.rate(self.hyper.learning_rate, base),
            ..self.hyper
        }
    }
}

impl ServerConfig {
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.display().to_string(),
            source,
        })?;
        let config: Self = toml::from_str(&text).map_err(|source| ConfigError::Parse {
            path: path.display().to_string(),
            source: Box::new(source),
        })?;
        config.settings()?;
        Ok(config)
    }

    /// Checks every setting and returns the typed form.
    pub fn settings(&self) -> Result<Settings, ConfigError> {
        let spec = self.model.spec()?;
        let encoding: UpdateEncoding = self
            .training
            .update_encoding
            .parse()
            .map_err(|e: String| invalid("training.update_encoding", e))?;
        let r = &self.rounds;
        if r.rounds == 0 {
            return Err(invalid("rounds.rounds", "must be at least 1"));
        }
        if !(r.rejoin_grace_secs.is_finite() && r.rejoin_grace_secs >= 0.0) {
            return Err(invalid(
                "rounds.rejoin_grace_secs",
                "must be zero (drop at once) or a positive number",
            ));
        }
        if !(r.round_timeout_secs.is_finite() && r.round_timeout_secs > 0.0) {
            return Err(invalid(
                "rounds.round_timeout_secs",
                "must be a positive number",
            ));
        }
        let model_bytes = spec.param_count() as u64 * 4;
        if model_bytes > self.server.max_model_bytes {
            return Err(invalid(
                "server.max_model_bytes",
                format!(
                    "the {spec} model is {model_bytes} bytes, over the limit of {}",
                    self.server.max_model_bytes
                ),
            ));
        }
        if matches!(spec, ModelSpec::External(_)) && !self.evaluation.test_data.is_empty() {
            return Err(invalid(
                "evaluation.test_data",
                "the server cannot run an external model to evaluate it centrally; devices evaluate it (federated evaluation through their `evaluate`)",
            ));
        }
        let dp = self.privacy.settings(&spec, r)?;
        if let Some(dp) = &dp {
            self.privacy.first_round_fits(dp, &spec, r)?;
        }
        let round = RoundConfig {
            min_clients: r.min_clients,
            clients_per_round: r.clients_per_round,
            over_selection: r.over_selection,
            quorum: r.quorum,
            round_timeout: Duration::from_secs_f64(r.round_timeout_secs),
            rejoin_grace: Duration::from_secs_f64(r.rejoin_grace_secs),
            target_version: ModelVersion(r.rounds),
            selection: match &dp {
                Some(dp) => Selection::Poisson {
                    rate: dp.sampling_rate.get(),
                },
                None => Selection::Fixed,
            },
        };
        round
            .validate()
            .map_err(|e| invalid("rounds", e.to_string()))?;
        let t = &self.training;
        if t.epochs == 0 || t.batch_size == 0 {
            return Err(invalid(
                "training",
                "epochs and batch_size must be at least 1",
            ));
        }
        if !(t.learning_rate.is_finite() && t.learning_rate >= 0.0) {
            return Err(invalid(
                "training.learning_rate",
                "must be finite and non-negative",
            ));
        }
        if !(t.proximal_mu.is_finite() && t.proximal_mu >= 0.0) {
            return Err(invalid(
                "training.proximal_mu",
                "must be finite and non-negative",
            ));
        }
        if t.chunk_len == 0 {
            return Err(invalid("training.chunk_len", "must be at least 1"));
        }
        let n = &self.server;
        let largest_chunk = 1 + 4 + UpdateEncoding::F32.encoded_len(t.chunk_len as usize);
        if n.max_frame_bytes < largest_chunk {
            return Err(invalid(
                "server.max_frame_bytes",
                format!(
                    "{} cannot hold a chunk of {} f32 values ({largest_chunk} bytes)",
                    n.max_frame_bytes, t.chunk_len
                ),
            ));
        }
        if n.max_concurrent_uploads == 0 {
            return Err(invalid(
                "server.max_concurrent_uploads",
                "must be at least 1",
            ));
        }
        if n.max_connections == 0 || n.max_connections_per_client == 0 {
            return Err(invalid(
                "server.max_connections",
                "max_connections and max_connections_per_client must be at least 1",
            ));
        }
        if !(n.client_requests_per_sec.is_finite() && n.client_requests_per_sec > 0.0)
            || n.client_request_burst == 0
        {
            return Err(invalid(
                "server.client_requests_per_sec",
                format!(
                    "the rate must be a positive number and the burst at least 1, got {} and {}",
                    n.client_requests_per_sec, n.client_request_burst
                ),
            ));
        }
        if !(n.transfer_timeout_secs.is_finite() && n.transfer_timeout_secs > 0.0) {
            return Err(invalid(
                "server.transfer_timeout_secs",
                format!("must be a positive number, got {}", n.transfer_timeout_secs),
            ));
        }
        if n.idle_timeout_secs == 0 || n.keep_alive_secs >= n.idle_timeout_secs {
            return Err(invalid(
                "server.keep_alive_secs",
                "must be below a non-zero idle_timeout_secs",
            ));
        }
        let optimizer = self
            .aggregation
            .optimizer()
            .map_err(|e| invalid("aggregation", e))?;
        let aggregator: Aggregator = self
            .aggregation
            .aggregator
            .parse()
            .map_err(|e: String| invalid("aggregation.aggregator", e))?;
        if self.secure_aggregation.enabled && aggregator != Aggregator::Mean {
            return Err(invalid(
                "aggregation.aggregator",
                format!(
                    "{aggregator} needs individual updates, which secure aggregation never shows the server; use mean (clipping and noise are the defence there)"
                ),
            ));
        }
        match (&dp, aggregator) {
            (_, Aggregator::Mean) => {}
            (Some(d), a) if matches!(d.mode, DpMode::Distributed(_)) => {
                return Err(invalid(
                    "aggregation.aggregator",
                    format!(
                        "{a} needs individual updates, which distributed DP never shows the server; use mean (clipping and noise are the defence there)"
                    ),
                ));
            }
            (Some(_), a) if !matches!(a, Aggregator::NormBound { .. }) => {
                return Err(invalid(
                    "aggregation.aggregator",
                    format!(
                        "under central DP only mean and norm-bound keep the sum's sensitivity at the clip, which the accountant relies on; {a} does not"
                    ),
                ));
            }
            _ => {}
        }
        let buffer = r.buffer()?;
        if buffer.is_some() {
            // FedBuff sees updates one at a time, against a moving model.
            let refusal = if self.secure_aggregation.enabled {
                Some("secure aggregation needs a fixed cohort per round")
            } else if dp
                .as_ref()
                .is_some_and(|d| matches!(d.mode, DpMode::Distributed(_)))
            {
                Some("distributed DP sizes each client's noise for a fixed cohort")
            } else if aggregator != Aggregator::Mean {
                Some(
                    "robust aggregators compare a round's updates, which FedBuff never holds together",
                )
            } else {
                None
            };
            if let Some(why) = refusal {
                return Err(invalid(
                    "rounds.mode",
                    format!("fedbuff cannot be combined with this config: {why}"),
                ));
            }
        }
        self.storage.kek_source()?;
        let min_cohort = MinCohort::new(self.compliance.min_cohort)
            .map_err(|e| invalid("compliance.min_cohort", e.to_string()))?;
        if r.quorum < min_cohort.get() {
            return Err(invalid(
                "rounds.quorum",
                format!(
                    "{} is below compliance.min_cohort ({min_cohort}): no round may release a model from fewer than k participants; raise the quorum or lower k",
                    r.quorum
                ),
            ));
        }
        if r.quorum < aggregator.min_updates() {
            return Err(invalid(
                "aggregation.aggregator",
                format!(
                    "{aggregator} needs at least {} updates per round; raise rounds.quorum (now {})",
                    aggregator.min_updates(),
                    r.quorum
                ),
            ));
        }
        Ok(Settings {
            round,
            hyper: Hyperparameters {
                epochs: t.epochs,
                batch_size: t.batch_size,
                learning_rate: t.learning_rate,
                proximal_mu: t.proximal_mu,
                optimizer: t.local_optimizer()?,
            },
            decay: Decay::parse(&t.learning_rate_decay, r.rounds)
                .map_err(|e| invalid("training.learning_rate_decay", e.to_string()))?,
            encoding,
            optimizer,
            aggregator,
            secagg: self.secure_aggregation.settings(dp.as_ref(), &spec, r)?,
            buffer,
            dp,
            min_cohort,
            retention: self.compliance.retention()?,
            fit_config: self.fit_config()?,
            spec,
        })
    }

    /// `[fit_config]` as tasks carry it; tables, arrays and dates are
    /// refused, since `fit`'s config holds plain values.
    fn fit_config(&self) -> Result<FitConfig, ConfigError> {
        let values = self
            .fit_config
            .iter()
            .map(|(k, v)| {
                let value = match v {
                    toml::Value::Boolean(b) => ConfigValue::Bool(*b),
                    toml::Value::Integer(i) => ConfigValue::Int(*i),
                    toml::Value::Float(f) => ConfigValue::Float(*f),
                    toml::Value::String(s) => ConfigValue::Text(s.clone()),
                    other => {
                        return Err(invalid(
                            "fit_config",
                            format!(
                                "'{k}' is a {}: only booleans, integers, floats and strings reach `fit`",
                                other.type_str()
                            ),
                        ));
                    }
                };
                Ok((k.clone(), value))
            })
            .collect::<Result<_, _>>()?;
        Ok(FitConfig(values))
    }

    /// The config as `init` writes it: every setting with its explanation.
    pub fn to_documented_toml(&self) -> String {
        let n = &self.server;
        let m = &self.model;
        let r = &self.rounds;
        let t = &self.training;
        let a = &self.aggregation;
        format!(
            r#"# covey-server configuration. Edit, then restart `covey-server run`.
# Unknown keys are refused, so a typo cannot silently fall back to a default.

[server]
# UDP address the QUIC endpoint listens on.
listen = "{listen}"
# Address written into enrollment bundles: what devices dial to reach this server.
public_addr = "{public_addr}"
# Largest frame accepted from a peer, in bytes; larger frames close the connection.
max_frame_bytes = {max_frame_bytes}
# Updates decoded, and models sent, at once. Each holds up to one model-sized buffer, so this bounds memory.
max_concurrent_uploads = {max_concurrent_uploads}
# A connection silent for this long is closed (QUIC idle timeout), in seconds.
idle_timeout_secs = {idle_timeout_secs}
# Keep-alive interval, in seconds; must be below idle_timeout_secs.
keep_alive_secs = {keep_alive_secs}
# Connections open at once; new ones beyond this are refused before their TLS handshake.
max_connections = {max_connections}
# Connections one enrolled client may hold open at once.
max_connections_per_client = {max_connections_per_client}
# Per-client rate limit (a token bucket over connections and requests): sustained rate
# per second, and the burst allowed above it. A client over it is disconnected and retries later.
client_requests_per_sec = {client_requests_per_sec}
client_request_burst = {client_request_burst}
# Largest global model this server will train, in bytes of f32 weights.
max_model_bytes = {max_model_bytes}
# Seconds one model download or update upload may take once it starts; a device that stalls
# longer is disconnected, so it cannot hold one of the max_concurrent_uploads slots.
transfer_timeout_secs = {transfer_timeout_secs:?}

[model]
# The global model's family: logreg, 2nn (784-200-200-10) or cnn (McMahan et al. 2017),
# gpt2 or llama (language models, set up by `covey-server init --model`), or external
# (tensors that devices train in their own code, set up by `covey-server init --model-file`).
architecture = "{architecture}"
# Seed of the initial weights (version 0), of LoRA's A and of a seeded base.
init_seed = {init_seed}
{language}
[rounds]
# The run ends once this many rounds have committed (global version = rounds).
rounds = {rounds}
# Checked-in clients needed before a round starts.
min_clients = {min_clients}
# Updates wanted per round; the round closes as soon as it has them.
clients_per_round = {clients_per_round}
# Extra fraction of clients selected to absorb stragglers (0.2 = 20% more).
over_selection = {over_selection:?}
# Fewest accepted updates a round may commit with at its deadline.
quorum = {quorum}
# Seconds from the start of a round to its deadline.
round_timeout_secs = {round_timeout_secs:?}
# Seed of client selection, for reproducible runs.
selection_seed = {selection_seed}
# Seconds a selected client whose connection broke (mid-upload, say) may take to reconnect
# and send its update before it counts as dropped; 0 drops it at once.
rejoin_grace_secs = {rejoin_grace_secs:?}
# sync: rounds (select a cohort, wait for it or the deadline, commit). fedbuff: asynchronous
# buffered aggregation (Nguyen et al. 2022): free clients train on the newest model, and every
# clients_per_round updates are applied, each weighted 1/sqrt(1 + staleness). round_timeout_secs
# is then each task's deadline. Works with central DP (no amplification by sampling is claimed).
mode = "{mode}"
# fedbuff: clients training at once (0 = twice clients_per_round).
concurrency = {concurrency}
# fedbuff: updates whose base version is more than this many versions old are refused.
max_staleness = {max_staleness}

[training]
# Local epochs per round (E).
epochs = {epochs}
# Local minibatch size (B).
batch_size = {batch_size}
# Local SGD learning rate (eta).
learning_rate = {learning_rate:?}
# FedProx proximal term mu; 0 is plain FedAvg.
proximal_mu = {proximal_mu:?}
# The devices' optimizer: sgd (McMahan et al.'s FedAvg), adam, or adamw:DECAY (Adam with
# decoupled weight decay). Its state starts afresh every round.
local_optimizer = "{local_optimizer}"
# How the learning rate sent to devices falls as versions grow: none; step:EVERY:FACTOR (times
# FACTOR every EVERY versions); or cosine:FLOOR (half a cosine from learning_rate down to FLOOR
# times it at the last round). Annealing it counters client drift late in a run.
learning_rate_decay = "{learning_rate_decay}"
# How clients encode updates: f32, f16, bf16 or int8 (per-chunk scale, stochastic rounding).
update_encoding = "{update_encoding}"
# Values per chunk frame for models and updates.
chunk_len = {chunk_len}

[aggregation]
# How the round's updates become one: mean (FedAvg's example-weighted mean, folded as updates
# arrive), norm-bound:C (each update scaled to L2 norm at most C first), or a Byzantine-robust rule
# that holds every update of the round in memory: median, trimmed-mean:FRACTION, krum:F,
# multi-krum:F:M or bulyan:F (F = attackers tolerated; quorum must be at least 2F+3, or 4F+3 for
# bulyan). Robust rules need individual updates, so they are refused with DP (norm-bound stays
# available under central DP).
aggregator = "{aggregator}"
# Server optimizer: fedavg, fedavgm, fedadam or fedyogi (Reddi et al. 2021).
optimizer = "{optimizer}"
# Server learning rate applied to the averaged update (1.0 with fedavg is plain FedAvg).
server_learning_rate = {server_learning_rate:?}
# FedAvgM momentum.
momentum = {momentum:?}
# FedAdam/FedYogi first- and second-moment decay.
beta1 = {beta1:?}
beta2 = {beta2:?}
# FedAdam/FedYogi adaptivity (epsilon in the denominator).
tau = {tau:?}

[evaluation]
# Directory with a held-out test set (t10k-images-idx3-ubyte[.gz], t10k-labels-idx1-ubyte[.gz]).
# Each new version is evaluated on it before it commits; accuracy and loss go into the round
# record and `covey-server status`. Empty: no central evaluation.
test_data = "{test_data}"

[privacy]
# off; central: clients clip their updates and the server adds Gaussian noise to the sum
# before it releases a model (DP-FedAvg, McMahan et al. 2018); or distributed: each client
# clips, quantizes and adds its share of discrete Gaussian noise, and the server only decodes
# the modular sum (Kairouz et al. 2021; the noise of `quorum` clients meets the guarantee).
# Clients are then sampled independently (Poisson) with rate clients_per_round / population,
# and the sum is divided by clients_per_round, the expected cohort.
mode = "{p_mode}"
# L2 norm every update is clipped to (C); with adaptive_clip, the first round's clip.
clip = {p_clip:?}
# Track a quantile of the update norms instead of a fixed clip (Andrew et al. 2021).
adaptive_clip = {p_adaptive}
# The quantile of update norms the adaptive clip tracks.
target_quantile = {p_quantile:?}
# How fast the adaptive clip moves (geometric step).
clip_learning_rate = {p_clip_lr:?}
# Noise on the count of updates within the clip; 0 picks max(clients_per_round / 20, noise_multiplier).
clip_count_noise = {p_count_noise:?}
# Noise standard deviation on the sum, in units of the clip (z).
noise_multiplier = {p_z:?}
# Devices that may take part (enrolled population); sets the sampling rate.
population = {p_population}
# The run stops cleanly before the privacy loss would exceed (target_epsilon, delta).
target_epsilon = {p_target:?}
delta = {p_delta:?}
# How rounds become epsilon: rdp (Renyi DP, improved conversion) or pld (privacy loss
# distributions: tighter, so more rounds fit the same budget; central DP only, and a run whose
# noise or sampling rate changed part-way is accounted by RDP).
accountant = "{p_accountant}"
# Distributed: the sum lives modulo 2^bits (up to 32); the server derives the quantization
# step so that the sum of `population` clients fits, and refuses a config where it cannot.
bits = {p_bits}

[secure_aggregation]
# SecAgg+ (Bell et al. 2020): clients mask their quantized, noised updates so the server
# learns only the sum. Needs [privacy] mode = "distributed".
enabled = {s_enabled}
# Each client shares its secrets with this many neighbours (a random k-regular graph, rounded
# up to even; k >= cohort - 1 is the original all-pairs SecAgg).
neighbors = {s_neighbors}
# Shares needed to rebuild a client's secret: a fraction of the neighbours in (0.5, 1], or a
# count. Above half, no two groups of neighbours can each rebuild one of a client's secrets.
threshold = {s_threshold:?}
# Seconds each key phase and the unmask phase wait for stragglers.
phase_timeout_secs = {s_timeout:?}
# Without DP, updates are clipped to this L2 norm and quantized into a ring of `bits` bits (the
# server then applies the plain mean of the survivors' updates). With distributed DP the [privacy]
# clip and bits apply, and `bits` here must equal [privacy] bits.
clip = {s_clip:?}
bits = {s_bits}

[compliance]
# k: no model version or metric is released from fewer participants; a round below k commits
# nothing and is recorded as discarded. The quorum must be at least k. Use 10 or more in
# production; 2 suits a demo.
min_cohort = {min_cohort}
# Retention: round records are deleted this many days after they end, and only the newest
# keep_versions model versions are kept (the current one always is); 0 keeps everything. Each
# purge is recorded in the audit trail, which is itself kept whole.
keep_rounds_days = {keep_rounds_days:?}
keep_versions = {keep_versions}

[storage]
# Every stored value is sealed with AES-256-GCM under a data key, which is wrapped by this
# key-encryption key: file:PATH (64 hex digits; relative to this directory) or env:VARIABLE.
# `init` creates a missing key file. Keep the key off the database's volume in production, and
# change it with `covey-server rotate-key`, which re-wraps the data key and rewrites no data.
kek = "{kek}"

[metrics]
# TCP address of the Prometheus endpoint (GET /metrics, OpenMetrics text); off when absent.
{metrics_listen}

[dashboard]
# The live web dashboard. On a loopback address it serves HTTP: anyone on this host sees the
# auditor's view (pseudonyms only), and a login shows an operator's. Any other address serves
# HTTPS and needs a login (`covey-server remote --identity X dashboard-login`). Port 0 picks a
# free port; the port is logged and the URL written to dashboard.url in this directory.
enabled = {dashboard_enabled}
listen = "{dashboard_listen}"
# HTTPS under the host's real name instead of the server's own `covey-server` certificate:
{dashboard_tls}

[fit_config]
# Handed as-is, with every task, to devices' own training code: the Python package passes them
# to `fit` and `evaluate` in `config`, beside round, epochs, batch_size and learning_rate.
# Names to booleans, integers, floats or strings, e.g. `weight_decay = 0.01`.
{fit_config}"#,
            fit_config = self
                .fit_config
                .iter()
                .map(|(k, v)| format!("{} = {v}\n", toml::Value::String(k.clone())))
                .collect::<String>(),
            kek = self.storage.kek,
            dashboard_enabled = self.dashboard.enabled,
            dashboard_listen = self.dashboard.listen,
            dashboard_tls = [
                (
                    "certificate",
                    &self.dashboard.certificate,
                    "/etc/ssl/covey/fullchain.pem"
                ),
                ("key", &self.dashboard.key, "/etc/ssl/covey/privkey.pem"),
            ]
            .iter()
            .map(|(name, path, example)| match path {
                Some(p) => format!("{name} = {}", toml::Value::String(p.display().to_string())),
                None => format!("# {name} = \"{example}\""),
            })
            .collect::<Vec<_>>()
            .join("\n"),
            metrics_listen = match self.metrics.listen {
                Some(addr) => format!("listen = \"{addr}\""),
                None => "# listen = \"127.0.0.1:9464\"".to_owned(),
            },
            max_connections = n.max_connections,
            max_connections_per_client = n.max_connections_per_client,
            client_requests_per_sec = n.client_requests_per_sec,
            client_request_burst = n.client_request_burst,
            max_model_bytes = n.max_model_bytes,
            transfer_timeout_secs = n.transfer_timeout_secs,
            min_cohort = self.compliance.min_cohort,
            keep_rounds_days = self.compliance.keep_rounds_days,
            keep_versions = self.compliance.keep_versions,
            listen = n.listen,
            public_addr = n.public_addr,
            max_frame_bytes = n.max_frame_bytes,
            max_concurrent_uploads = n.max_concurrent_uploads,
            idle_timeout_secs = n.idle_timeout_secs,
            keep_alive_secs = n.keep_alive_secs,
            architecture = m.architecture,
            init_seed = m.init_seed,
            language = m.documented_language(),
            rounds = r.rounds,
            min_clients = r.min_clients,
            clients_per_round = r.clients_per_round,
            over_selection = r.over_selection,
            quorum = r.quorum,
            round_timeout_secs = r.round_timeout_secs,
            selection_seed = r.selection_seed,
            rejoin_grace_secs = r.rejoin_grace_secs,
            mode = r.mode,
            concurrency = r.concurrency,
            max_staleness = r.max_staleness,
            epochs = t.epochs,
            batch_size = t.batch_size,
            learning_rate = t.learning_rate,
            proximal_mu = t.proximal_mu,
            local_optimizer = t.local_optimizer,
            learning_rate_decay = t.learning_rate_decay,
            update_encoding = t.update_encoding,
            chunk_len = t.chunk_len,
            aggregator = a.aggregator,
            optimizer = a.optimizer,
            server_learning_rate = a.server_learning_rate,
            momentum = a.momentum,
            beta1 = a.beta1,
            beta2 = a.beta2,
            tau = a.tau,
            test_data = self.evaluation.test_data,
            p_mode = self.privacy.mode,
            p_clip = self.privacy.clip,
            p_adaptive = self.privacy.adaptive_clip,
            p_quantile = self.privacy.target_quantile,
            p_clip_lr = self.privacy.clip_learning_rate,
            p_count_noise = self.privacy.clip_count_noise,
            p_z = self.privacy.noise_multiplier,
            p_population = self.privacy.population,
            p_target = self.privacy.target_epsilon,
            p_delta = self.privacy.delta,
            p_accountant = self.privacy.accountant,
            p_bits = self.privacy.bits,
            s_enabled = self.secure_aggregation.enabled,
            s_neighbors = self.secure_aggregation.neighbors,
            s_threshold = self.secure_aggregation.threshold,
            s_timeout = self.secure_aggregation.phase_timeout_secs,
            s_clip = self.secure_aggregation.clip,
            s_bits = self.secure_aggregation.bits,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_optimizers_and_bad_rates_are_named() {
        let mut a = ServerConfig::default().aggregation;
        a.optimizer = "sgd".into();
        assert!(
            a.optimizer()
                .unwrap_err()
                .contains("unknown optimizer 'sgd'")
        );
        a.optimizer = "fedadam".into();
        a.beta2 = 1.5;
        assert!(a.optimizer().unwrap_err().contains("beta2"));
    }

    #[test]
    fn the_documented_file_parses_back_to_the_same_config() {
        let mut c = ServerConfig::default();
        c.rounds.over_selection = 0.25;
        c.aggregation.optimizer = "fedyogi".into();
        c.aggregation.aggregator = "norm-bound:2.5".into();
        c.evaluation.test_data = "/data/mnist".into();
        c.privacy.mode = "central".into();
        c.privacy.population = 100;
        c.privacy.adaptive_clip = true;
        c.compliance.min_cohort = 2;
        c.compliance.keep_rounds_days = 30.0;
        c.compliance.keep_versions = 5;
        c.training.learning_rate_decay = "cosine:0.1".into();
        let text = c.to_documented_toml();
        let back: ServerConfig = toml::from_str(&text).unwrap();
        assert_eq!(back, c);
        back.settings().unwrap();
    }

    #[test]
    fn the_learning_rate_decay_is_checked_and_reaches_the_devices_settings() {
        let mut c = ServerConfig::default();
        c.rounds.rounds = 10;
        c.training.learning_rate = 0.2;
        c.training.learning_rate_decay = "cosine:0".into();
        let s = c.settings().unwrap();
        assert_eq!(s.hyper_at(ModelVersion(0)).learning_rate, 0.2);
        assert!((s.hyper_at(ModelVersion(5)).learning_rate - 0.1).abs() < 1e-7);
        assert_eq!(s.hyper_at(ModelVersion(10)).learning_rate, 0.0);
        assert_eq!(s.hyper_at(ModelVersion(5)).epochs, c.training.epochs);
        // A config.toml written before the setting existed reads as none.
        let old = c
            .to_documented_toml()
            .replace("learning_rate_decay = \"cosine:0\"\n", "");
        let back: ServerConfig = toml::from_str(&old).unwrap();
        assert_eq!(back.training.learning_rate_decay, "none");
        c.training.learning_rate_decay = "step:0:0.5".into();
        let e = c.settings().unwrap_err().to_string();
        assert!(
            e.contains("training.learning_rate_decay") && e.contains("EVERY must be at least 1"),
            "{e}"
        );
    }

    #[test]
    fn secure_aggregation_settings_round_trip_and_are_checked() {
        let mut c = ServerConfig::default();
        c.privacy.mode = "distributed".into();
        c.privacy.population = 100;
        c.rounds.quorum = 1;
        c.compliance.min_cohort = 1;
        c.secure_aggregation.enabled = true;
        c.secure_aggregation.neighbors = 8;
        c.secure_aggregation.threshold = 5.0;
        let back: ServerConfig = toml::from_str(&c.to_documented_toml()).unwrap();
        assert_eq!(back, c);
        let sa = back.settings().unwrap().secagg.unwrap();
        assert_eq!(sa.params.threshold, Threshold::Count(5));
        for (threshold, needle) in [
            (0.5, "fraction of the neighbours in (0.5, 1]"),
            (4.0, "must exceed half"),
            (9.0, "exceeds the 8 neighbours"),
            (1.5, "a whole count of at least 2"),
        ] {
            c.secure_aggregation.threshold = threshold;
            let err = c.settings().unwrap_err().to_string();
            assert!(err.contains(needle), "{threshold}: {err}");
        }
        c.secure_aggregation.threshold = 0.6;
        c.secure_aggregation.bits = 16;
        let err = c.settings().unwrap_err().to_string();
        assert!(err.contains("[privacy] bits (20)"), "{err}");
        c.secure_aggregation.bits = 20;
        c.aggregation.aggregator = "median".into();
        let err = c.settings().unwrap_err().to_string();
        assert!(err.contains("secure aggregation never shows"), "{err}");
        c.aggregation.aggregator = "mean".into();
        c.privacy.mode = "central".into();
        let err = c.settings().unwrap_err().to_string();
        assert!(err.contains("secure_aggregation.enabled"), "{err}");
        // Without DP: a noiseless quantizer from the secure-aggregation clip.
        c.privacy.mode = "off".into();
        let sa = c.settings().unwrap().secagg.unwrap();
        let (clip, quantizer) = sa.noiseless.unwrap();
        assert_eq!(clip.get(), 10.0);
        assert_eq!(quantizer.bits, 20);
    }

    #[test]
    fn bad_settings_name_the_setting() {
        let mut c = ServerConfig::default();
        c.training.update_encoding = "fp4".into();
        let err = c.settings().unwrap_err().to_string();
        assert!(err.contains("training.update_encoding"), "{err}");

        let mut c = ServerConfig::default();
        c.rounds.quorum = 5;
        let err = c.settings().unwrap_err().to_string();
        assert!(err.contains("quorum"), "{err}");

        let mut c = ServerConfig::default();
        c.compliance.min_cohort = 3;
        let err = c.settings().unwrap_err().to_string();
        assert!(err.contains("below compliance.min_cohort (3)"), "{err}");
        c.compliance.min_cohort = 0;
        let err = c.settings().unwrap_err().to_string();
        assert!(err.contains("compliance.min_cohort"), "{err}");
        c.compliance.min_cohort = 2;
        c.compliance.keep_rounds_days = -1.0;
        let err = c.settings().unwrap_err().to_string();
        assert!(err.contains("compliance.keep_rounds_days"), "{err}");

        let mut c = ServerConfig::default();
        c.server.transfer_timeout_secs = 0.0;
        let err = c.settings().unwrap_err().to_string();
        assert!(err.contains("server.transfer_timeout_secs"), "{err}");

        let mut c = ServerConfig::default();
        c.server.max_frame_bytes = 1000;
        let err = c.settings().unwrap_err().to_string();
        assert!(err.contains("max_frame_bytes"), "{err}");

        let mut c = ServerConfig::default();
        c.aggregation.aggregator = "krum:1".into();
        let err = c.settings().unwrap_err().to_string();
        assert!(err.contains("raise rounds.quorum"), "{err}");
        c.aggregation.aggregator = "krum:2:3".into();
        let err = c.settings().unwrap_err().to_string();
        assert!(err.contains("aggregation.aggregator"), "{err}");

        let mut c = ServerConfig::default();
        c.privacy.mode = "central".into();
        c.privacy.population = 2;
        c.aggregation.aggregator = "median".into();
        let err = c.settings().unwrap_err().to_string();
        assert!(err.contains("sensitivity"), "{err}");
        c.aggregation.aggregator = "norm-bound:3".into();
        c.settings().unwrap();

        let mut c = ServerConfig::default();
        c.privacy.mode = "central".into();
        let err = c.settings().unwrap_err().to_string();
        assert!(err.contains("privacy.population"), "{err}");
        c.privacy.population = 10;
        c.privacy.target_epsilon = 0.0;
        let err = c.settings().unwrap_err().to_string();
        assert!(err.contains("privacy.target_epsilon"), "{err}");
        // One round at z = 1 costs ε = 2.83 (central, q = 0.2), 4.73 (distributed).
        c.privacy.target_epsilon = 8.0;
        c.privacy.clip = f64::NAN;
        let err = c.settings().unwrap_err().to_string();
        assert!(err.contains("privacy.clip"), "{err}");
        c.privacy.clip = 1.0;
        let dp = c.settings().unwrap().dp.unwrap();
        assert_eq!(dp.sampling_rate.get(), 0.2);
        assert_eq!(dp.accountant, AccountantKind::Rdp);
        c.privacy.accountant = "pld".into();
        assert_eq!(
            c.settings().unwrap().dp.unwrap().accountant,
            AccountantKind::Pld
        );
        c.privacy.accountant = "moments".into();
        let err = c.settings().unwrap_err().to_string();
        assert!(
            err.contains("privacy.accountant") && err.contains("moments"),
            "{err}"
        );
        c.privacy.accountant = "pld".into();
        c.privacy.mode = "distributed".into();
        let err = c.settings().unwrap_err().to_string();
        assert!(
            err.contains("privacy.accountant") && err.contains("zCDP"),
            "{err}"
        );
        c.privacy.accountant = "rdp".into();
        assert!(matches!(
            c.settings().unwrap().dp.unwrap().mode,
            DpMode::Distributed(_)
        ));
        c.privacy.bits = 4;
        let err = c.settings().unwrap_err().to_string();
        assert!(err.contains("use at least 6 bits"), "{err}");
        c.privacy.bits = 20;
        c.privacy.adaptive_clip = true;
        let err = c.settings().unwrap_err().to_string();
        assert!(err.contains("privacy.adaptive_clip"), "{err}");
        c.privacy.mode = "local".into();
        let err = c.settings().unwrap_err().to_string();
        assert!(err.contains("privacy.mode"), "{err}");
    }

    #[test]
    fn fedbuff_is_configured_and_refused_where_it_cannot_work() {
        let mut c = ServerConfig::default();
        c.rounds.mode = "fedbuff".into();
        c.rounds.clients_per_round = 4;
        c.rounds.min_clients = 4;
        c.rounds.quorum = 4;
        c.rounds.concurrency = 6;
        c.rounds.max_staleness = 3;
        let text = c.to_documented_toml();
        let back: ServerConfig = toml::from_str(&text).unwrap();
        assert_eq!(back, c);
        let buffer = back.settings().unwrap().buffer.unwrap();
        assert_eq!(
            (buffer.size, buffer.concurrency, buffer.max_staleness),
            (4, 6, 3)
        );

        // Central DP claims no amplification by sampling in FedBuff.
        c.privacy.mode = "central".into();
        c.privacy.population = 1000;
        let dp = c.settings().unwrap().dp.unwrap();
        assert_eq!(dp.sampling_rate.get(), 1.0);
        assert_eq!(dp.expected_cohort, 4.0);
        c.privacy.mode = "off".into();

        for (edit, why) in [
            (
                (|c: &mut ServerConfig| c.rounds.concurrency = 3) as fn(&mut ServerConfig),
                "concurrency",
            ),
            (|c| c.rounds.mode = "async".into(), "unknown mode 'async'"),
            (
                |c| c.aggregation.aggregator = "median".into(),
                "robust aggregators",
            ),
            (
                |c| {
                    c.privacy.mode = "distributed".into();
                    c.privacy.population = 100;
                },
                "distributed DP",
            ),
        ] {
            let mut bad = c.clone();
            edit(&mut bad);
            let err = bad.settings().unwrap_err().to_string();
            assert!(err.contains(why), "{err}");
        }
    }

    #[test]
    fn unknown_keys_are_refused() {
        let text = ServerConfig::default()
            .to_documented_toml()
            .replace("quorum =", "quorom =");
        assert!(toml::from_str::<ServerConfig>(&text).is_err());
    }

    /// An external model and the operator's fit config survive the
    /// documented file, reach the settings, and are refused where wrong.
    #[test]
    fn an_external_model_and_its_fit_config_round_trip() {
        let spec = ExternalSpec::new(vec![
            TensorSpec::new("fc.weight", &[10, 784]),
            TensorSpec::new("fc.bias", &[10]),
        ])
        .unwrap();
        let mut c = ServerConfig::default();
        c.model.architecture = "external".into();
        c.model.source = "/models/init.safetensors".into();
        c.model.set_external(&spec).unwrap();
        c.fit_config
            .insert("weight decay".into(), toml::Value::Float(0.01));
        c.fit_config
            .insert("note".into(), toml::Value::String("hi".into()));
        c.fit_config.insert("steps".into(), toml::Value::Integer(7));
        c.fit_config
            .insert("warm".into(), toml::Value::Boolean(true));
        let text = c.to_documented_toml();
        let back: ServerConfig = toml::from_str(&text).unwrap();
        assert_eq!(back, c);
        let settings = back.settings().unwrap();
        assert_eq!(settings.spec, ModelSpec::External(spec));
        assert_eq!(
            settings.fit_config.0,
            [
                ("note".to_owned(), ConfigValue::Text("hi".into())),
                ("steps".to_owned(), ConfigValue::Int(7)),
                ("warm".to_owned(), ConfigValue::Bool(true)),
                ("weight decay".to_owned(), ConfigValue::Float(0.01)),
            ]
        );

        let mut nested = c.clone();
        nested.fit_config.insert(
            "lrs".into(),
            toml::Value::Array(vec![toml::Value::Float(0.1)]),
        );
        let e = nested.settings().unwrap_err().to_string();
        assert!(e.contains("'lrs' is a array"), "{e}");

        let mut central = c.clone();
        central.evaluation.test_data = "/data/mnist".into();
        let e = central.settings().unwrap_err().to_string();
        assert!(e.contains("federated evaluation"), "{e}");

        let mut broken = c.clone();
        broken.model.tensors = r#"[{"name": "w", "shape": [0]}]"#.into();
        let e = broken.settings().unwrap_err().to_string();
        assert!(e.contains("model.tensors") && e.contains("no value"), "{e}");

        let mut stray = ServerConfig::default();
        stray.model.tensors = c.model.tensors.clone();
        let e = stray.settings().unwrap_err().to_string();
        assert!(e.contains("takes no tensor list"), "{e}");
    }

    /// A budget no single round fits is refused before the run starts, with
    /// the noise multiplier that would fit, and that multiplier is accepted.
    #[test]
    fn a_budget_no_round_fits_is_refused_with_the_noise_that_fits() {
        for mode in ["distributed", "central"] {
            let mut c = ServerConfig::default();
            c.privacy.mode = mode.into();
            c.privacy.population = 10;
            c.privacy.clip = 1.0;
            c.privacy.noise_multiplier = 0.3;
            c.privacy.target_epsilon = 1.0;
            let e = c.settings().unwrap_err().to_string();
            assert!(e.contains("one round costs"), "{mode}: {e}");
            let z: f64 = e
                .split("noise_multiplier = ")
                .nth(1)
                .and_then(|t| t.split(' ').next())
                .and_then(|z| z.parse().ok())
                .unwrap_or_else(|| panic!("{mode}: no suggestion in {e}"));
            assert!(z > 0.3, "{mode}: {e}");
            c.privacy.noise_multiplier = z;
            c.settings()
                .unwrap_or_else(|e| panic!("{mode}: the suggested z = {z} is refused: {e}"));
        }
    }
}
