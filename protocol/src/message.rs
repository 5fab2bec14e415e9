//! Control messages. They are small; tensors travel separately as chunk
//! frames (see [`crate::tensor`]).

use serde::{Deserialize, Serialize};

use covey_privacy::{ClipNorm, quantize::Quantizer};

use crate::{
    ModelVersion, RoundId, UpdateEncoding,
    asset::AssetRequest,
    model::ModelSpec,
    secagg::{SecAggMessage, SecAggParams},
};

/// Every control message of `covey/1`.
///
/// Exchanges, each on its own bidirectional stream opened by the client:
/// - `Hello` → `Welcome` (or `Error` and a closed connection);
/// - `CheckIn` → `Task` followed by the model's chunk frames, or `RunFinished`;
/// - `Update` followed by the update's chunk frames → `UpdateReceipt`.
///
/// `Hello` and `Welcome` must stay the first two variants with their current
/// fields so that any two versions can refuse each other clearly.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Message {
    Hello(Hello),
    Welcome(Welcome),
    CheckIn,
    Task(Task),
    RunFinished {
        final_version: ModelVersion,
    },
    Update(UpdateHeader),
    UpdateReceipt(UpdateReceipt),
    Error(ErrorReport),
    /// Sent instead of a task to an idle client; each version's model
    /// chunks follow, in order.
    Evaluate(EvalTask),
    /// A client's answer to `Evaluate`, on a stream of its own.
    EvalReport(EvalReport),
    /// A secure-aggregation step: each request on its own stream, answered
    /// when its phase closes.
    SecAgg(SecAggMessage),
    /// A device renewing its certificate before it expires.
    Renew(RenewRequest),
    /// The renewed certificate, for the key the request proved.
    Renewed(RenewedCertificate),
    /// Server → client after `Update`: a buffer is free, send the chunks
    /// now. Until then nothing of the update is in flight, so thousands of
    /// waiting uploads cost the server nothing.
    SendUpdate,
    /// A device fetching a file its task names by hash, on a stream of its
    /// own (see [`crate::asset`]).
    FetchAsset(AssetRequest),
    /// The asset's bytes from `offset` follow as chunk frames.
    AssetFollows {
        offset: u64,
    },
    /// Server → client instead of `Welcome`: reconnect elsewhere, later,
    /// or both. A cluster's leaf sends devices it does not serve to the
    /// leaf that does, and steers the pace of check-ins.
    Redirect(Redirect),
}

/// Where and when a device should connect next.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Redirect {
    /// `host:port` of the server that serves this device; `None` is the
    /// same one.
    pub to: Option<String>,
    /// Wait this long first.
    pub after_ms: u64,
}

/// A fresh P-256 public key (uncompressed SEC1 point) and, signed with it,
/// [`crate::identity::renewal_message`] of the current certificate.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RenewRequest {
    pub public_key: Vec<u8>,
    pub proof: Vec<u8>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RenewedCertificate {
    pub cert_pem: String,
    pub issued_unix: i64,
    pub not_after_unix: i64,
}

impl Message {
    /// A short name for logs and errors; never includes payload values.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Hello(_) => "Hello",
            Self::Welcome(_) => "Welcome",
            Self::CheckIn => "CheckIn",
            Self::Task(_) => "Task",
            Self::RunFinished { .. } => "RunFinished",
            Self::Update(_) => "Update",
            Self::UpdateReceipt(_) => "UpdateReceipt",
            Self::Error(_) => "Error",
            Self::Evaluate(_) => "Evaluate",
            Self::EvalReport(_) => "EvalReport",
            Self::SecAgg(_) => "SecAgg",
            Self::Renew(_) => "Renew",
            Self::Renewed(_) => "Renewed",
            Self::SendUpdate => "SendUpdate",
            Self::FetchAsset(_) => "FetchAsset",
            Self::AssetFollows { .. } => "AssetFollows",
            Self::Redirect(_) => "Redirect",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    pub protocol: u16,
    pub software: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Welcome {
    pub protocol: u16,
    pub software: String,
}

/// Local training hyperparameters sent with each task.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Hyperparameters {
    pub epochs: u32,
    pub batch_size: u32,
    pub learning_rate: f32,
    /// FedProx proximal term; 0 is plain FedAvg local SGD.
    pub proximal_mu: f32,
    /// The device's optimizer; its state starts afresh every round.
    pub optimizer: LocalOptimizer,
}

/// How a device takes its local steps.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub enum LocalOptimizer {
    /// w ← w − η·g (McMahan et al. 2017).
    #[default]
    Sgd,
    /// Adam with decoupled weight decay (AdamW), the usual choice for
    /// transformers.
    Adam {
        beta1: f32,
        beta2: f32,
        epsilon: f32,
        weight_decay: f32,
    },
}

impl LocalOptimizer {
    /// Adam with PyTorch's defaults and no weight decay.
    pub const ADAM: Self = Self::Adam {
        beta1: 0.9,
        beta2: 0.999,
        epsilon: 1e-8,
        weight_decay: 0.0,
    };
}

/// What a selected client must do this round.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Task {
    pub round: RoundId,
    pub base_version: ModelVersion,
    pub spec: ModelSpec,
    pub hyper: Hyperparameters,
    pub update_encoding: UpdateEncoding,
    /// Values per chunk frame, for the model sent now and the update sent back.
    pub chunk_len: u32,
    /// Time the client has, from receiving the task, to deliver its update.
    pub deadline_ms: u64,
    /// Seed for the client's local shuffling, so runs can be reproduced.
    pub seed: u64,
    /// What the client must do to its update before sending it.
    pub privacy: UpdatePrivacy,
    /// Secure aggregation: the ring words are masked, and the server
    /// learns only their sum. Requires [`UpdatePrivacy::Distributed`].
    pub secure_aggregation: Option<SecAggParams>,
    /// The operator's own settings for the devices' training code
    /// (`[fit_config]` in config.toml); Covey's trainers ignore them.
    pub config: FitConfig,
}

