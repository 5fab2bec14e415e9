//! The QUIC driver: moves bytes between connections and the round state
//! machine, and carries out its actions (send tasks, aggregate, commit).
//!
//! One task, the hub, owns the state machine, the running aggregate and the
//! store; connection tasks talk to it over a channel. Nothing here decides
//! *whether* a round starts or ends: `covey_protocol::round` does.
//!
//! This module opens the server and holds the types the parts share. The
//! hub's parts each have one owner, split the way a leaf (which meets
//! devices) and a root (which commits) would split them:
//! - `conn`: connections and streams; `devices`: who is connected, waiting
//!   or uploading (leaf);
//! - `partial`: the round's partial aggregate; `secagg`: secure
//!   aggregation's phases among the leaf's devices (leaf);
//! - `hub`: the event loop and the scheduler's actions (root);
//! - `commit`: the model, the optimizer, central DP and the ledger (root);
//! - `evaluation`: federated evaluation; `operator`: control requests, the
//!   operator API, admissions and renewals.

use std::{
    collections::{HashMap, HashSet, VecDeque},
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use covey_privacy::{
    ClipNorm, Pseudonym, PseudonymKey, clip_l2, l2_norm, noise::NoiseRng, quantize::Quantizer,
};
use covey_protocol::{
    ADMIN_ALPN, ModelVersion, PROTOCOL_VERSION, RoundId, UpdateEncoding,
    buffered::Buffered,
    frame::{FrameError, FrameLimits},
    identity::renewal_message,
    io::{StreamError, read_message, read_tensor, read_words, write_message, write_tensor},
    message::{
        CloseCode, ErrorReport, EvalReport, EvalTask, Message, Payload, RejectReason, RenewRequest,
        RenewedCertificate, Task, UpdateHeader, UpdatePrivacy, UpdateReceipt, Welcome,
    },
    round::{AbortReason, Action, Coordinator, FinishReason, RoundStats},
    secagg::{
        SecAggMessage, Session, UnmaskRequest,
        session::{Phase as SecAggPhase, SessionAbort},
    },
    tensor::{AssembleError, ChunkPlan},
};
use quinn::{VarInt, crypto::rustls::QuicServerConfig};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rustls::pki_types::CertificateDer;
use serde::Serialize;
use tokio::sync::{Semaphore, mpsc, oneshot};
use tracing::{Instrument, debug, error, info, info_span, warn};

use crate::{
    admission::limits::Limits,
    admission::pki::{self, Admitted},
    config::Settings,
    dir::{DirError, StateDir},
    fold::robust::Aggregator,
    fold::{
        aggregate::OptimizerState,
        merge::{Aggregate, PartialSum, Summed, Tally},
    },
    operator::admin::{AdminReply, AdminRequest, AdminResponse, MAX_REQUEST_BYTES, Role},
    operator::control::{EvalOutcome, VersionMetrics},
    operator::metrics::{Metrics, OpenConnection, Outcome, Reason},
    operator::report::{ComplianceReport, ReportError},
    operator::status,
    operator::status::Report,
    rounds::central::TestSet,
    rounds::compliance::Retention,
    rounds::dp::{DpMode, Privacy, PrivacyLedger},
    rounds::schedule::Machine,
    state::audit::AuditEvent,
    state::store::{ModelHeader, RoundOutcome, RoundRecord, Store, StoredModel, unix_ms_now},
};

mod commit;
mod conn;
mod devices;
mod evaluation;
mod hub;
mod operator;
mod partial;
mod secagg;
mod upstream;

use commit::Committer;
use conn::*;
use devices::Devices;
use operator::Registry;
use partial::RoundInProgress;
use secagg::SecAggRound;
use upstream::Upstream;

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error(transparent)]
    Dir(#[from] DirError),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot serve metrics on {addr}: {source}")]
    MetricsBind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error(transparent)]
    Dashboard(#[from] crate::operator::dashboard::BindError),
    #[error("TLS setup: {0}")]
    Tls(String),
    #[error("the database was created for a {stored} model but config.toml asks for {configured}")]
    SpecChanged { stored: String, configured: String },
    #[error(transparent)]
    TestSet(#[from] crate::rounds::central::TestSetError),
    #[error(transparent)]
    Assets(#[from] crate::state::assets::ServedAssetError),
    #[error("noise source: {0}")]
    Noise(String),
    #[error("internal error: {0}")]
    Internal(String),
    #[error("storing state failed, stopping so nothing is lost: {0}")]
    Store(#[from] crate::state::store::StoreError),
}

/// What a finished run did.
#[derive(Clone, Debug, Default, Serialize)]
pub struct RunSummary {
    pub final_version: u64,
    pub rounds_committed: u64,
    pub rounds_aborted: u64,
    pub bytes_up: u64,
    pub bytes_down: u64,
    /// Peak resident memory of this process (Linux only).
    pub peak_rss_bytes: Option<u64>,
    /// CPU time this process used, user and system (Linux only).
    pub cpu_seconds: Option<f64>,
    /// Why the run ended.
    pub finish_reason: Option<String>,
    /// Under central DP: ε spent by the run so far, at the configured δ.
    pub epsilon: Option<f64>,
    /// Refused updates, by reason.
    pub rejected: std::collections::BTreeMap<String, u64>,
}

/// utime + stime from /proc/self/stat, in USER_HZ ticks (100 a second on
/// every Linux target this runs on).
fn cpu_seconds() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // The command name (field 2) may hold spaces; the rest follows its ')'.
    let rest = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| fields.get(i)?.parse::<u64>().ok();
    // Fields 14 and 15 of the line are 12 and 13 after the name.
    Some((ticks(11)? + ticks(12)?) as f64 / 100.0)
}

/// VmHWM from /proc/self/status: the process's peak resident set.
fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// Sent to subscribers after each durable commit.
#[derive(Clone, Debug)]
pub struct CommitNotice {
    pub record: RoundRecord,
    pub version: ModelVersion,
    pub weights: Arc<Vec<f32>>,
}

/// Asks a running server to finish its run now: the round in flight is
/// discarded, clients are told the run is over.
#[derive(Clone)]
pub struct Stopper(mpsc::Sender<Event>);

impl Stopper {
    pub async fn stop(&self) {
        let _ = self.0.send(Event::Stop).await;
    }
}

/// What a check-in waits for.
enum Assignment {
    Task(Arc<TaskPackage>),
    Evaluate(Arc<EvalPackage>),
    Finished(ModelVersion),
}

struct EvalPackage {
    task: EvalTask,
    models: Vec<Arc<Vec<f32>>>,
}

/// A federated evaluation waiting for reports.
struct PendingEval {
    id: u64,
    versions: Vec<ModelVersion>,
    asked: HashSet<Pseudonym>,
    answered: HashSet<Pseudonym>,
    clients_with_data: usize,
    examples: u64,
    /// Example-weighted sums of (loss, accuracy) per version.
    sums: Vec<(f64, f64)>,
    deadline: Instant,
}

struct TaskPackage {
    task: Task,
    model: Arc<Vec<f32>>,
}

/// An update's values as they arrived.
enum Values {
    Floats(Vec<f32>),
    /// Ring words (distributed DP).
    Words(Vec<u32>),
}

struct Received {
    values: Values,
    num_examples: u64,
    loss: f32,
    within_clip: Option<bool>,
}

enum Event {
    /// A device renewing its certificate (`certificate`: the one it holds).
    Renew {
        client: Pseudonym,
        request: RenewRequest,
        certificate: Vec<u8>,
        reply: oneshot::Sender<Result<RenewedCertificate, String>>,
    },
    /// A request to the operator API from a certificate with `role`.
    Admin {
        actor: Pseudonym,
        role: Role,
        request: AdminRequest,
        reply: oneshot::Sender<AdminResponse>,
    },
    CheckIn {
        client: Pseudonym,
        conn: u64,
        reply: oneshot::Sender<Assignment>,
    },
    BeginUpdate {
        client: Pseudonym,
        conn: u64,
        header: UpdateHeader,
        reply: oneshot::Sender<Result<ChunkPlan, RejectReason>>,
    },
    FinishUpdate {
        client: Pseudonym,
        conn: u64,
        round: RoundId,
        result: Result<Received, Undelivered>,
        reply: oneshot::Sender<UpdateReceipt>,
    },
    Connected {
        client: Pseudonym,
        conn: u64,
        handle: quinn::Connection,
    },
    Disconnected {
        client: Pseudonym,
        conn: u64,
        /// The link died (timeout, reset) rather than being closed.
        lost: bool,
    },
    EvalReport {
        client: Pseudonym,
        report: EvalReport,
    },
    SecAgg {
        client: Pseudonym,
        message: SecAggMessage,
        certificate: Vec<u8>,
        reply: oneshot::Sender<SecAggMessage>,
    },
    /// A leaf's root committed a new state.
    Root(Box<crate::cluster::leaf::RootNews>),
    Stop,
}

/// Why an announced update never arrived whole.
enum Undelivered {
    Rejected(RejectReason),
    /// The link failed mid-upload; the client may send it again.
    Interrupted,
    /// The client closed its connection or stream mid-upload.
    Abandoned,
}

/// What every connection task needs.
struct Shared {
    events: mpsc::Sender<Event>,
    limits: FrameLimits,
    uploads: Semaphore,
    downloads: Semaphore,
    key: Arc<PseudonymKey>,
    next_conn: AtomicU64,
    metrics: Arc<Metrics>,
    connection_limits: Arc<Limits>,
    /// A connection that says nothing holds a slot; it gets this long (the
    /// idle timeout) to say Hello.
    hello_timeout: Duration,
    /// How long one download or upload may take once it has its permit.
    transfer_timeout: Duration,
    /// Who may connect, and in which role.
    admitted: Arc<Admitted>,
    /// The files devices fetch by hash to build the model.
    assets: crate::state::assets::ServedAssets,
    /// A leaf's: which devices it serves, and the pace of check-ins.
    router: Option<crate::cluster::route::Router>,
}

/// A bound, ready server. `run` drives it until the run finishes.
pub struct Server {
    endpoint: quinn::Endpoint,
    metrics_listener: Option<std::net::TcpListener>,
    dashboard: Option<(
        crate::operator::dashboard::Listener,
        Arc<crate::operator::dashboard::Board>,
    )>,
    shared: Arc<Shared>,
    hub: Hub,
    events: mpsc::Receiver<Event>,
    /// A leaf's news from its root, fed to the hub as events.
    root_news: Option<mpsc::Receiver<crate::cluster::leaf::RootNews>>,
}

impl ServeError {
    pub(crate) fn from_io(e: std::io::Error) -> Self {
        Self::Internal(e.to_string())
    }
}

impl Server {
    /// The single-process server: it runs and commits its own rounds.
    pub fn open(dir: &StateDir) -> Result<Self, ServeError> {
        Self::open_with(dir, None)
    }

    /// A leaf aggregator: it meets devices and runs the rounds its root
    /// plans, forwarding each round's sum through `ends`.
    pub fn open_leaf(
        dir: &StateDir,
        leaf: crate::cluster::route::LeafId,
        ends: crate::cluster::leaf::LinkEnds,
    ) -> Result<Self, ServeError> {
        Self::open_with(dir, Some((leaf, ends)))
    }

    fn open_with(
        dir: &StateDir,
        leaf: Option<(
            crate::cluster::route::LeafId,
            crate::cluster::leaf::LinkEnds,
        )>,
    ) -> Result<Self, ServeError> {
        let config = dir.config()?;
        let mut settings = config.settings().map_err(DirError::from)?;
        if leaf.is_some() {
            // A leaf's own quorum, here and in its secure aggregation, is
            // the fewest devices it may release a sum of; the root holds
            // the round's.
            settings.round.quorum = settings.min_cohort.get();
            settings.round.min_clients = settings.min_cohort.get();
        }
        let store = dir.open_store()?;
        let stored_spec = store.spec()?;
        if stored_spec != settings.spec {
            return Err(ServeError::SpecChanged {
                stored: stored_spec.to_string(),
                configured: settings.spec.to_string(),
            });
        }
        store.audit_start(&dir.config_sha256()?)?;
        dir.publish_audit_key(&store)?;
        purge(&store, settings.retention)?;
        let abandoned = store.recover()?;
        if abandoned > 0 {
            warn!(
                abandoned,
                "rounds were in flight when the server last stopped; they will be retried"
            );
        }
        let key = Arc::new(
            PseudonymKey::from_bytes(&store.pseudonym_key()?)
                .map_err(|e| crate::state::store::StoreError::Corrupt(e.to_string()))?,
        );
        let queued = dir.apply_requests(&store)?;
        if !(queued.revoked.is_empty() && queued.admitted.is_empty()) {
            info!(
                revoked = queued.revoked.len(),
                enrolled = queued.admitted.len(),
                "applied queued operator requests"
            );
        }
        let now_unix = time::OffsetDateTime::now_utc().unix_timestamp();
        let admitted = Arc::new(Admitted::new(
            store
                .enrollments()?
                .into_iter()
                .filter(|e| e.revoked_unix.is_none() && e.not_after_unix > now_unix)
                .map(|e| (e.pseudonym, e.role)),
        ));
        let tls = pki::server_tls_config(
            &dir.ca_cert_pem()?,
            &dir.server_identity()?,
            admitted.clone(),
            key.clone(),
        )
        .map_err(|e| ServeError::Tls(e.to_string()))?;
        let crypto = QuicServerConfig::try_from(tls).map_err(|e| ServeError::Tls(e.to_string()))?;
        let mut server_config = quinn::ServerConfig::with_crypto(Arc::new(crypto));
        let mut transport = quinn::TransportConfig::default();
        transport
            .max_idle_timeout(Some(
                Duration::from_secs(config.server.idle_timeout_secs)
                    .try_into()
                    .map_err(|_| ServeError::Tls("idle timeout out of range".into()))?,
            ))
            .max_concurrent_bidi_streams(8u32.into())
            .max_concurrent_uni_streams(0u32.into())
            // What a client whose upload waits for a permit can park here.
            .stream_receive_window(STREAM_WINDOW.into())
            // What one model download can hold in send buffers.
            .send_window(u64::from(STREAM_WINDOW) * 2);
        server_config.transport_config(Arc::new(transport));
        let addr = config.server.listen;
        let endpoint = quinn::Endpoint::server(server_config, addr)
            .map_err(|source| ServeError::Bind { addr, source })?;

        let assets = dir.assets()?;
        // Checked before anything reads them.
        let served = crate::state::assets::ServedAssets::for_spec(&settings.spec, &assets)?;
        let test_set = match config.evaluation.test_data.as_str() {
            "" => None,
            path => Some(Arc::new(TestSet::load(
                std::path::Path::new(path),
                &settings.spec,
                &assets,
            )?)),
        };
        let version = store.current_version()?;
        let model = store.model(version)?.weights;
        let invalid_rounds = |problem: String| {
            DirError::from(crate::config::ConfigError::Invalid {
                setting: "rounds",
                problem,
            })
        };
        if leaf.is_some() {
            crate::cluster::root::check_splittable(&settings).map_err(invalid_rounds)?;
        }
        let mut machine = match &settings.buffer {
            None if leaf.is_some() => Machine::Rounds(
                Coordinator::new(
                    settings.round.clone(),
                    version,
                    store.next_round()?,
                    config.rounds.selection_seed ^ version.0,
                )
                .map_err(|e| invalid_rounds(e.to_string()))?
                .follow_root(),
            ),
            None => Machine::Rounds(
                Coordinator::new(
                    settings.round.clone(),
                    version,
                    store.next_round()?,
                    config.rounds.selection_seed ^ version.0,
                )
                .map_err(|e| invalid_rounds(e.to_string()))?,
            ),
            Some(buffer) => Machine::Buffered(
                Buffered::new(buffer.clone(), version, store.next_round()?)
                    .map_err(|e| invalid_rounds(e.to_string()))?,
            ),
        };
        let privacy = match settings.dp {
            None => None,
            Some(dp) => {
                let ledger = store
                    .privacy_ledger()?
                    .unwrap_or_else(|| PrivacyLedger::new(dp.initial_clip));
                let cap = settings.round.target_version.0.saturating_sub(version.0);
                let left = ledger.rounds_left(&dp, cap);
                // A leaf's root holds the ledger and ends the run.
                if leaf.is_none() {
                    machine.limit_rounds(left);
                }
                info!(
                    epsilon_spent = ledger.epsilon(&dp),
                    rounds_left = left,
                    "differential privacy on; the budget admits {left} more rounds"
                );
                if let DpMode::Distributed(plan) = dp.mode
                    && settings.secagg.is_none()
                {
                    warn!(
                        bits = plan.quantizer.bits,
                        client_sigma = plan.client_sigma,
                        "distributed DP without secure aggregation: this server receives each client's noised update, so the guarantee holds against everyone who sees only released models, not against this server"
                    );
                }
                let rng = NoiseRng::from_os().map_err(|e| ServeError::Noise(e.to_string()))?;
                Some(Privacy {
                    dp,
                    ledger,
                    rng: Arc::new(std::sync::Mutex::new(rng)),
                })
            }
        };
        let metrics_listener = match config.metrics.listen {
            None => None,
            Some(addr) => Some(
                crate::operator::metrics::bind(addr)
                    .map_err(|source| ServeError::MetricsBind { addr, source })?,
            ),
        };
        let metrics = Arc::new(Metrics::new());
        metrics.model_version.set(version.0 as i64);
        metrics
            .target_version
            .set(settings.round.target_version.0 as i64);
        metrics.round_timeout.set(config.rounds.round_timeout_secs);
        metrics.committed_now(None);
        metrics.min_cohort.set(settings.min_cohort.get() as i64);
        if let Some(dp) = &settings.dp {
            metrics.epsilon_target.set(dp.target_epsilon.get());
        }
        let store = Arc::new(store);
        let logins = Arc::new(crate::operator::dashboard::LoginBook::load(
            store.clone(),
            admitted.clone(),
        )?);
        let (board, live) = crate::operator::dashboard::live::Publisher::new();
        let dashboard = match config.dashboard.enabled {
            false => None,
            true => {
                let identity = match (&config.dashboard.certificate, &config.dashboard.key) {
                    (Some(cert), Some(key)) => {
                        let read = |path: &std::path::Path| {
                            std::fs::read_to_string(path).map_err(|e| {
                                ServeError::Tls(format!("dashboard: {}: {e}", path.display()))
                            })
                        };
                        crate::admission::pki::ServerIdentity {
                            cert_pem: read(cert)?,
                            key_pem: read(key)?,
                        }
                    }
                    (None, None) => dir.server_identity()?,
                    _ => {
                        return Err(ServeError::Tls(
                            "dashboard: set both certificate and key, or neither".into(),
                        ));
                    }
                };
                let listener =
                    crate::operator::dashboard::bind(config.dashboard.listen, &identity)?;
                let facts = crate::operator::dashboard::Facts {
                    model: settings.spec.to_string(),
                    parameters: settings.spec.param_count(),
                    language_model: settings.spec.as_language().is_some(),
                    target_version: settings.round.target_version.0,
                    mode: if settings.buffer.is_some() {
                        "fedbuff"
                    } else {
                        "rounds"
                    },
                    secure_aggregation: settings.secagg.is_some(),
                    epsilon_target: settings.dp.as_ref().map(|d| d.target_epsilon.get()),
                    delta: settings.dp.as_ref().map(|d| d.delta.get()),
                    min_cohort: settings.min_cohort.get(),
                };
                let board = Arc::new(crate::operator::dashboard::Board::new(
                    store.clone(),
                    metrics.clone(),
                    logins.clone(),
                    live,
                    facts,
                ));
                Some((listener, board))
            }
        };
        if let Some(p) = &privacy {
            metrics.epsilon.set(p.ledger.epsilon(&p.dp));
        }
        let (tx, rx) = mpsc::channel(1024);
        let shared = Arc::new(Shared {
            events: tx,
            limits: FrameLimits {
                max_frame: config.server.max_frame_bytes,
            },
            uploads: Semaphore::new(config.server.max_concurrent_uploads),
            downloads: Semaphore::new(config.server.max_concurrent_uploads),
            key,
            next_conn: AtomicU64::new(1),
            metrics: metrics.clone(),
            connection_limits: Arc::new(Limits::new(&config.server)),
            hello_timeout: Duration::from_secs(config.server.idle_timeout_secs),
            transfer_timeout: Duration::from_secs_f64(config.server.transfer_timeout_secs),
            admitted: admitted.clone(),
            assets: served,
            router: leaf.as_ref().map(|(_, ends)| ends.router.clone()),
        });
        let hub = Hub {
            machine,
            package: None,
            committer: Committer::new(
                model,
                store.optimizer_state()?,
                privacy,
                test_set,
                store.clone(),
            ),
            store,
            board,
            settings,
            chunk_len: config.training.chunk_len,
            devices: Devices::default(),
            round: None,
            finished: None,
            rng: ChaCha8Rng::seed_from_u64(config.rounds.selection_seed.wrapping_add(version.0)),
            summary: RunSummary::default(),
            status_path: dir.status_path(),
            registry: Registry {
                admitted,
                logins,
                dir: StateDir::new(dir.root()),
            },
            evaluation: None,
            secagg: None,
            metrics,
            upstream: leaf
                .as_ref()
                .map(|(id, ends)| Upstream::new(id.clone(), ends)),
        };
        Ok(Self {
            endpoint,
            metrics_listener,
            dashboard,
            shared,
            hub,
            events: rx,
            root_news: leaf.map(|(_, ends)| ends.news),
        })
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.endpoint.local_addr()
    }

    /// Where the Prometheus endpoint listens, when configured.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_listener
            .as_ref()
            .and_then(|l| l.local_addr().ok())
    }

    /// The dashboard's address for a browser, when it is on.
    pub fn dashboard_url(&self) -> Option<String> {
        self.dashboard.as_ref().and_then(|(l, _)| l.url().ok())
    }

    /// Commits as they happen; a slow subscriber misses old notices.
    pub fn subscribe(&self) -> tokio::sync::broadcast::Receiver<CommitNotice> {
        self.hub.committer.commits.subscribe()
    }

    /// Who may connect: a leaf applies the cluster's revocations to it.
    pub fn admitted(&self) -> Arc<Admitted> {
        self.shared.admitted.clone()
    }

    pub fn stopper(&self) -> Stopper {
        Stopper(self.shared.events.clone())
    }

    /// Serves until the run reaches its target version.
    pub async fn run(self) -> Result<RunSummary, ServeError> {
        let Self {
            endpoint,
            metrics_listener,
            dashboard,
            shared,
            hub,
            events,
            root_news,
        } = self;
        let news_task = root_news.map(|mut news| {
            let events = shared.events.clone();
            tokio::spawn(async move {
                while let Some(n) = news.recv().await {
                    if events.send(Event::Root(Box::new(n))).await.is_err() {
                        return;
                    }
                }
            })
        });
        let dashboard_task = match dashboard {
            None => None,
            Some((listener, board)) => {
                let url = listener
                    .url()
                    .map_err(|e| ServeError::Internal(format!("dashboard: {e}")))?;
                let path = hub.registry.dir.root().join("dashboard.url");
                // Logs carry no addresses: the port, and where the URL is.
                let port = listener.local_addr().map(|a| a.port()).unwrap_or(0);
                info!(
                    port,
                    "dashboard listening; its URL is in {}",
                    path.display()
                );
                if let Err(e) = std::fs::write(&path, format!("{url}\n")) {
                    warn!("cannot write {}: {e}", path.display());
                }
                Some(tokio::spawn(crate::operator::dashboard::serve(
                    listener, board,
                )))
            }
        };
        let metrics_task = match metrics_listener {
            None => None,
            Some(listener) => {
                let listener = tokio::net::TcpListener::from_std(listener)
                    .map_err(|e| ServeError::Internal(format!("metrics endpoint: {e}")))?;
                if let Ok(addr) = listener.local_addr() {
                    info!(%addr, "metrics endpoint listening");
                }
                Some(tokio::spawn(crate::operator::metrics::serve(
                    listener,
                    shared.metrics.clone(),
                )))
            }
        };
        info!(
            version = %hub.machine.version(),
            "serving; waiting for clients"
        );
        hub.write_status();
        let accept = tokio::spawn(accept_loop(endpoint.clone(), shared.clone()));
        let result = hub.run(events, shared.clone()).await;
        accept.abort();
        if let Some(task) = news_task {
            task.abort();
        }
        if let Some(task) = metrics_task {
            task.abort();
        }
        if let Some(task) = dashboard_task {
            task.abort();
        }
        endpoint.close(VarInt::from_u32(CloseCode::Done as u32), b"run finished");
        let _ = tokio::time::timeout(Duration::from_secs(2), endpoint.wait_idle()).await;
        let mut summary = result?;
        summary.bytes_up = shared.metrics.bytes_in.get();
        summary.bytes_down = shared.metrics.bytes_out.get();
        summary.peak_rss_bytes = peak_rss_bytes();
        summary.cpu_seconds = cpu_seconds();
        Ok(summary)
    }
}

/// Applies the retention policy now.
fn purge(store: &Store, retention: Retention) -> Result<(), crate::state::store::StoreError> {
    if retention.is_forever() {
        return Ok(());
    }
    let purged = store.purge(retention, unix_ms_now())?;
    if !purged.is_empty() {
        info!(
            rounds = purged.rounds.len(),
            versions = purged.versions.len(),
            "retention purged old records"
        );
    }
    Ok(())
}

/// The event loop's state: the scheduler, and one owner for each part a
/// round touches (devices, the commit, secure aggregation, evaluation).
struct Hub {
    settings: Settings,
    chunk_len: u32,
    store: Arc<Store>,

    // The round driver (the root's): the scheduler, the task it hands out,
    // and when the run finished.
    machine: Machine,
    /// The task of the round (or FedBuff buffer) in progress.
    package: Option<Arc<TaskPackage>>,
    /// Task seeds.
    rng: ChaCha8Rng,
    finished: Option<Instant>,
    /// The model, the optimizer and the ledger a commit changes.
    committer: Committer,

    // A leaf's: connections, the round's partial aggregate, and its secure
    // aggregation.
    devices: Devices,
    round: Option<RoundInProgress>,
    secagg: Option<SecAggRound>,

    /// A leaf's link to its root; `None` in the single-process server.
    upstream: Option<Upstream>,

    // Admin and renewal, and federated evaluation on request.
    registry: Registry,
    evaluation: Option<PendingEval>,

    // What the run shows: the summary `run` returns, the status snapshot,
    // Prometheus, and the dashboard's view of the hub's memory.
    summary: RunSummary,
    status_path: std::path::PathBuf,
    metrics: Arc<Metrics>,
    board: crate::operator::dashboard::live::Publisher,
}

/// Central DP's check on an update's norm: one above the clip (beyond what
/// encoding rounding explains) was not clipped by its client and is
/// refused; the rest is clipped exactly, so the sum's sensitivity is the clip.
fn clip_received(values: &mut [f32], clip: ClipNorm) -> Result<(), RejectReason> {
    if l2_norm(values) > clip.get() * (1.0 + CLIP_SLACK) {
        return Err(RejectReason::ClipExceeded);
    }
    clip_l2(values, clip);
    Ok(())
}

/// Relative excess over the clip that f16/bf16/int8 rounding may add.
const CLIP_SLACK: f64 = 0.01;

/// Per-stream flow-control window, in bytes: with permits on transfers it
/// bounds server memory to O(permits × model + connections × window).
const STREAM_WINDOW: u32 = 512 * 1024;

/// How often a running server looks for operator requests in `control/`.
const CONTROL_POLL: Duration = Duration::from_secs(1);

/// How long a finished run waits for clients to hear that it finished.
const FINISH_GRACE: Duration = Duration::from_secs(3);
