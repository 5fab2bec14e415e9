//! The QUIC driver: moves bytes between connections and the round state
//! machine, and carries out its actions (send tasks, aggregate, commit).
//!
//! One task, the hub, owns the state machine, the running aggregate and the
//! store; connection tasks talk to it over a channel. Nothing here decides
//! *whether* a round starts or ends: `covey_protocol::round` does.

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
    admin::{AdminReply, AdminRequest, AdminResponse, MAX_REQUEST_BYTES, Role},
    aggregate::{OptimizerState, WeightedSum},
    audit::AuditEvent,
    central::TestSet,
    compliance::Retention,
    config::Settings,
    dir::{DirError, EvalOutcome, StateDir, VersionMetrics},
    dp::{DpMode, DpSettings, PrivacyLedger},
    limits::Limits,
    metrics::{Metrics, OpenConnection, Outcome, Reason},
    pki::{self, Admitted},
    report::ComplianceReport,
    robust::Aggregator,
    schedule::Machine,
    status,
    status::Report,
    store::{ModelHeader, RoundOutcome, RoundRecord, Store, StoredModel, unix_ms_now},
};

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
    #[error("cannot listen for the dashboard on {addr}: {source}")]
    DashboardBind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("TLS setup: {0}")]
    Tls(String),
    #[error("the database was created for a {stored} model but config.toml asks for {configured}")]
    SpecChanged { stored: String, configured: String },
    #[error(transparent)]
    TestSet(#[from] crate::central::TestSetError),
    #[error(transparent)]
    Assets(#[from] crate::assets::ServedAssetError),
    #[error("noise source: {0}")]
    Noise(String),
    #[error("internal error: {0}")]
    Internal(String),
    #[error("storing state failed, stopping so nothing is lost: {0}")]
    Store(#[from] crate::store::StoreError),
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
    assets: crate::assets::ServedAssets,
}

/// A bound, ready server. `run` drives it until the run finishes.
pub struct Server {
    endpoint: quinn::Endpoint,
    metrics_listener: Option<std::net::TcpListener>,
    dashboard: Option<(crate::dashboard::Listener, Arc<crate::dashboard::Board>)>,
    shared: Arc<Shared>,
    hub: Hub,
    events: mpsc::Receiver<Event>,
}

impl Server {
    pub fn open(dir: &StateDir) -> Result<Self, ServeError> {
        let config = dir.config()?;
        let settings = config.settings().map_err(DirError::from)?;
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
                .map_err(|e| crate::store::StoreError::Corrupt(e.to_string()))?,
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
        let served = crate::assets::ServedAssets::for_spec(&settings.spec, &assets)?;
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
        let mut machine = match &settings.buffer {
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
                machine.limit_rounds(left);
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
                crate::metrics::bind(addr)
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
        let logins = Arc::new(crate::dashboard::LoginBook::load(
            store.clone(),
            admitted.clone(),
        )?);
        let (board, live) = crate::dashboard::live::Publisher::new();
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
                        crate::pki::ServerIdentity {
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
                let listener = crate::dashboard::bind(config.dashboard.listen, &identity)?;
                let facts = crate::dashboard::Facts {
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
                let board = Arc::new(crate::dashboard::Board::new(
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
        });
        let hub = Hub {
            machine,
            package: None,
            optimizer_state: store.optimizer_state()?,
            store,
            board,
            logins,
            settings,
            chunk_len: config.training.chunk_len,
            model: Arc::new(model),
            waiters: HashMap::new(),
            live: HashMap::new(),
            uploads: HashMap::new(),
            round: None,
            finished: None,
            rng: ChaCha8Rng::seed_from_u64(config.rounds.selection_seed.wrapping_add(version.0)),
            summary: RunSummary::default(),
            status_path: dir.status_path(),
            commits: tokio::sync::broadcast::channel(16).0,
            admitted,
            state_root: dir.root().to_path_buf(),
            test_set,
            evaluation: None,
            privacy,
            secagg: None,
            metrics,
        };
        Ok(Self {
            endpoint,
            metrics_listener,
            dashboard,
            shared,
            hub,
            events: rx,
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
        self.hub.commits.subscribe()
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
        } = self;
        let dashboard_task = match dashboard {
            None => None,
            Some((listener, board)) => {
                let url = listener
                    .url()
                    .map_err(|e| ServeError::Internal(format!("dashboard: {e}")))?;
                info!(%url, "dashboard listening");
                let path = hub.state_root.join("dashboard.url");
                if let Err(e) = std::fs::write(&path, format!("{url}\n")) {
                    warn!("cannot write {}: {e}", path.display());
                }
                Some(tokio::spawn(crate::dashboard::serve(listener, board)))
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
                Some(tokio::spawn(crate::metrics::serve(
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

async fn accept_loop(endpoint: quinn::Endpoint, shared: Arc<Shared>) {
    while let Some(incoming) = endpoint.accept().await {
        // Refusing before the handshake costs one packet, not a TLS exchange.
        let slot = match shared.connection_limits.admit() {
            Ok(slot) => slot,
            Err(refusal) => {
                shared.metrics.refuse_connection(refusal.as_str());
                incoming.refuse();
                continue;
            }
        };
        if shared.connection_limits.under_pressure() && !incoming.remote_address_validated() {
            // A spoofed source never answers the retry, so floods from
            // forged addresses cost no handshake.
            if incoming.retry().is_err() {
                shared
                    .metrics
                    .refuse_connection(crate::metrics::ADDRESS_VALIDATION_FAILED);
            }
            continue;
        }
        let shared = shared.clone();
        tokio::spawn(async move {
            let _slot = slot;
            let conn = match incoming.await {
                Ok(conn) => conn,
                Err(e) => {
                    // No address in the log: the refusal reason is enough.
                    info!("handshake refused: {e}");
                    shared
                        .metrics
                        .refuse_connection(crate::metrics::HANDSHAKE_FAILED);
                    return;
                }
            };
            let Some(client) = peer_pseudonym(&conn, &shared.key) else {
                close(&conn, CloseCode::ProtocolViolation, "no client certificate");
                return;
            };
            let _client_slot = match shared.connection_limits.admit_client(client) {
                Ok(slot) => slot,
                Err(refusal) => {
                    debug!(client = %client, "refused: {refusal}");
                    shared.metrics.refuse_connection(refusal.as_str());
                    close(&conn, CloseCode::Busy, refusal.as_str());
                    return;
                }
            };
            let _open = OpenConnection::new(shared.metrics.clone());
            let role = shared.admitted.role(&client).unwrap_or_default();
            let admin_alpn = conn
                .handshake_data()
                .and_then(|d| d.downcast::<quinn::crypto::rustls::HandshakeData>().ok())
                .and_then(|d| d.protocol)
                .is_some_and(|p| p == ADMIN_ALPN);
            match (admin_alpn, role) {
                (true, Role::Device) => {
                    close(
                        &conn,
                        CloseCode::Revoked,
                        "a device certificate has no operator role",
                    );
                    return;
                }
                (true, role) => {
                    let span = info_span!("operator", client = %client, %role);
                    serve_admin(conn, client, role, shared)
                        .instrument(span)
                        .await;
                    return;
                }
                (false, Role::Device) => {}
                (false, _) => {
                    close(
                        &conn,
                        CloseCode::Revoked,
                        "operator certificates cannot train",
                    );
                    return;
                }
            }
            let id = shared.next_conn.fetch_add(1, Ordering::Relaxed);
            let span = info_span!("client", client = %client);
            serve_connection(conn, client, id, shared)
                .instrument(span)
                .await;
        });
    }
}

/// The operator API: one JSON request per stream, answered on it.
async fn serve_admin(conn: quinn::Connection, actor: Pseudonym, role: Role, shared: Arc<Shared>) {
    while let Ok((mut send, mut recv)) = conn.accept_bi().await {
        let response = match recv.read_to_end(MAX_REQUEST_BYTES).await {
            Err(e) => AdminResponse::Refused {
                reason: format!("request unreadable or over {MAX_REQUEST_BYTES} bytes: {e}"),
            },
            Ok(body) => match serde_json::from_slice::<AdminRequest>(&body) {
                Err(e) => AdminResponse::Refused {
                    reason: format!("not an operator request: {e}"),
                },
                Ok(request) => {
                    let asked = ask(&shared, |reply| Event::Admin {
                        actor,
                        role,
                        request,
                        reply,
                    })
                    .await;
                    asked.unwrap_or(AdminResponse::Refused {
                        reason: "the server is stopping".into(),
                    })
                }
            },
        };
        let body = serde_json::to_vec(&response).unwrap_or_default();
        if send.write_all(&body).await.is_err() {
            break;
        }
        let _ = send.finish();
    }
}

/// Applies the retention policy now.
fn purge(store: &Store, retention: Retention) -> Result<(), crate::store::StoreError> {
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

fn peer_pseudonym(conn: &quinn::Connection, key: &PseudonymKey) -> Option<Pseudonym> {
    peer_certificate(conn).map(|c| key.pseudonym_of(&c))
}

fn peer_certificate(conn: &quinn::Connection) -> Option<CertificateDer<'static>> {
    let identity = conn.peer_identity()?;
    let certs = identity.downcast::<Vec<CertificateDer<'static>>>().ok()?;
    certs.first().cloned()
}

fn close(conn: &quinn::Connection, code: CloseCode, reason: &str) {
    conn.close(VarInt::from_u32(code as u32), reason.as_bytes());
}

/// A reason to close one client's connection.
#[derive(Debug)]
struct PeerFault {
    code: CloseCode,
    reason: String,
}

impl PeerFault {
    fn new(code: CloseCode, reason: impl Into<String>) -> Self {
        Self {
            code,
            reason: reason.into(),
        }
    }
}

fn stream_fault(e: &StreamError) -> Option<PeerFault> {
    let code = match e {
        StreamError::Io(_) => return None,
        StreamError::Frame(FrameError::TooLarge { .. }) => CloseCode::FrameTooLarge,
        StreamError::Frame(_) | StreamError::Truncated => CloseCode::MalformedFrame,
        StreamError::Unexpected { .. } => CloseCode::ProtocolViolation,
        StreamError::Tensor(_) => CloseCode::ShapeMismatch,
    };
    Some(PeerFault::new(code, e.to_string()))
}

async fn serve_connection(
    conn: quinn::Connection,
    client: Pseudonym,
    id: u64,
    shared: Arc<Shared>,
) {
    let hello_timeout = shared.hello_timeout;
    let handshake = tokio::time::timeout(hello_timeout, handshake(&conn, &shared));
    match handshake.await.unwrap_or_else(|_| {
        Err(Some(PeerFault::new(
            CloseCode::ProtocolViolation,
            format!("no Hello within {}s", hello_timeout.as_secs()),
        )))
    }) {
        Ok(()) => {}
        Err(Some(fault)) => {
            warn!(code = ?fault.code, "closing connection: {}", fault.reason);
            close(&conn, fault.code, &fault.reason);
            return;
        }
        Err(None) => return,
    }
    debug!("connected");
    shared.metrics.connections_accepted.inc();
    let _ = shared
        .events
        .send(Event::Connected {
            client,
            conn: id,
            handle: conn.clone(),
        })
        .await;
    let mut streams = tokio::task::JoinSet::new();
    loop {
        tokio::select! {
            accepted = conn.accept_bi() => {
                let Ok((send, recv)) = accepted else { break };
                if let Err(refusal) = shared.connection_limits.allow_request(client) {
                    warn!("closing connection: {refusal}");
                    shared.metrics.refuse_connection(refusal.as_str());
                    close(&conn, CloseCode::Busy, refusal.as_str());
                    break;
                }
                let (conn2, shared2) = (conn.clone(), shared.clone());
                streams.spawn(async move {
                    if let Err(fault) = serve_stream(&conn2, send, recv, client, id, &shared2).await {
                        warn!(code = ?fault.code, "closing connection: {}", fault.reason);
                        close(&conn2, fault.code, &fault.reason);
                    }
                }.in_current_span());
            }
            Some(_) = streams.join_next(), if !streams.is_empty() => {}
        }
    }
    streams.shutdown().await;
    debug!("disconnected");
    let lost = link_lost(&conn);
    let _ = shared
        .events
        .send(Event::Disconnected {
            client,
            conn: id,
            lost,
        })
        .await;
}

/// A link that died (timeout, reset) may come back; a peer that closed its
/// connection or stream meant to leave.
fn link_lost(conn: &quinn::Connection) -> bool {
    matches!(
        conn.close_reason(),
        Some(quinn::ConnectionError::TimedOut | quinn::ConnectionError::Reset)
    )
}

/// The first stream: `Hello` → `Welcome`, or a clear refusal.
async fn handshake(conn: &quinn::Connection, shared: &Shared) -> Result<(), Option<PeerFault>> {
    let (mut send, mut recv) = conn.accept_bi().await.map_err(|_| None)?;
    let hello = match read_message(&mut recv, shared.limits).await {
        Ok(Message::Hello(h)) => h,
        Ok(other) => {
            return Err(Some(PeerFault::new(
                CloseCode::ProtocolViolation,
                format!("expected Hello, got {}", other.kind()),
            )));
        }
        Err(e) => return Err(stream_fault(&e)),
    };
    if hello.protocol != PROTOCOL_VERSION {
        let detail = format!(
            "incompatible protocol: this server speaks version {PROTOCOL_VERSION}, the client version {}",
            hello.protocol
        );
        let _ = write_message(
            &mut send,
            &Message::Error(ErrorReport {
                code: CloseCode::IncompatibleVersion,
                detail: detail.clone(),
            }),
        )
        .await;
        let _ = send.finish();
        let _ = tokio::time::timeout(Duration::from_secs(1), send.stopped()).await;
        return Err(Some(PeerFault::new(CloseCode::IncompatibleVersion, detail)));
    }
    let welcome = Message::Welcome(Welcome {
        protocol: PROTOCOL_VERSION,
        software: format!("covey-server {}", env!("CARGO_PKG_VERSION")),
    });
    write_message(&mut send, &welcome).await.map_err(|_| None)?;
    let _ = send.finish();
    Ok(())
}

/// Sends `head` and then each model as f32 chunks, holding a download
/// permit until the device has acknowledged every byte, so the permits
/// bound what sits in send buffers, not just what is being written. A
/// device that stops reading is cut off after the transfer timeout.
async fn send_models(
    send: &mut quinn::SendStream,
    conn: &quinn::Connection,
    shared: &Shared,
    head: &Message,
    models: &[&[f32]],
    plan: ChunkPlan,
) -> Result<(), PeerFault> {
    let _permit = shared.downloads.acquire().await;
    let download = async {
        // Models go out as f32, which draws no randomness.
        let mut rng = ChaCha8Rng::seed_from_u64(0);
        let sent = async {
            let mut n = write_message(send, head).await?;
            for model in models {
                n += write_tensor(send, model, plan, UpdateEncoding::F32, &mut rng).await?;
            }
            Ok::<u64, StreamError>(n)
        }
        .await;
        if let Ok(n) = sent {
            shared.metrics.bytes_out.inc_by(n);
        }
        let _ = send.finish();
        tokio::select! {
            _ = send.stopped() => {}
            _ = conn.closed() => {}
        }
    };
    tokio::time::timeout(shared.transfer_timeout, download)
        .await
        .map_err(|_| {
            PeerFault::new(
                CloseCode::ProtocolViolation,
                format!(
                    "model not received within {}s",
                    shared.transfer_timeout.as_secs_f64()
                ),
            )
        })
}

async fn ask<T>(shared: &Shared, make: impl FnOnce(oneshot::Sender<T>) -> Event) -> Option<T> {
    let (tx, rx) = oneshot::channel();
    shared.events.send(make(tx)).await.ok()?;
    rx.await.ok()
}

async fn serve_stream(
    conn: &quinn::Connection,
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
    client: Pseudonym,
    conn_id: u64,
    shared: &Shared,
) -> Result<(), PeerFault> {
    let first = match read_message(&mut recv, shared.limits).await {
        Ok(m) => m,
        Err(e) => return stream_fault(&e).map_or(Ok(()), Err),
    };
    match first {
        Message::CheckIn => {
            let waiting = ask(shared, |reply| Event::CheckIn {
                client,
                conn: conn_id,
                reply,
            });
            let assignment = tokio::select! {
                a = waiting => a,
                _ = conn.closed() => None,
            };
            match assignment {
                Some(Assignment::Task(pkg)) => {
                    let plan = ChunkPlan::new(pkg.model.len(), pkg.task.chunk_len);
                    let head = Message::Task(pkg.task.clone());
                    send_models(
                        &mut send,
                        conn,
                        shared,
                        &head,
                        &[pkg.model.as_slice()],
                        plan,
                    )
                    .await?;
                }
                Some(Assignment::Evaluate(pkg)) => {
                    let plan = ChunkPlan::new(pkg.task.spec.param_count(), pkg.task.chunk_len);
                    let head = Message::Evaluate(pkg.task.clone());
                    let models: Vec<&[f32]> = pkg.models.iter().map(|m| m.as_slice()).collect();
                    send_models(&mut send, conn, shared, &head, &models, plan).await?;
                }
                Some(Assignment::Finished(version)) => {
                    let _ = write_message(
                        &mut send,
                        &Message::RunFinished {
                            final_version: version,
                        },
                    )
                    .await;
                }
                None => {}
            }
            let _ = send.finish();
            Ok(())
        }
        Message::Update(header) => {
            let round = header.round;
            let num_examples = header.num_examples;
            let loss = header.metrics.loss;
            let within_clip = header.within_clip;
            let payload = header.payload;
            let Some(decision) = ask(shared, |reply| Event::BeginUpdate {
                client,
                conn: conn_id,
                header,
                reply,
            })
            .await
            else {
                return Ok(());
            };
            let plan = match decision {
                Ok(plan) => plan,
                Err(RejectReason::ShapeMismatch) => {
                    return Err(PeerFault::new(
                        CloseCode::ShapeMismatch,
                        "update header does not match the task's model or encoding",
                    ));
                }
                Err(reason) => {
                    let _ = recv.stop(VarInt::from_u32(0));
                    let _ = write_message(
                        &mut send,
                        &Message::UpdateReceipt(UpdateReceipt::Rejected(reason)),
                    )
                    .await;
                    let _ = send.finish();
                    return Ok(());
                }
            };
            // Bounds how many model-sized buffers exist at once; the client
            // sends nothing until it has one.
            let permit = shared.uploads.acquire().await;
            let limits = FrameLimits {
                max_frame: shared.limits.max_frame,
            };
            let go = write_message(&mut send, &Message::SendUpdate).await;
            let reading = async {
                match payload {
                    _ if go.is_err() => Err(StreamError::Io(std::io::Error::other(
                        "stream closed before the update was sent",
                    ))),
                    Payload::Floats(encoding) => read_tensor(&mut recv, plan, encoding, limits)
                        .await
                        .map(|v| (Values::Floats(v), plan.wire_bytes(encoding))),
                    Payload::Ring { bits } => read_words(&mut recv, plan, bits, limits)
                        .await
                        .map(|w| (Values::Words(w), plan.ring_wire_bytes())),
                }
            };
            // A device that stalls must not keep the slot from the others.
            let Ok(read) = tokio::time::timeout(shared.transfer_timeout, reading).await else {
                drop(permit);
                let _ = ask(shared, |reply| Event::FinishUpdate {
                    client,
                    conn: conn_id,
                    round,
                    result: Err(Undelivered::Abandoned),
                    reply,
                })
                .await;
                return Err(PeerFault::new(
                    CloseCode::ProtocolViolation,
                    format!(
                        "update not sent within {}s",
                        shared.transfer_timeout.as_secs_f64()
                    ),
                ));
            };
            drop(permit);
            let (result, fault) = match read {
                Ok((values, bytes)) => {
                    shared.metrics.bytes_in.inc_by(bytes);
                    (
                        Ok(Received {
                            values,
                            num_examples,
                            loss,
                            within_clip,
                        }),
                        None,
                    )
                }
                Err(StreamError::Tensor(AssembleError::NonFinite { index })) => {
                    warn!(chunk = index, "rejected an update with non-finite values");
                    let _ = recv.stop(VarInt::from_u32(0));
                    (Err(Undelivered::Rejected(RejectReason::NonFinite)), None)
                }
                Err(StreamError::Io(_)) if link_lost(conn) => (Err(Undelivered::Interrupted), None),
                Err(StreamError::Io(_)) => (Err(Undelivered::Abandoned), None),
                Err(e) => (
                    Err(Undelivered::Rejected(RejectReason::ShapeMismatch)),
                    stream_fault(&e),
                ),
            };
            let receipt = ask(shared, |reply| Event::FinishUpdate {
                client,
                conn: conn_id,
                round,
                result,
                reply,
            })
            .await;
            if let Some(fault) = fault {
                return Err(fault);
            }
            if let Some(receipt) = receipt {
                let _ = write_message(&mut send, &Message::UpdateReceipt(receipt)).await;
            }
            let _ = send.finish();
            Ok(())
        }
        Message::EvalReport(report) => {
            let _ = shared
                .events
                .send(Event::EvalReport { client, report })
                .await;
            let _ = send.finish();
            Ok(())
        }
        Message::SecAgg(message) => {
            let certificate = peer_certificate(conn)
                .map(|c| c.to_vec())
                .unwrap_or_default();
            let waiting = ask(shared, |reply| Event::SecAgg {
                client,
                message,
                certificate,
                reply,
            });
            let answer = tokio::select! {
                a = waiting => a,
                _ = conn.closed() => None,
            };
            if let Some(answer) = answer {
                let _ = write_message(&mut send, &Message::SecAgg(answer)).await;
            }
            let _ = send.finish();
            Ok(())
        }
        Message::Renew(request) => {
            let certificate = peer_certificate(conn)
                .map(|c| c.to_vec())
                .unwrap_or_default();
            let answer = ask(shared, |reply| Event::Renew {
                client,
                request,
                certificate,
                reply,
            })
            .await;
            let message = match answer {
                Some(Ok(renewed)) => Message::Renewed(renewed),
                Some(Err(detail)) => Message::Error(ErrorReport {
                    code: CloseCode::ProtocolViolation,
                    detail,
                }),
                None => return Ok(()),
            };
            let _ = write_message(&mut send, &message).await;
            let _ = send.finish();
            Ok(())
        }
        Message::FetchAsset(request) => {
            let _permit = shared.downloads.acquire().await;
            match crate::assets::serve(&mut send, &shared.assets, request, shared.transfer_timeout)
                .await
            {
                Ok(bytes) => {
                    shared.metrics.bytes_out.inc_by(bytes);
                }
                Err(refusal) => debug!("asset not sent: {}", refusal.0),
            }
            let _ = send.finish();
            Ok(())
        }
        other => Err(PeerFault::new(
            CloseCode::ProtocolViolation,
            format!("unexpected {} at the start of a stream", other.kind()),
        )),
    }
}

/// The running aggregate of a round.
enum Aggregate {
    Weighted(WeightedSum),
    /// Distributed DP: the modular sum of ring words.
    Ring {
        sum: Vec<u32>,
        count: usize,
    },
    /// A robust rule: every update of the round, with its weight.
    Buffered {
        updates: Vec<Vec<f32>>,
        weights: Vec<f64>,
    },
}

impl Aggregate {
    /// How many participants' updates are in it.
    fn contributors(&self) -> usize {
        match self {
            Self::Weighted(sum) => sum.count(),
            Self::Ring { count, .. } => *count,
            Self::Buffered { updates, .. } => updates.len(),
        }
    }
}

struct RoundInProgress {
    record: RoundRecord,
    sum: Aggregate,
    loss_weighted: f64,
    examples: f64,
    /// Accepted updates that were within the clip before clipping (DP).
    within_clip: usize,
    bytes_up_start: u64,
    bytes_down_start: u64,
    started: Instant,
}

/// Owns the state machine and everything a commit touches.
struct Hub {
    machine: Machine,
    /// The task of the round (or FedBuff buffer) in progress.
    package: Option<Arc<TaskPackage>>,
    store: Arc<Store>,
    settings: Settings,
    chunk_len: u32,
    model: Arc<Vec<f32>>,
    optimizer_state: OptimizerState,
    waiters: HashMap<Pseudonym, (u64, oneshot::Sender<Assignment>)>,
    /// The latest connection of each connected client.
    live: HashMap<Pseudonym, (u64, quinn::Connection)>,
    /// The connection each update being read arrives on.
    uploads: HashMap<Pseudonym, u64>,
    round: Option<RoundInProgress>,
    finished: Option<Instant>,
    rng: ChaCha8Rng,
    summary: RunSummary,
    status_path: std::path::PathBuf,
    commits: tokio::sync::broadcast::Sender<CommitNotice>,
    /// Shared with the TLS verifier: removing a pseudonym refuses it at
    /// the next handshake.
    admitted: Arc<Admitted>,
    state_root: std::path::PathBuf,
    /// Held-out data every new version is evaluated on, if configured.
    test_set: Option<Arc<TestSet>>,
    evaluation: Option<PendingEval>,
    /// Central DP: settings, what was spent, and the noise source.
    privacy: Option<Privacy>,
    /// The round's secure aggregation, when on.
    secagg: Option<SecAggRound>,
    metrics: Arc<Metrics>,
    /// What the dashboard shows of the hub's memory.
    board: crate::dashboard::live::Publisher,
    /// Dashboard logins, issued over the operator API.
    logins: Arc<crate::dashboard::LoginBook>,
}

/// Secure aggregation of the round in progress: the session, the clients
/// waiting for the current phase to close, and the commit it holds back.
struct SecAggRound {
    round: RoundId,
    /// When the current phase opened, for its timing.
    phase_started: Instant,
    session: Session<Pseudonym>,
    waiters: HashMap<Pseudonym, oneshot::Sender<SecAggMessage>>,
    /// When the current phase stops waiting for stragglers.
    deadline: Instant,
    /// How long each key phase and the unmask phase wait.
    phase_timeout: Duration,
    requests: HashMap<Pseudonym, UnmaskRequest>,
    /// The coordinator's commit, held until the masks are removed.
    commit: Option<(ModelVersion, ModelVersion, RoundStats)>,
}

impl SecAggRound {
    fn abort_all(&mut self, reason: &str) {
        abort_waiters(self.round, self.waiters.drain().map(|(_, tx)| tx), reason);
    }

    /// When the hub must look at the session again. Masked input has no
    /// deadline of its own: the round's deadline (the coordinator's) ends it.
    fn wake(&self) -> Option<Instant> {
        (self.session.phase() != SecAggPhase::MaskedInput).then_some(self.deadline)
    }
}

/// Tells clients waiting on a secure-aggregation phase that it will not close.
fn abort_waiters(
    round: RoundId,
    waiters: impl IntoIterator<Item = oneshot::Sender<SecAggMessage>>,
    reason: &str,
) {
    for tx in waiters {
        let _ = tx.send(SecAggMessage::Aborted {
            round,
            reason: reason.to_owned(),
        });
    }
}

struct Privacy {
    dp: DpSettings,
    ledger: PrivacyLedger,
    /// Behind a mutex only so a commit's blocking task can borrow it.
    rng: Arc<std::sync::Mutex<NoiseRng>>,
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

impl Hub {
    async fn run(
        mut self,
        mut events: mpsc::Receiver<Event>,
        shared: Arc<Shared>,
    ) -> Result<RunSummary, ServeError> {
        if self.machine.is_finished() {
            self.finished = Some(Instant::now());
        }
        let mut control = tokio::time::interval(CONTROL_POLL);
        loop {
            if let Some(at) = self.finished
                && (self.live.is_empty() || at.elapsed() >= FINISH_GRACE)
            {
                break;
            }
            let wake = self
                .machine
                .next_deadline()
                .or(self.finished.map(|at| at + FINISH_GRACE))
                .unwrap_or_else(|| Instant::now() + Duration::from_secs(3600));
            let wake = match &self.secagg {
                Some(s) => s.wake().map_or(wake, |at| wake.min(at)),
                None => wake,
            };
            self.publish();
            tokio::select! {
                event = events.recv() => {
                    let Some(event) = event else { break };
                    self.handle(event, &shared).await?;
                }
                _ = control.tick() => {
                    let actions = self.apply_control(Instant::now());
                    self.execute(actions, &shared).await?;
                }
                _ = tokio::time::sleep_until(wake.into()) => {
                    if self.finished.is_some() {
                        continue;
                    }
                    self.advance_secagg(&shared).await?;
                    let actions = self.machine.tick(Instant::now());
                    self.execute(actions, &shared).await?;
                }
            }
        }
        self.summary.final_version = self.machine.version().0;
        self.publish();
        info!(version = %self.machine.version(), "run finished");
        Ok(self.summary)
    }

    async fn handle(&mut self, event: Event, shared: &Shared) -> Result<(), ServeError> {
        let now = Instant::now();
        match event {
            Event::Renew {
                client,
                request,
                certificate,
                reply,
            } => {
                let _ = reply.send(self.renew(client, &request, &certificate));
            }
            Event::Admin {
                actor,
                role,
                request,
                reply,
            } => {
                let _ = reply.send(self.admin(actor, role, request)?);
            }
            Event::Connected {
                client,
                conn,
                handle,
            } => {
                if let Some((old, old_handle)) = self.live.insert(client, (conn, handle))
                    && old != conn
                {
                    // A device reconnects when it lost its link; whatever the
                    // old connection was doing is over.
                    close(
                        &old_handle,
                        CloseCode::Superseded,
                        "replaced by a newer connection",
                    );
                    if self.uploads.get(&client) == Some(&old) {
                        self.uploads.remove(&client);
                        self.metrics.uploads_interrupted.inc();
                        if let Some(round) = self.machine.current_round() {
                            let actions = self.machine.upload_interrupted(client, round, now);
                            self.execute(actions, shared).await?;
                        }
                    }
                }
            }
            Event::EvalReport { client, report } => self.eval_report(client, report),
            Event::SecAgg {
                client,
                message,
                certificate,
                reply,
            } => {
                self.secagg_message(client, message, &certificate, reply, now, shared)
                    .await?;
            }
            Event::Stop => {
                if let Some(mut s) = self.secagg.take() {
                    s.abort_all("run stopped");
                }
                if let Some(progress) = self.round.take() {
                    let mut record = progress.record;
                    record.outcome = RoundOutcome::Aborted {
                        reason: "run stopped".into(),
                    };
                    record.ended_unix_ms = Some(unix_ms_now());
                    self.store.put_round(&record)?;
                }
                info!("stopping the run on request");
                let version = self.machine.version();
                self.execute(
                    vec![Action::Finished {
                        version,
                        reason: FinishReason::Stopped,
                    }],
                    shared,
                )
                .await?;
                self.write_status();
            }
            Event::CheckIn {
                client,
                conn,
                reply,
            } => {
                if self.finished.is_some() {
                    let _ = reply.send(Assignment::Finished(self.machine.version()));
                    return Ok(());
                }
                self.waiters.insert(client, (conn, reply));
                let actions = self.machine.check_in(client, now);
                self.execute(actions, shared).await?;
            }
            Event::Disconnected { client, conn, lost } => {
                if self.live.get(&client).map(|(id, _)| *id) == Some(conn) {
                    self.live.remove(&client);
                    self.waiters.remove(&client);
                    if let Some(s) = &mut self.secagg {
                        s.session.drop_member(client);
                        s.waiters.remove(&client);
                    }
                    // Under secure aggregation its keys died with the
                    // connection: it cannot come back this round.
                    let may_return = lost && self.secagg.is_none();
                    let actions = self.machine.disconnected(client, may_return, now);
                    self.execute(actions, shared).await?;
                    self.advance_secagg(shared).await?;
                }
            }
            Event::BeginUpdate {
                client,
                conn,
                header,
                reply,
            } => {
                if self.finished.is_some() {
                    let _ = reply.send(Err(RejectReason::RoundClosed));
                    return Ok(());
                }
                let (decision, actions) = self.begin_update(client, &header, now);
                if decision.is_ok() {
                    self.uploads.insert(client, conn);
                }
                let _ = reply.send(decision);
                self.execute(actions, shared).await?;
            }
            Event::FinishUpdate {
                client,
                conn,
                round,
                result,
                reply,
            } => {
                if self.uploads.get(&client) != Some(&conn) {
                    // A superseded connection's upload: already written off.
                    let _ = reply.send(UpdateReceipt::Rejected(RejectReason::RoundClosed));
                    return Ok(());
                }
                self.uploads.remove(&client);
                let receipt = self
                    .finish_update(client, round, result, shared, now)
                    .await?;
                let _ = reply.send(receipt);
            }
        }
        Ok(())
    }

    /// Decides whether to read an announced update; a refusal may end the
    /// round, so the machine's actions come back too.
    fn begin_update(
        &mut self,
        client: Pseudonym,
        header: &UpdateHeader,
        now: Instant,
    ) -> (Result<ChunkPlan, RejectReason>, Vec<Action<Pseudonym>>) {
        if let Err(reason) = self.machine.begin_update(client, header.round) {
            self.count_rejection(reason);
            return (Err(reason), Vec::new());
        }
        let Some(round) = &self.round else {
            return (Err(RejectReason::RoundClosed), Vec::new());
        };
        let (payload, values) = self.expected_payload();
        let distributed = matches!(payload, Payload::Ring { .. });
        let reason = if header.payload != payload
            && (distributed || matches!(header.payload, Payload::Ring { .. }))
        {
            // Plain where noise was required, or the reverse.
            RejectReason::PrivacyMismatch
        } else if header.param_count != values as u64
            || header.payload != payload
            || self.machine.expected_base(&client, round.record.base) != Some(header.base_version)
        {
            RejectReason::ShapeMismatch
        } else if header.num_examples == 0 {
            RejectReason::NoExamples
        } else if self.privacy.is_some() && !distributed && header.within_clip.is_none() {
            RejectReason::PrivacyMismatch
        } else if self
            .secagg
            .as_ref()
            .is_some_and(|s| !s.session.accepts_input(&client))
        {
            // Not through the key phases: its masks could never be removed.
            RejectReason::NotSelected
        } else {
            return (Ok(ChunkPlan::new(values, self.chunk_len)), Vec::new());
        };
        warn!(client = %client, "rejected update: {reason}");
        self.count_rejection(reason);
        let actions = self.machine.reject_update(client, header.round, now);
        (Err(reason), actions)
    }

    /// A secure-aggregation request: answered now, or when its phase closes.
    async fn secagg_message(
        &mut self,
        client: Pseudonym,
        message: SecAggMessage,
        certificate: &[u8],
        reply: oneshot::Sender<SecAggMessage>,
        now: Instant,
        shared: &Shared,
    ) -> Result<(), ServeError> {
        let Some(s) = &mut self.secagg else {
            let _ = reply.send(SecAggMessage::Aborted {
                round: RoundId(0),
                reason: "no secure aggregation is in progress".into(),
            });
            return Ok(());
        };
        let round = s.round;
        let refused = |reply: oneshot::Sender<SecAggMessage>, reason: String| {
            let _ = reply.send(SecAggMessage::Aborted { round, reason });
        };
        let result = match message {
            SecAggMessage::Advertise(ad) => s.session.advertise(client, ad, certificate),
            SecAggMessage::ShareKeys(shares) => s.session.share_keys(client, shares),
            SecAggMessage::AwaitUnmask { round: r } if r == round => {
                match s.requests.get(&client) {
                    Some(request) => {
                        let _ = reply.send(SecAggMessage::UnmaskRequest(request.clone()));
                    }
                    None if s.session.phase() == SecAggPhase::MaskedInput => {
                        s.waiters.insert(client, reply);
                    }
                    None => refused(reply, "not asked to unmask".into()),
                }
                return Ok(());
            }
            SecAggMessage::UnmaskShares(shares) => {
                debug!(client = %client, pending = s.session.pending(), "unmask shares");
                match s.session.unmask(client, shares) {
                    Ok(()) => {
                        let _ = reply.send(SecAggMessage::Done { round });
                    }
                    Err(e) => {
                        warn!(client = %client, "refused unmask shares: {e}");
                        refused(reply, e.to_string());
                    }
                }
                return self.advance_secagg(shared).await;
            }
            _ => {
                refused(
                    reply,
                    "this message does not start a secure-aggregation step".into(),
                );
                return Ok(());
            }
        };
        match result {
            Ok(()) => {
                s.waiters.insert(client, reply);
            }
            Err(e) => {
                warn!(client = %client, "secure aggregation refused a message: {e}");
                refused(reply, e.to_string());
                s.session.drop_member(client);
                let actions = self.machine.drop_member(client, round, now);
                self.execute(actions, shared).await?;
            }
        }
        self.advance_secagg(shared).await
    }

    /// Closes the current key or unmask phase once nobody is pending or
    /// its deadline passed, and answers the clients waiting on it.
    async fn advance_secagg(&mut self, shared: &Shared) -> Result<(), ServeError> {
        loop {
            let now = Instant::now();
            let Some(s) = &mut self.secagg else {
                return Ok(());
            };
            let phase = s.session.phase();
            let due = s.session.pending() == 0 || s.wake().is_some_and(|at| now >= at);
            if !due || phase == SecAggPhase::MaskedInput {
                return Ok(());
            }
            let round = s.round;
            let timeout = s.phase_timeout;
            let answers: Result<HashMap<Pseudonym, SecAggMessage>, SessionAbort> = match phase {
                SecAggPhase::Advertise => s.session.close_advertise().map(|r| {
                    r.into_iter()
                        .map(|(c, m)| (c, SecAggMessage::Roster(m)))
                        .collect()
                }),
                SecAggPhase::Share => s.session.close_share().map(|r| {
                    r.into_iter()
                        .map(|(c, m)| (c, SecAggMessage::IncomingShares(m)))
                        .collect()
                }),
                SecAggPhase::Unmask | SecAggPhase::Closed => {
                    return self.finish_unmask(shared).await;
                }
                SecAggPhase::MaskedInput => return Ok(()),
            };
            match answers {
                Ok(mut answers) => {
                    s.deadline = now + timeout;
                    self.metrics.observe_phase(
                        phase.as_str(),
                        now.saturating_duration_since(s.phase_started),
                    );
                    s.phase_started = now;
                    debug!(round = %round, phase = phase.as_str(), members = answers.len(), "secure aggregation phase closed");
                    let answered: HashSet<Pseudonym> = answers.keys().copied().collect();
                    for (client, tx) in s.waiters.drain() {
                        if let Some(m) = answers.remove(&client) {
                            let _ = tx.send(m);
                        }
                    }
                    // Members that missed the phase can no longer submit.
                    let missed: Vec<Pseudonym> = s
                        .session
                        .cohort()
                        .filter(|c| !answered.contains(c))
                        .copied()
                        .collect();
                    let mut actions = Vec::new();
                    for client in missed {
                        actions.extend(self.machine.drop_member(client, round, now));
                    }
                    self.execute(actions, shared).await?;
                }
                Err(abort) => {
                    warn!(round = %round, "secure aggregation aborted the round: {abort}");
                    s.abort_all(&abort.to_string());
                    let actions =
                        self.machine
                            .abort_round(round, AbortReason::SecureAggregation, now);
                    self.execute(actions, shared).await?;
                    self.secagg = None;
                    return Ok(());
                }
            }
        }
    }

    /// The coordinator closed the round: ask every member with masked
    /// input for its shares. The commit waits for them.
    fn begin_unmask(&mut self, now: Instant) -> Result<Vec<Action<Pseudonym>>, ServeError> {
        let Some(s) = &mut self.secagg else {
            return Ok(Vec::new());
        };
        let timeout = s.phase_timeout;
        match s.session.close_masked_input() {
            Ok(requests) => {
                s.deadline = now + timeout;
                self.metrics.observe_phase(
                    SecAggPhase::MaskedInput.as_str(),
                    now.saturating_duration_since(s.phase_started),
                );
                s.phase_started = now;
                s.requests = requests.into_iter().collect();
                for (client, tx) in s.waiters.drain() {
                    let _ = tx.send(match s.requests.get(&client) {
                        Some(r) => SecAggMessage::UnmaskRequest(r.clone()),
                        None => SecAggMessage::Aborted {
                            round: s.round,
                            reason: "no masked input from this client".into(),
                        },
                    });
                }
                Ok(Vec::new())
            }
            Err(abort) => match self.secagg.take() {
                Some(s) => self.unmask_failed(s.round, s.waiters, &abort, now),
                None => Ok(Vec::new()),
            },
        }
    }

    /// Removes the masks from the sum, then commits as any round does.
    async fn finish_unmask(&mut self, shared: &Shared) -> Result<(), ServeError> {
        if self.secagg.as_ref().is_none_or(|s| s.commit.is_none()) {
            return Ok(());
        }
        let Some(SecAggRound {
            round,
            session,
            waiters,
            commit: Some((base, new_version, stats)),
            phase_started,
            ..
        }) = self.secagg.take()
        else {
            return Ok(());
        };
        let now = Instant::now();
        let started = Instant::now();
        let finished = tokio::task::spawn_blocking(move || session.finish())
            .await
            .map_err(|e| ServeError::Internal(format!("unmasking panicked: {e}")))?;
        match finished {
            Ok((sum, count)) => {
                self.metrics.observe_phase(
                    SecAggPhase::Unmask.as_str(),
                    now.saturating_duration_since(phase_started) + started.elapsed(),
                );
                info!(
                    round = %round,
                    survivors = count,
                    unmask_ms = started.elapsed().as_millis() as u64,
                    "secure aggregation unmasked the sum"
                );
                if let Some(progress) = &mut self.round {
                    progress.sum = Aggregate::Ring { sum, count };
                }
                self.execute(
                    vec![Action::Commit {
                        round,
                        base,
                        new_version,
                        stats,
                    }],
                    shared,
                )
                .await
            }
            Err(abort) => {
                let actions = self.unmask_failed(round, waiters, &abort, now)?;
                self.execute(actions, shared).await
            }
        }
    }

    /// Unmasking could not complete: nothing is released, the round is
    /// recorded as aborted, and the next one starts.
    fn unmask_failed(
        &mut self,
        round: RoundId,
        waiters: HashMap<Pseudonym, oneshot::Sender<SecAggMessage>>,
        abort: &SessionAbort,
        now: Instant,
    ) -> Result<Vec<Action<Pseudonym>>, ServeError> {
        warn!(round = %round, "secure aggregation aborted the round: {abort}");
        abort_waiters(round, waiters.into_values(), &abort.to_string());
        if let Some(progress) = self.round.take() {
            let mut record = progress.record;
            record.outcome = RoundOutcome::Aborted {
                reason: format!("secure aggregation: {abort}"),
            };
            record.ended_unix_ms = Some(unix_ms_now());
            self.store.put_round(&record)?;
        }
        self.count_round(false);
        self.write_status();
        Ok(self.machine.commit_failed(round, now))
    }

    /// Counts an ended round in the run summary and the metrics.
    fn count_round(&mut self, committed: bool) {
        let outcome = if committed {
            self.summary.rounds_committed += 1;
            "committed"
        } else {
            self.summary.rounds_aborted += 1;
            "aborted"
        };
        self.metrics
            .rounds
            .get_or_create(&Outcome { outcome })
            .inc();
    }

    /// Counts a refused update by reason, for the run and its round.
    fn count_rejection(&mut self, reason: RejectReason) {
        self.metrics
            .rejected
            .get_or_create(&Reason {
                reason: reason.as_str(),
            })
            .inc();
        *self
            .summary
            .rejected
            .entry(reason.as_str().to_owned())
            .or_default() += 1;
        if let Some(round) = &mut self.round {
            *round
                .record
                .rejected
                .entry(reason.as_str().to_owned())
                .or_default() += 1;
        }
    }

    /// What updates of this run carry, and how many values.
    fn expected_payload(&self) -> (Payload, usize) {
        match self.ring_quantizer() {
            Some(q) => (Payload::Ring { bits: q.bits }, q.encoded_len()),
            None => (
                Payload::Floats(self.settings.encoding),
                self.settings.spec.param_count(),
            ),
        }
    }

    /// The quantizer of ring-word updates: distributed DP's, or secure
    /// aggregation's own when DP is off.
    fn ring_quantizer(&self) -> Option<Quantizer> {
        match self.privacy.as_ref().map(|p| p.dp.mode) {
            Some(DpMode::Distributed(plan)) => Some(plan.quantizer),
            Some(DpMode::Central { .. }) => None,
            None => self
                .settings
                .secagg
                .and_then(|sa| sa.noiseless)
                .map(|(_, q)| q),
        }
    }

    async fn finish_update(
        &mut self,
        client: Pseudonym,
        round_id: RoundId,
        result: Result<Received, Undelivered>,
        shared: &Shared,
        now: Instant,
    ) -> Result<UpdateReceipt, ServeError> {
        match result {
            Ok(mut update) => {
                let (_, expected) = self.expected_payload();
                let refusal = match (&mut update.values, &self.privacy) {
                    (Values::Floats(v), _) if v.len() != expected => {
                        Some(RejectReason::ShapeMismatch)
                    }
                    (Values::Words(w), _) if w.len() != expected => {
                        Some(RejectReason::ShapeMismatch)
                    }
                    (Values::Floats(v), Some(p)) => clip_received(v, p.ledger.clip).err(),
                    (Values::Words(w), _) => match &mut self.secagg {
                        Some(s) => s
                            .session
                            .masked_input(client, w)
                            .err()
                            .map(|_| RejectReason::ShapeMismatch),
                        None => None,
                    },
                    _ => None,
                };
                if let Some(reason) = refusal {
                    warn!(client = %client, "rejected update: {reason}");
                    self.count_rejection(reason);
                    let actions = self.machine.reject_update(client, round_id, now);
                    self.execute(actions, shared).await?;
                    return Ok(UpdateReceipt::Rejected(reason));
                }
                // Read before the machine forgets the client's task.
                let staleness_weight = self.machine.update_weight(&client);
                match self.machine.accept_update(client, round_id, now) {
                    Ok(actions) => {
                        self.metrics.updates_accepted.inc();
                        if let Some(round) = &mut self.round {
                            // FedBuff weighs by staleness alone. Under DP every
                            // update weighs the same: weighting by example
                            // count would let one client's count leak.
                            let weight = if self.machine.is_buffered() {
                                staleness_weight
                            } else if self.privacy.is_some() {
                                1.0
                            } else {
                                update.num_examples as f64
                            };
                            if update.within_clip == Some(true) {
                                round.within_clip += 1;
                            }
                            if update.loss.is_finite() {
                                round.loss_weighted += f64::from(update.loss) * weight;
                                round.examples += weight;
                            }
                            // Length, range and weight were checked above.
                            match (&mut round.sum, update.values) {
                                (Aggregate::Weighted(sum), Values::Floats(mut v)) => {
                                    if let Aggregator::NormBound { max_norm } =
                                        self.settings.aggregator
                                        && let Ok(bound) = ClipNorm::new(max_norm)
                                    {
                                        clip_l2(&mut v, bound);
                                    }
                                    let _ = sum.fold(&v, weight);
                                }
                                (Aggregate::Buffered { updates, weights }, Values::Floats(v)) => {
                                    updates.push(v);
                                    weights.push(weight);
                                }
                                // Masked input is already in the session's sum.
                                (Aggregate::Ring { .. }, Values::Words(_))
                                    if self.secagg.is_some() => {}
                                (Aggregate::Ring { sum, count }, Values::Words(w)) => {
                                    if let Some(p) = &self.privacy
                                        && let DpMode::Distributed(plan) = p.dp.mode
                                        && plan.quantizer.accumulate(sum, &w).is_ok()
                                    {
                                        *count += 1;
                                    }
                                }
                                _ => {}
                            }
                        }
                        debug!(client = %client, "update accepted");
                        self.execute(actions, shared).await?;
                        Ok(UpdateReceipt::Accepted)
                    }
                    Err(reason) => {
                        self.count_rejection(reason);
                        Ok(UpdateReceipt::Rejected(reason))
                    }
                }
            }
            Err(Undelivered::Rejected(reason)) => {
                warn!(client = %client, "rejected update: {reason}");
                self.count_rejection(reason);
                let actions = self.machine.reject_update(client, round_id, now);
                self.execute(actions, shared).await?;
                Ok(UpdateReceipt::Rejected(reason))
            }
            Err(Undelivered::Abandoned) => {
                debug!(client = %client, "upload abandoned by the client");
                let actions = self.machine.reject_update(client, round_id, now);
                self.execute(actions, shared).await?;
                Ok(UpdateReceipt::Rejected(RejectReason::RoundClosed))
            }
            Err(Undelivered::Interrupted) => {
                // Not the client's fault: it may send the update again.
                debug!(client = %client, "upload cut off by a lost connection");
                self.metrics.uploads_interrupted.inc();
                let actions = self.machine.upload_interrupted(client, round_id, now);
                self.execute(actions, shared).await?;
                // Nobody reads this receipt: the stream is gone.
                Ok(UpdateReceipt::Rejected(RejectReason::RoundClosed))
            }
        }
    }

    async fn execute(
        &mut self,
        actions: Vec<Action<Pseudonym>>,
        shared: &Shared,
    ) -> Result<(), ServeError> {
        let mut queue: VecDeque<_> = actions.into();
        while let Some(action) = queue.pop_front() {
            let now = Instant::now();
            match action {
                Action::StartRound {
                    round,
                    base,
                    cohort,
                    deadline,
                } => {
                    let task = Task {
                        round,
                        base_version: base,
                        spec: self.settings.spec.clone(),
                        hyper: self.settings.hyper,
                        update_encoding: self.settings.encoding,
                        chunk_len: self.chunk_len,
                        deadline_ms: deadline.saturating_duration_since(now).as_millis() as u64,
                        seed: self.rng.random(),
                        privacy: match &self.privacy {
                            None => match self.settings.secagg.and_then(|sa| sa.noiseless) {
                                Some((clip, quantizer)) => UpdatePrivacy::Distributed {
                                    clip,
                                    quantizer,
                                    noise_sigma: 0.0,
                                },
                                None => UpdatePrivacy::Plain,
                            },
                            Some(p) => match p.dp.mode {
                                DpMode::Central { .. } => UpdatePrivacy::Clipped {
                                    clip: p.ledger.clip,
                                },
                                DpMode::Distributed(plan) => UpdatePrivacy::Distributed {
                                    clip: p.ledger.clip,
                                    quantizer: plan.quantizer,
                                    noise_sigma: plan.client_sigma,
                                },
                            },
                        },
                        secure_aggregation: self.settings.secagg.map(|s| s.params),
                        config: self.settings.fit_config.clone(),
                    };
                    self.secagg = match (&self.settings.secagg, self.ring_quantizer()) {
                        (Some(sa), Some(quantizer)) => Some(SecAggRound {
                            round,
                            session: Session::new(
                                round,
                                sa.params,
                                quantizer.bits,
                                quantizer.encoded_len(),
                                cohort.iter().copied(),
                                self.settings.round.quorum,
                            ),
                            waiters: HashMap::new(),
                            deadline: now + sa.phase_timeout,
                            phase_started: now,
                            phase_timeout: sa.phase_timeout,
                            requests: HashMap::new(),
                            commit: None,
                        }),
                        _ => None,
                    };
                    let record = RoundRecord {
                        round,
                        base,
                        outcome: RoundOutcome::InFlight,
                        selected: cohort.len(),
                        accepted: 0,
                        dropped: 0,
                        started_unix_ms: unix_ms_now(),
                        ended_unix_ms: None,
                        mean_client_loss: None,
                        test_accuracy: None,
                        test_loss: None,
                        bytes_up: 0,
                        bytes_down: 0,
                        clip: self.privacy.as_ref().map(|p| p.ledger.clip.get()),
                        epsilon: None,
                        rejected: Default::default(),
                    };
                    self.store.begin_round(&record)?;
                    self.metrics.selected.set(cohort.len() as i64);
                    info!(round = %round, base = %base, cohort = cohort.len(), "round started");
                    let package = Arc::new(TaskPackage {
                        task,
                        model: self.model.clone(),
                    });
                    self.package = Some(package.clone());
                    self.round = Some(RoundInProgress {
                        record,
                        sum: match self.ring_quantizer() {
                            Some(quantizer) => Aggregate::Ring {
                                sum: vec![0; quantizer.encoded_len()],
                                count: 0,
                            },
                            _ if !self.settings.aggregator.is_streaming() => Aggregate::Buffered {
                                updates: Vec::new(),
                                weights: Vec::new(),
                            },
                            _ => Aggregate::Weighted(WeightedSum::new(self.model.len())),
                        },
                        loss_weighted: 0.0,
                        examples: 0.0,
                        within_clip: 0,
                        bytes_up_start: shared.metrics.bytes_in.get(),
                        bytes_down_start: shared.metrics.bytes_out.get(),
                        started: now,
                    });
                    for client in cohort {
                        let sent = self
                            .waiters
                            .remove(&client)
                            .map(|(_, tx)| tx.send(Assignment::Task(package.clone())).is_ok())
                            .unwrap_or(false);
                        if !sent {
                            queue.extend(self.machine.disconnected(client, false, now));
                        }
                    }
                    self.write_status();
                }
                Action::Assign {
                    client,
                    round,
                    base,
                    deadline,
                } => {
                    let Some(current) = self
                        .package
                        .as_ref()
                        .filter(|p| p.task.round == round && p.task.base_version == base)
                    else {
                        queue.extend(self.machine.disconnected(client, false, now));
                        continue;
                    };
                    let mut task = current.task.clone();
                    task.deadline_ms = deadline.saturating_duration_since(now).as_millis() as u64;
                    task.seed = self.rng.random();
                    let package = Arc::new(TaskPackage {
                        task,
                        model: current.model.clone(),
                    });
                    let sent = self
                        .waiters
                        .remove(&client)
                        .map(|(_, tx)| tx.send(Assignment::Task(package)).is_ok())
                        .unwrap_or(false);
                    if sent {
                        // FedBuff: tasks handed out for the open buffer.
                        self.metrics.selected.inc();
                    } else {
                        queue.extend(self.machine.disconnected(client, false, now));
                    }
                }
                Action::Commit {
                    round,
                    base,
                    new_version,
                    stats,
                } => {
                    if let Some(s) = &mut self.secagg
                        && s.round == round
                        && s.session.phase() == SecAggPhase::MaskedInput
                    {
                        s.commit = Some((base, new_version, stats));
                        debug!(round = %round, accepted = stats.accepted, "secure aggregation: asking survivors to unmask");
                        queue.extend(self.begin_unmask(now)?);
                        continue;
                    }
                    let Some(progress) = self.round.take() else {
                        queue.extend(self.machine.commit_failed(round, now));
                        continue;
                    };
                    self.metrics
                        .observe_phase("collect", now.saturating_duration_since(progress.started));
                    self.metrics.participants.set(stats.accepted as i64);
                    let mut record = progress.record;
                    record.accepted = stats.accepted;
                    record.dropped = stats.dropped;
                    record.selected = stats.selected;
                    record.ended_unix_ms = Some(unix_ms_now());
                    // The coordinator's quorum is at least k; this holds
                    // the line whatever path led here.
                    if let Err(below) = self.settings.min_cohort.check(progress.sum.contributors())
                    {
                        warn!(round = %round, "round discarded: {below}");
                        record.outcome = RoundOutcome::Aborted {
                            reason: format!("discarded: {below}"),
                        };
                        self.count_round(false);
                        self.store.put_round(&record)?;
                        queue.extend(self.machine.commit_failed(round, now));
                        self.write_status();
                        continue;
                    }
                    record.mean_client_loss = (progress.examples > 0.0)
                        .then(|| (progress.loss_weighted / progress.examples) as f32);
                    record.bytes_up = shared.metrics.bytes_in.get() - progress.bytes_up_start;
                    record.bytes_down = shared.metrics.bytes_out.get() - progress.bytes_down_start;
                    record.outcome = RoundOutcome::Committed {
                        version: new_version,
                    };
                    let committed = self
                        .commit(
                            progress.sum,
                            progress.within_clip,
                            record.clone(),
                            new_version,
                            round,
                        )
                        .await;
                    self.metrics.observe_phase("commit", now.elapsed());
                    match committed {
                        Ok(record) => {
                            self.count_round(true);
                            self.metrics.model_version.set(new_version.0 as i64);
                            self.metrics.committed_now(Some(&record));
                            if let Some(epsilon) = record.epsilon {
                                self.metrics.epsilon.set(epsilon);
                            }
                            info!(
                                round = %round,
                                version = %new_version,
                                base = %base,
                                accepted = stats.accepted,
                                dropped = stats.dropped,
                                test_accuracy = record.test_accuracy,
                                epsilon = record.epsilon,
                                "round committed"
                            );
                            let _ = self.commits.send(CommitNotice {
                                record: record.clone(),
                                version: new_version,
                                weights: self.model.clone(),
                            });
                            queue.extend(self.machine.commit_done(round, new_version, now));
                        }
                        Err(e) => {
                            error!(round = %round, "commit failed, round will be retried: {e}");
                            record.outcome = RoundOutcome::Aborted {
                                reason: format!("commit failed: {e}"),
                            };
                            self.count_round(false);
                            self.store.put_round(&record)?;
                            queue.extend(self.machine.commit_failed(round, now));
                        }
                    }
                    self.write_status();
                }
                Action::Abort {
                    round,
                    reason,
                    stats,
                } => {
                    if let Some(mut s) = self.secagg.take() {
                        s.abort_all(reason.as_str());
                    }
                    if let Some(progress) = self.round.take() {
                        let mut record = progress.record;
                        record.outcome = RoundOutcome::Aborted {
                            reason: reason.as_str().to_owned(),
                        };
                        record.accepted = stats.accepted;
                        record.dropped = stats.dropped;
                        record.ended_unix_ms = Some(unix_ms_now());
                        self.store.put_round(&record)?;
                    }
                    self.count_round(false);
                    warn!(
                        round = %round,
                        accepted = stats.accepted,
                        selected = stats.selected,
                        "round aborted: {}",
                        reason.as_str()
                    );
                    self.write_status();
                }
                Action::Finished { version, reason } => {
                    if self.finished.is_none() {
                        self.summary.finish_reason = Some(reason.as_str().to_owned());
                        if let Some(p) = &self.privacy {
                            let spent = p.ledger.epsilon(&p.dp);
                            self.summary.epsilon = Some(spent);
                            if reason == FinishReason::BudgetExhausted {
                                warn!(
                                    epsilon_spent = spent,
                                    epsilon_next = p.ledger.epsilon_after_next(&p.dp),
                                    target = p.dp.target_epsilon.get(),
                                    "privacy budget exhausted: one more round would exceed the target epsilon; stopping the run at {version}"
                                );
                            }
                        }
                    }
                    self.finished.get_or_insert(now);
                    for (_, (_, tx)) in self.waiters.drain() {
                        let _ = tx.send(Assignment::Finished(version));
                    }
                }
            }
        }
        Ok(())
    }

    /// Applies requests queued by `covey-server enroll`, `revoke` and
    /// `evaluate` while the server runs.
    fn apply_control(&mut self, now: Instant) -> Vec<Action<Pseudonym>> {
        let mut actions = Vec::new();
        let dir = StateDir::new(&self.state_root);
        match dir.apply_requests(&self.store) {
            Ok(applied) => {
                for (p, role) in applied.admitted {
                    self.admit(p, role);
                }
                self.bar(applied.revoked);
                for (id, versions, timeout) in applied.evaluations {
                    actions.extend(self.start_evaluation(id, versions, timeout, now));
                }
            }
            Err(e) => warn!("cannot apply queued operator requests: {e}"),
        }
        if self.evaluation.as_ref().is_some_and(|e| now >= e.deadline) {
            self.finish_evaluation();
        }
        actions
    }

    fn admit(&mut self, p: Pseudonym, role: Role) {
        self.admitted.insert(p, role);
        info!(client = %p, %role, "enrolled by the operator");
    }

    /// Revoked or forgotten: refused from now on, and disconnected.
    fn bar(&mut self, pseudonyms: Vec<Pseudonym>) {
        for p in pseudonyms {
            self.admitted.remove(&p);
            if let Some((_, conn)) = self.live.get(&p) {
                close(conn, CloseCode::Revoked, "enrollment revoked");
            }
            warn!(client = %p, "revoked by the operator; connection closed");
        }
    }

    /// Signs a new certificate for a device's new key, once the device has
    /// proved it holds that key; refuses anything else with a reason.
    fn renew(
        &mut self,
        client: Pseudonym,
        request: &RenewRequest,
        certificate: &[u8],
    ) -> Result<RenewedCertificate, String> {
        let proof = ring::signature::UnparsedPublicKey::new(
            &ring::signature::ECDSA_P256_SHA256_ASN1,
            &request.public_key,
        );
        proof
            .verify(&renewal_message(certificate), &request.proof)
            .map_err(|_| "the renewal proof does not verify for that P-256 key".to_owned())?;
        let enrollments = self.store.enrollments().map_err(|e| e.to_string())?;
        let current = enrollments
            .iter()
            .find(|e| e.pseudonym == client && e.revoked_unix.is_none())
            .ok_or_else(|| "no live enrollment for this certificate".to_owned())?;
        let dir = StateDir::new(&self.state_root);
        let (renewed, pseudonym) = dir
            .renew(&self.store, current, &request.public_key)
            .map_err(|e| e.to_string())?;
        self.admitted.insert(pseudonym, current.role);
        info!(client = %client, renewed = %pseudonym, "certificate renewed");
        Ok(renewed)
    }

    /// Answers an operator API request, after checking the caller's role;
    /// the request goes into the audit trail either way.
    fn admin(
        &mut self,
        actor: Pseudonym,
        role: Role,
        request: AdminRequest,
    ) -> Result<AdminResponse, ServeError> {
        let allowed = role.may(&request);
        self.store.audit([AuditEvent::AdminRequest {
            actor,
            role,
            action: request.action().to_owned(),
            allowed: allowed.is_ok(),
        }])?;
        if let Err(denied) = allowed {
            warn!(client = %actor, %role, "operator request refused: {denied}");
            return Ok(AdminResponse::Refused {
                reason: denied.to_string(),
            });
        }
        let dir = StateDir::new(&self.state_root);
        let reply = match request {
            AdminRequest::Status => Ok(AdminReply::Status(Box::new(Report::from_store(
                &self.store,
                role != Role::Auditor,
            )?))),
            AdminRequest::Report => dir.config().and_then(|config| {
                let report = ComplianceReport::build(&self.store, &config, &self.settings)?;
                Ok(AdminReply::Report {
                    json: report.to_json(),
                    html: report.to_html()?,
                })
            }),
            AdminRequest::AuditExport => {
                let mut out = Vec::new();
                self.store.export_audit(&mut out)?;
                Ok(AdminReply::AuditExport {
                    jsonl: String::from_utf8_lossy(&out).into_owned(),
                })
            }
            AdminRequest::AuditPublicKey => Ok(AdminReply::AuditPublicKey {
                text: self.store.audit_public_key()?,
            }),
            AdminRequest::Enroll { name, days, role } => {
                if days == 0 || days > 3650 {
                    return Ok(AdminResponse::Refused {
                        reason: format!("days must be between 1 and 3650, got {days}"),
                    });
                }
                dir.enroll_as(
                    &self.store,
                    &name,
                    Duration::from_secs(days * 86_400),
                    None,
                    role,
                )
                .map(|(bundle, p)| {
                    self.admit(p, role);
                    AdminReply::Enrolled {
                        identity: bundle.to_toml(),
                    }
                })
            }
            AdminRequest::Revoke { name } => dir.revoke(&self.store, &name).map(|revoked| {
                let certificates = revoked.len();
                self.bar(revoked);
                AdminReply::Revoked { certificates }
            }),
            AdminRequest::Forget { name } => dir.forget(&self.store, &name).map(|forgotten| {
                let enrollments = forgotten.len();
                self.bar(forgotten);
                AdminReply::Forgotten { enrollments }
            }),
            AdminRequest::DashboardLogin { hours } => {
                let now = time::OffsetDateTime::now_utc().unix_timestamp();
                return Ok(match self.logins.issue(actor, role, hours, now) {
                    Ok((token, expires_unix)) => AdminResponse::Ok {
                        reply: AdminReply::DashboardLogin {
                            token: token.to_text(),
                            expires_unix,
                        },
                    },
                    Err(e) => AdminResponse::Refused {
                        reason: e.to_string(),
                    },
                });
            }
            AdminRequest::DashboardLogout => self
                .logins
                .revoke_all(actor)
                .map(|logins| AdminReply::DashboardLoggedOut { logins })
                .map_err(DirError::from),
        };
        Ok(match reply {
            Ok(reply) => AdminResponse::Ok { reply },
            Err(e) => AdminResponse::Refused {
                reason: e.to_string(),
            },
        })
    }

    /// Sends every idle client the versions to evaluate.
    fn start_evaluation(
        &mut self,
        id: u64,
        versions: Vec<u64>,
        timeout_secs: u64,
        now: Instant,
    ) -> Vec<Action<Pseudonym>> {
        let dir = StateDir::new(&self.state_root);
        let refuse = |error: String| {
            let outcome = EvalOutcome {
                id,
                asked: 0,
                answered: 0,
                clients_with_data: 0,
                examples: 0,
                versions: Vec::new(),
                error: Some(error),
            };
            if let Err(e) = dir.write_eval_outcome(&outcome) {
                warn!("cannot write evaluation outcome: {e}");
            }
        };
        if self.evaluation.is_some() {
            refuse("another evaluation is in progress".into());
            return Vec::new();
        }
        if versions.is_empty() || versions.len() > 4 {
            refuse(format!("evaluate 1 to 4 versions, not {}", versions.len()));
            return Vec::new();
        }
        let mut models = Vec::new();
        for &v in &versions {
            match self.store.model(ModelVersion(v)) {
                Ok(m) => models.push(Arc::new(m.weights)),
                Err(e) => {
                    refuse(e.to_string());
                    return Vec::new();
                }
            }
        }
        if self.waiters.is_empty() {
            refuse("no idle client is connected to evaluate on".into());
            return Vec::new();
        }
        let versions: Vec<ModelVersion> = versions.into_iter().map(ModelVersion).collect();
        let package = Arc::new(EvalPackage {
            task: EvalTask {
                id,
                spec: self.settings.spec.clone(),
                versions: versions.clone(),
                chunk_len: self.chunk_len,
            },
            models,
        });
        let mut asked = HashSet::new();
        let mut actions = Vec::new();
        for (client, (_, tx)) in std::mem::take(&mut self.waiters) {
            if tx.send(Assignment::Evaluate(package.clone())).is_ok() {
                asked.insert(client);
            }
            // Out of the pool while it evaluates; it checks in again after.
            actions.extend(self.machine.disconnected(client, false, now));
        }
        info!(id, clients = asked.len(), "federated evaluation started");
        self.evaluation = Some(PendingEval {
            id,
            sums: vec![(0.0, 0.0); versions.len()],
            versions,
            asked,
            answered: HashSet::new(),
            clients_with_data: 0,
            examples: 0,
            deadline: now + Duration::from_secs(timeout_secs.clamp(1, 3600)),
        });
        actions
    }

    fn eval_report(&mut self, client: Pseudonym, report: EvalReport) {
        let Some(eval) = &mut self.evaluation else {
            return;
        };
        if report.id != eval.id || !eval.asked.contains(&client) || !eval.answered.insert(client) {
            return;
        }
        let usable = report.examples > 0
            && report.results.len() == eval.versions.len()
            && report
                .results
                .iter()
                .all(|m| m.loss.is_finite() && (0.0..=1.0).contains(&m.accuracy));
        if usable {
            let n = report.examples as f64;
            for (sum, m) in eval.sums.iter_mut().zip(&report.results) {
                sum.0 += f64::from(m.loss) * n;
                sum.1 += f64::from(m.accuracy) * n;
            }
            eval.examples += report.examples;
            eval.clients_with_data += 1;
        }
        if eval.answered.len() == eval.asked.len() {
            self.finish_evaluation();
        }
    }

    fn finish_evaluation(&mut self) {
        let Some(eval) = self.evaluation.take() else {
            return;
        };
        let n = eval.examples as f64;
        let outcome = EvalOutcome {
            id: eval.id,
            asked: eval.asked.len(),
            answered: eval.answered.len(),
            clients_with_data: eval.clients_with_data,
            examples: eval.examples,
            versions: if eval.examples > 0 {
                eval.versions
                    .iter()
                    .zip(&eval.sums)
                    .map(|(v, (loss, acc))| VersionMetrics {
                        version: v.0,
                        accuracy: acc / n,
                        loss: loss / n,
                    })
                    .collect()
            } else {
                Vec::new()
            },
            error: None,
        };
        // Metrics from fewer than k clients are not released either.
        let outcome = match self.settings.min_cohort.check(eval.clients_with_data) {
            _ if eval.examples == 0 => EvalOutcome {
                error: Some("no client reported held-out data in time".to_owned()),
                ..outcome
            },
            Err(below) => EvalOutcome {
                versions: Vec::new(),
                error: Some(format!("metrics {below}")),
                ..outcome
            },
            Ok(()) => outcome,
        };
        info!(
            id = eval.id,
            answered = outcome.answered,
            "federated evaluation finished"
        );
        self.board.evaluated(outcome.clone());
        if let Err(e) = StateDir::new(&self.state_root).write_eval_outcome(&outcome) {
            warn!("cannot write evaluation outcome: {e}");
        }
    }

    /// Applies the round's mean update, evaluates the result on the test
    /// set if there is one, and stores the new version with its record.
    async fn commit(
        &mut self,
        sum: Aggregate,
        within_clip: usize,
        mut record: RoundRecord,
        version: ModelVersion,
        round: RoundId,
    ) -> Result<RoundRecord, crate::store::StoreError> {
        let corrupt = |e: String| crate::store::StoreError::Corrupt(e);
        // Under DP: noise on the sum, a fixed denominator, and the ledger
        // entry that goes into the same transaction as the version.
        let (mean, ledger) = match (&self.privacy, sum) {
            (None, Aggregate::Weighted(sum)) => match &self.settings.buffer {
                // FedBuff: the staleness-weighted sum over K, not a mean,
                // so stale updates move the model less.
                Some(buffer) => {
                    let mut total = sum.into_sum().map_err(|e| corrupt(e.to_string()))?;
                    let inv = 1.0 / buffer.size as f32;
                    total.iter_mut().for_each(|v| *v *= inv);
                    (total, None)
                }
                None => (sum.mean().map_err(|e| corrupt(e.to_string()))?, None),
            },
            (Some(p), Aggregate::Ring { sum, count }) => {
                if count == 0 {
                    return Err(corrupt("no update was aggregated".into()));
                }
                let DpMode::Distributed(plan) = p.dp.mode else {
                    return Err(corrupt("a ring aggregate without distributed DP".into()));
                };
                let (mean, at_risk) =
                    p.dp.decode_sum(&plan, &sum)
                        .map_err(|e| corrupt(e.to_string()))?;
                if at_risk > 0 {
                    warn!(
                        round = %round,
                        coordinates = at_risk,
                        "the modular sum came near the ring's edge and may have wrapped: raise privacy.bits or lower the clip"
                    );
                }
                let mut ledger = p.ledger.clone();
                ledger.spend(&p.dp);
                record.epsilon = Some(ledger.epsilon(&p.dp));
                (mean, Some(ledger))
            }
            (Some(p), Aggregate::Weighted(sum)) => {
                let mut total = sum.into_sum().map_err(|e| corrupt(e.to_string()))?;
                let (dp, clip, rng) = (p.dp, p.ledger.clip, p.rng.clone());
                let mut ledger = p.ledger.clone();
                let (total, ledger) = tokio::task::spawn_blocking(move || {
                    let mut rng = rng.lock().map_err(|_| "noise source poisoned".to_owned())?;
                    dp.privatize(&mut total, clip, &mut rng)
                        .map_err(|e| e.to_string())?;
                    ledger.clip = dp
                        .next_clip(clip, within_clip, &mut rng)
                        .map_err(|e| e.to_string())?;
                    ledger.spend(&dp);
                    Ok::<_, String>((total, ledger))
                })
                .await
                .map_err(|e| corrupt(format!("noise task: {e}")))?
                .map_err(corrupt)?;
                record.epsilon = Some(ledger.epsilon(&p.dp));
                (total, Some(ledger))
            }
            (None, Aggregate::Buffered { updates, weights }) => {
                let aggregator = self.settings.aggregator;
                let combined =
                    tokio::task::spawn_blocking(move || aggregator.aggregate(&updates, &weights))
                        .await
                        .map_err(|e| corrupt(format!("aggregation task: {e}")))?
                        .map_err(|e| corrupt(e.to_string()))?;
                (combined, None)
            }
            (None, Aggregate::Ring { sum, count }) => {
                // Secure aggregation without DP: the survivors' plain mean.
                let Some(quantizer) = self.ring_quantizer().filter(|_| count > 0) else {
                    return Err(corrupt("a ring aggregate without its quantizer".into()));
                };
                let (mut mean, at_risk) =
                    quantizer.decode(&sum).map_err(|e| corrupt(e.to_string()))?;
                if at_risk > 0 {
                    warn!(
                        round = %round,
                        coordinates = at_risk,
                        "the modular sum came near the ring's edge and may have wrapped: raise secure_aggregation.bits or lower its clip"
                    );
                }
                let inv = 1.0 / count as f32;
                mean.iter_mut().for_each(|v| *v *= inv);
                (mean, None)
            }
            (Some(_), Aggregate::Buffered { .. }) => {
                return Err(corrupt(
                    "the round's aggregate does not match its privacy mode".into(),
                ));
            }
        };
        let mut weights = self.model.as_ref().clone();
        let mut state = self.optimizer_state.clone();
        self.settings
            .optimizer
            .apply(&mut state, &mut weights, &mean);
        let spec = self.settings.spec.clone();
        let model = StoredModel {
            header: ModelHeader {
                version,
                spec: spec.clone(),
                round: Some(round),
                created_unix_ms: unix_ms_now(),
            },
            weights,
        };
        let store = self.store.clone();
        let test_set = self.test_set.clone();
        let (model, state, record, ledger) = tokio::task::spawn_blocking(move || {
            if let Some(test) = test_set {
                match test.evaluate(&spec, &model.weights) {
                    Ok(m) => {
                        record.test_accuracy = Some(m.accuracy);
                        record.test_loss = Some(m.loss);
                    }
                    Err(e) => warn!(version = %version, "central evaluation failed: {e}"),
                }
            }
            store.commit_round(&model, &record, &state, ledger.as_ref())?;
            Ok::<_, crate::store::StoreError>((model, state, record, ledger))
        })
        .await
        .map_err(|e| crate::store::StoreError::Corrupt(format!("commit task: {e}")))??;
        self.model = Arc::new(model.weights);
        self.optimizer_state = state;
        if let (Some(p), Some(ledger)) = (&mut self.privacy, ledger) {
            p.ledger = ledger;
        }
        purge(&self.store, self.settings.retention)?;
        Ok(record)
    }

    /// Hands the dashboard the state only the hub holds.
    fn publish(&self) {
        let secagg = self.secagg.as_ref();
        self.board.publish(crate::dashboard::Live {
            version: self.machine.version().0,
            round: self.machine.current_round().map(|r| r.0),
            phase: self.machine.phase_name(),
            secagg_phase: secagg.map(|s| s.session.phase().as_str()),
            deadline_unix_ms: secagg
                .and_then(SecAggRound::wake)
                .or(self.machine.next_deadline())
                .map(crate::dashboard::live::deadline_unix_ms),
            connected: self.live.len(),
            selected: usize::try_from(self.metrics.selected.get()).unwrap_or(0),
            reported: self.round.as_ref().map_or(0, |r| r.sum.contributors()),
            federated_evaluation: None,
        });
    }

    /// A snapshot for `covey-server status` while the database is locked.
    fn write_status(&self) {
        match status::Report::from_store(&self.store, false) {
            Ok(report) => {
                if let Err(e) = status::write_snapshot(&self.status_path, &report) {
                    warn!("cannot write status snapshot: {e}");
                }
            }
            Err(e) => warn!("cannot build status snapshot: {e}"),
        }
    }
}