/// Settings an operator hands to devices' own training code, as Flower's
/// `config` dict carries them: names to plain values, in the order the
/// config file lists them.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct FitConfig(pub Vec<(String, ConfigValue)>);

/// One value of a [`FitConfig`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum ConfigValue {
    Bool(bool),
    Int(i64),
    Float(f64),
    Text(String),
}

/// What happens to an update before it leaves the device.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub enum UpdatePrivacy {
    /// Sent as trained.
    Plain,
    /// Central DP: L2-clipped to `clip`. The header says whether the update
    /// was already within it, the count adaptive clipping needs. The server
    /// refuses an update above the bound.
    Clipped { clip: ClipNorm },
    /// Distributed DP: clipped to `clip`, quantized by `quantizer`, with
    /// discrete Gaussian noise of scale `noise_sigma` (integer units) added
    /// on the device, and sent as ring words modulo 2^bits.
    Distributed {
        clip: ClipNorm,
        quantizer: Quantizer,
        noise_sigma: f64,
    },
}

/// What an update's chunk frames carry.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Payload {
    /// The update's values in a float encoding.
    Floats(UpdateEncoding),
    /// Quantized, noised values modulo 2^bits (distributed DP).
    Ring { bits: u32 },
}

/// Federated evaluation: compare model versions on clients' held-out data.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EvalTask {
    pub id: u64,
    pub spec: ModelSpec,
    pub versions: Vec<ModelVersion>,
    pub chunk_len: u32,
}

/// Metrics per version, in the task's order, over `examples` held-out
/// examples; `examples` 0 means the client holds no held-out data.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EvalReport {
    pub id: u64,
    pub examples: u64,
    pub results: Vec<LocalMetrics>,
}

/// Metrics a client reports on its own local data.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct LocalMetrics {
    pub loss: f32,
    pub accuracy: f32,
}

/// Announces an update; its chunk frames follow on the same stream.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct UpdateHeader {
    pub round: RoundId,
    pub base_version: ModelVersion,
    pub payload: Payload,
    /// Values that follow: the model's parameters, or the quantizer's
    /// padded length for ring payloads.
    pub param_count: u64,
    pub num_examples: u64,
    pub metrics: LocalMetrics,
    /// Under [`UpdatePrivacy::Clipped`]: was the norm within the clip
    /// before clipping?
    pub within_clip: Option<bool>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum UpdateReceipt {
    Accepted,
    Rejected(RejectReason),
}

/// Why an update was not aggregated. Counted and reported by reason.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum RejectReason {
    /// The update names a round that is not the one in progress.
    WrongRound,
    /// The round closed (quorum reached or deadline passed) first.
    RoundClosed,
    /// The client was not selected for this round.
    NotSelected,
    /// The client already sent an update this round.
    Duplicate,
    /// Encoding, length or parameter count differs from the task.
    ShapeMismatch,
    /// NaN or infinity in the update.
    NonFinite,
    /// A zero example count would divide by zero or carry no weight.
    NoExamples,
    /// The update's L2 norm is above the round's clip.
    ClipExceeded,
    /// The update ignored the task's privacy settings.
    PrivacyMismatch,
    /// Buffered mode: the update's base is too many versions old.
    Stale,
}

impl RejectReason {
    /// Every reason, so counters can start at zero for each.
    pub const ALL: [Self; 10] = [
        Self::WrongRound,
        Self::RoundClosed,
        Self::NotSelected,
        Self::Duplicate,
        Self::ShapeMismatch,
        Self::NonFinite,
        Self::NoExamples,
        Self::ClipExceeded,
        Self::PrivacyMismatch,
        Self::Stale,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::WrongRound => "wrong round",
            Self::RoundClosed => "round closed",
            Self::NotSelected => "not selected",
            Self::Duplicate => "duplicate update",
            Self::ShapeMismatch => "shape mismatch",
            Self::NonFinite => "non-finite values",
            Self::NoExamples => "no examples",
            Self::ClipExceeded => "norm above clip",
            Self::PrivacyMismatch => "privacy settings ignored",
            Self::Stale => "base version too stale",
        }
    }
}

impl std::fmt::Display for RejectReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An error sent before the sender closes the stream or connection.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorReport {
    pub code: CloseCode,
    pub detail: String,
}

/// Application close codes for QUIC connections.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[repr(u32)]
pub enum CloseCode {
    Done = 0,
    IncompatibleVersion = 1,
    MalformedFrame = 2,
    FrameTooLarge = 3,
    ProtocolViolation = 4,
    ShapeMismatch = 5,
    ServerShutdown = 6,
    Internal = 7,
    /// The client's enrollment was revoked while it was connected.
    Revoked = 8,
    /// The server is at a connection or rate limit; retry later.
    Busy = 9,
    /// The client connected again; this older connection is closed.
    Superseded = 10,
}

impl CloseCode {
    pub fn from_u64(code: u64) -> Option<Self> {
        Some(match code {
            0 => Self::Done,
            1 => Self::IncompatibleVersion,
            2 => Self::MalformedFrame,
            3 => Self::FrameTooLarge,
            4 => Self::ProtocolViolation,
            5 => Self::ShapeMismatch,
            6 => Self::ServerShutdown,
            7 => Self::Internal,
            8 => Self::Revoked,
            9 => Self::Busy,
            10 => Self::Superseded,
            _ => return None,
        })
    }
}
