//! The client's QUIC driver: connect (mutual TLS), say hello, then check in,
//! train, upload, and again, until the server says the run is over.
//!
//! A lost connection is retried with exponential backoff and full jitter; a
//! refusal that retrying cannot fix (revoked or unknown certificate, wrong
//! protocol version) ends the session with an error that says so.

use std::{
    net::SocketAddr,
    sync::Arc,
    time::{Duration, Instant},
};

use covey_privacy::{
    clip_l2,
    noise::{DiscreteGaussian, NoiseRng},
};
use covey_protocol::{
    ALPN, ModelVersion, PROTOCOL_VERSION, RoundId, UpdateEncoding,
    frame::FrameLimits,
    identity::{IdentityBundle, renewal_message},
    io::{StreamError, read_message, read_tensor, write_message, write_tensor, write_words},
    message::{
        CloseCode, EvalReport, EvalTask, Hello, Message, Payload, Redirect, RenewRequest, Task,
        UpdateHeader, UpdatePrivacy, UpdateReceipt,
    },
    secagg::{
        KeySigner, Participant, PeerVerifier, SecAggMessage, SecAggParams,
        session::Phase as SecAggPhase,
    },
    tensor::ChunkPlan,
};
use quinn::{ConnectionError, VarInt, crypto::rustls::QuicClientConfig};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rustls::{
    RootCertStore,
    pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject},
};
use tracing::{debug, info, warn};

use crate::{
    fetch::FetchError,
    trainer::{TrainError, Trainer},
};

#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error("identity bundle: {0}")]
    Identity(String),
    #[error("server address '{0}' does not resolve")]
    Address(String),
    #[error(
        "the server refused this client at the TLS handshake ({0}); the certificate may be revoked, expired or from another CA"
    )]
    Refused(String),
    #[error("incompatible server: {0}")]
    Incompatible(String),
    #[error("local training failed: {0}")]
    Train(#[from] TrainError),
    #[error("gave up after {attempts} connection attempts; last error: {last}")]
    GaveUp { attempts: u32, last: String },
    #[error("cannot open a local UDP socket: {0}")]
    Socket(std::io::Error),
    #[error(
        "the server sent a task without secure aggregation, and this client requires it: refusing to send an unmasked update"
    )]
    Downgrade,
    #[error(
        "the server's model is {bytes} bytes, over this device's limit of {limit} (--max-model-bytes)"
    )]
    ModelTooLarge { bytes: u64, limit: u64 },
}

/// Most model versions one federated evaluation may compare.
pub const MAX_EVAL_VERSIONS: usize = 4;

/// Knobs of the session loop.
#[derive(Clone, Debug)]
pub struct ClientOptions {
    /// Dial this instead of the bundle's `server_addr`.
    pub server_addr: Option<SocketAddr>,
    pub initial_backoff: Duration,
    pub max_backoff: Duration,
    /// Stop retrying after this long without a working connection.
    pub give_up_after: Option<Duration>,
    /// A connection silent this long is dead; keep-alives go at a third of it.
    pub idle_timeout: Duration,
    /// The protocol version announced in `Hello`; only compatibility tests
    /// change it.
    pub protocol_version: u16,
    /// Refuse any task that does not mask the update (secure aggregation),
    /// so a compromised server cannot downgrade this device.
    pub require_secure_aggregation: bool,
    /// Simulation only: vanish from rounds at random (see [`Dropout`]).
    pub dropout: Option<Dropout>,
    /// Where a renewed identity is saved (the file the bundle came from).
    /// Without it, a renewal lasts only as long as this process.
    pub identity_path: Option<std::path::PathBuf>,
    /// Largest global model (f32 bytes) this device accepts to download.
    pub max_model_bytes: u64,
    /// Where files a task names by hash are kept (a LoRA base, a
    /// tokenizer.json). Without it, tasks that need one are skipped.
    pub assets: Option<crate::assets::AssetCache>,
}

/// Simulated dropouts for covey-sim: with `probability`, a round's client
/// closes its connection at `phase` (one drawn at random when `None`), then
/// reconnects for later rounds, as a flaky device would.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Dropout {
    pub probability: f64,
    pub phase: Option<SecAggPhase>,
}

impl Default for ClientOptions {
    fn default() -> Self {
        Self {
            server_addr: None,
            initial_backoff: Duration::from_millis(200),
            max_backoff: Duration::from_secs(30),
            give_up_after: None,
            idle_timeout: Duration::from_secs(30),
            protocol_version: PROTOCOL_VERSION,
            require_secure_aggregation: false,
            dropout: None,
            identity_path: None,
            max_model_bytes: 1 << 30,
            assets: None,
        }
    }
}

#[derive(Clone, Debug, Default, PartialEq)]
pub struct ClientSummary {
    pub rounds_trained: u64,
    pub updates_accepted: u64,
    pub updates_rejected: u64,
    pub final_version: Option<ModelVersion>,
    pub bytes_up: u64,
    pub bytes_down: u64,
    pub connections: u32,
    /// Wall time of the rounds this device was selected for, from the task
    /// to the server's receipt: download, training, privacy, upload.
    pub round_time: Duration,
    /// The part of `round_time` spent inside the trainer.
    pub train_time: Duration,
    /// Times a cluster's leaf sent this device to another leaf or asked it
    /// to come back later.
    pub redirects: u32,
}

/// TLS 1.3 with the enrollment CA as the only root and the device
/// certificate for client auth.
pub fn client_config(
    identity: &IdentityBundle,
    idle_timeout: Duration,
) -> Result<quinn::ClientConfig, SessionError> {
    client_config_for(identity, idle_timeout, ALPN)
}

/// The same mutual-TLS configuration for another ALPN (the operator API).
pub fn client_config_for(
    identity: &IdentityBundle,
    idle_timeout: Duration,
    alpn: &[u8],
) -> Result<quinn::ClientConfig, SessionError> {
    let bad =
        |what: &str, e: &dyn std::fmt::Display| SessionError::Identity(format!("{what}: {e}"));
    let ca = CertificateDer::from_pem_slice(identity.ca_cert_pem.as_bytes())
        .map_err(|e| bad("CA certificate", &e))?;
    let cert = CertificateDer::from_pem_slice(identity.cert_pem.as_bytes())
        .map_err(|e| bad("certificate", &e))?;
    let key =
        PrivateKeyDer::from_pem_slice(identity.key_pem.as_bytes()).map_err(|e| bad("key", &e))?;
    let mut roots = RootCertStore::empty();
    roots.add(ca).map_err(|e| bad("CA certificate", &e))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| bad("TLS", &e))?
        .with_root_certificates(roots)
        .with_client_auth_cert(vec![cert], key)
        .map_err(|e| bad("certificate and key", &e))?;
    tls.alpn_protocols = vec![alpn.to_vec()];
    let crypto = QuicClientConfig::try_from(tls).map_err(|e| bad("QUIC", &e))?;
    let mut config = quinn::ClientConfig::new(Arc::new(crypto));
    let mut transport = quinn::TransportConfig::default();
    transport.keep_alive_interval(Some(idle_timeout / 3));
    transport.max_idle_timeout(Some(
        quinn::IdleTimeout::try_from(idle_timeout).map_err(|e| bad("idle timeout", &e))?,
    ));
    config.transport_config(Arc::new(transport));
    Ok(config)
}

/// Why one connection attempt ended.
/// The longest a redirect may park a device: a server asking for more is
/// treated as asking for this.
const MAX_REDIRECT_WAIT_MS: u64 = 15 * 60 * 1000;

enum Ended {
    /// The server finished the run.
    Finished,
    /// The server sent this device elsewhere, or asked it to come back
    /// later.
    Redirected(Redirect),
    /// Worth trying again after a pause.
    Retry(String),
    Fatal(SessionError),
}

/// What a connection error means for the session.
fn classify(e: &ConnectionError) -> Ended {
    let crypto = |code: u64| (0x100..0x200).contains(&code);
    match e {
        ConnectionError::ApplicationClosed(c) => {
            match CloseCode::from_u64(c.error_code.into_inner()) {
                Some(CloseCode::Done) => Ended::Finished,
                Some(CloseCode::Revoked) => Ended::Fatal(SessionError::Refused(
                    String::from_utf8_lossy(&c.reason).into_owned(),
                )),
                Some(CloseCode::IncompatibleVersion) => Ended::Fatal(SessionError::Incompatible(
                    String::from_utf8_lossy(&c.reason).into_owned(),
                )),
                _ => Ended::Retry(format!(
                    "server closed the connection: {}",
                    String::from_utf8_lossy(&c.reason)
                )),
            }
        }
        ConnectionError::ConnectionClosed(c) if crypto(c.error_code.into()) => {
            Ended::Fatal(SessionError::Refused(c.error_code.to_string()))
        }
        ConnectionError::TransportError(t) if crypto(t.code.into()) => {
            Ended::Fatal(SessionError::Refused(t.to_string()))
        }
        other => Ended::Retry(other.to_string()),
    }
}

/// Exponential backoff with full jitter (AWS architecture blog's variant):
/// sleep a uniform time in [0, min(max, initial·2ⁿ)].
struct Backoff {
    initial: Duration,
    max: Duration,
    attempt: u32,
}

impl Backoff {
    fn next(&mut self, rng: &mut impl Rng) -> Duration {
        let cap = self
            .initial
            .saturating_mul(1 << self.attempt.min(16))
            .min(self.max);
        self.attempt += 1;
        cap.mul_f64(rng.random::<f64>())
    }
}

/// Runs the device's side of the federation until the server ends the run.
pub async fn run(
    identity: &IdentityBundle,
    trainer: Box<dyn Trainer>,
    options: ClientOptions,
) -> Result<ClientSummary, SessionError> {
    let config = client_config(identity, options.idle_timeout)?;
    let addr = match options.server_addr {
        Some(a) => a,
        None => tokio::net::lookup_host(&identity.server_addr)
            .await
            .ok()
            .and_then(|mut a| a.next())
            .ok_or_else(|| SessionError::Address(identity.server_addr.clone()))?,
    };
    let bind: SocketAddr = if addr.is_ipv6() {
        "[::]:0"
            .parse()
            .map_err(|_| SessionError::Address("[::]:0".into()))?
    } else {
        SocketAddr::from(([0, 0, 0, 0], 0))
    };
    let mut endpoint = quinn::Endpoint::client(bind).map_err(SessionError::Socket)?;
    endpoint.set_default_client_config(config);
    let mut session = Session {
        trainer: Some(trainer),
        summary: ClientSummary::default(),
        options: options.clone(),
        rng: ChaCha8Rng::from_os_rng(),
        secagg_identity: secagg_identity_of(identity),
        identity: identity.clone(),
        config: client_config(identity, options.idle_timeout)?,
        pending: None,
    };
    let mut backoff = Backoff {
        initial: options.initial_backoff,
        max: options.max_backoff,
        attempt: 0,
    };
    let mut last_progress = Instant::now();
    // Where a redirect sent this device; a failure there sends it back to
    // its bundle's address, which redirects it anew.
    let mut current = addr;
    let result = loop {
        let ended = session
            .attempt(
                &endpoint,
                current,
                &identity.server_name,
                &mut backoff,
                &mut last_progress,
            )
            .await;
        match ended {
            Ended::Finished => break Ok(session.summary.clone()),
            Ended::Fatal(e) => break Err(e),
            Ended::Redirected(r) => {
                session.summary.redirects += 1;
                last_progress = Instant::now();
                if let Some(to) = &r.to {
                    match tokio::net::lookup_host(to.as_str())
                        .await
                        .ok()
                        .and_then(|mut a| a.next())
                    {
                        Some(next) => current = next,
                        None => {
                            warn!(
                                "the server redirected to an address that does not resolve; staying"
                            );
                            current = addr;
                        }
                    }
                }
                debug!(after_ms = r.after_ms, "redirected");
                tokio::time::sleep(Duration::from_millis(r.after_ms.min(MAX_REDIRECT_WAIT_MS)))
                    .await;
            }
            Ended::Retry(reason) => {
                current = addr;
                if let Some(limit) = options.give_up_after
                    && last_progress.elapsed() >= limit
                {
                    break Err(SessionError::GaveUp {
                        attempts: session.summary.connections.max(backoff.attempt),
                        last: reason,
                    });
                }
                let pause = backoff.next(&mut session.rng);
                info!(
                    "connection lost ({reason}); retrying in {:.1}s",
                    pause.as_secs_f64()
                );
                tokio::time::sleep(pause).await;
            }
        }
    };
    endpoint.close(VarInt::from_u32(CloseCode::Done as u32), b"bye");
    endpoint.wait_idle().await;
    result
}

struct Session {
    trainer: Option<Box<dyn Trainer>>,
    summary: ClientSummary,
    options: ClientOptions,
    rng: ChaCha8Rng,
    /// Signs this device's secure-aggregation keys and checks its peers'.
    secagg_identity: Result<Arc<(KeySigner, PeerVerifier)>, String>,
    /// The identity the next connection uses; renewal replaces it.
    identity: IdentityBundle,
    config: quinn::ClientConfig,
    /// An update a lost connection cut off, sent again on the next one.
    pending: Option<PendingUpload>,
}

fn secagg_identity_of(identity: &IdentityBundle) -> Result<Arc<(KeySigner, PeerVerifier)>, String> {
    KeySigner::from_pem(&identity.key_pem)
        .and_then(|signer| {
            PeerVerifier::from_ca_pem(&identity.ca_cert_pem).map(|v| Arc::new((signer, v)))
        })
        .map_err(|e| e.to_string())
}

fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// 96 bytes from the OS for a round's secure-aggregation secrets.
fn secagg_secrets() -> Result<[[u8; 32]; 3], ConverseError> {
    use ring::rand::SecureRandom;
    let rng = ring::rand::SystemRandom::new();
    let mut s = [[0u8; 32]; 3];
    for k in &mut s {
        rng.fill(k).map_err(|_| {
            ConverseError::Fatal(SessionError::Identity("the OS random source failed".into()))
        })?;
    }
    Ok(s)
}

/// One secure-aggregation request and its answer, on a stream of its own.
async fn secagg_exchange(
    conn: &quinn::Connection,
    message: SecAggMessage,
) -> Result<SecAggMessage, ConverseError> {
    let (mut send, mut recv) = conn.open_bi().await?;
    write_message(&mut send, &Message::SecAgg(message)).await?;
    let _ = send.finish();
    match read_message(&mut recv, FrameLimits::default()).await? {
        Message::SecAgg(answer) => Ok(answer),
        other => Err(ConverseError::Stream(StreamError::Unexpected {
            expected: "SecAgg",
            got: other.kind(),
        })),
    }
}

/// A simulated dropout: the device vanishes mid-round.
fn drop_out(
    conn: &quinn::Connection,
    round: covey_protocol::RoundId,
    phase: SecAggPhase,
) -> ConverseError {
    info!(round = %round, phase = phase.as_str(), "simulated dropout");
    conn.close(
        VarInt::from_u32(CloseCode::Done as u32),
        b"simulated dropout",
    );
    ConverseError::Stream(StreamError::Unexpected {
        expected: "to stay",
        got: "simulated dropout",
    })
}

impl Session {
    /// Renews this device's certificate onto a key generated here, proving
    /// possession; the next connection uses it. Returns the new expiry.
    async fn renew(&mut self, conn: &quinn::Connection) -> Result<i64, String> {
        use rcgen::{KeyPair, SigningKey};
        let key = KeyPair::generate().map_err(|e| e.to_string())?;
        let current = CertificateDer::from_pem_slice(self.identity.cert_pem.as_bytes())
            .map_err(|e| format!("current certificate: {e}"))?;
        let proof = key
            .sign(&renewal_message(&current))
            .map_err(|e| e.to_string())?;
        let (mut send, mut recv) = conn.open_bi().await.map_err(|e| e.to_string())?;
        let request = Message::Renew(RenewRequest {
            public_key: key.public_key_raw().to_vec(),
            proof,
        });
        write_message(&mut send, &request)
            .await
            .map_err(|e| e.to_string())?;
        let _ = send.finish();
        let renewed = match read_message(&mut recv, FrameLimits::default())
            .await
            .map_err(|e| e.to_string())?
        {
            Message::Renewed(r) => r,
            Message::Error(report) => return Err(report.detail),
            other => return Err(format!("unexpected {}", other.kind())),
        };
        let bundle = IdentityBundle {
            cert_pem: renewed.cert_pem,
            key_pem: key.serialize_pem(),
            issued_unix: Some(renewed.issued_unix),
            not_after_unix: Some(renewed.not_after_unix),
            ..self.identity.clone()
        };
        let config =
            client_config(&bundle, self.options.idle_timeout).map_err(|e| e.to_string())?;
        if let Some(path) = &self.options.identity_path {
            bundle
                .save(path)
                .map_err(|e| format!("saving {}: {e}", path.display()))?;
        }
        self.identity = bundle;
        self.config = config;
        Ok(renewed.not_after_unix)
    }

    async fn attempt(
        &mut self,
        endpoint: &quinn::Endpoint,
        addr: SocketAddr,
        server_name: &str,
        backoff: &mut Backoff,
        last_progress: &mut Instant,
    ) -> Ended {
        // Keys the peers check must match the certificate this connection shows.
        self.secagg_identity = secagg_identity_of(&self.identity);
        let connecting = match endpoint.connect_with(self.config.clone(), addr, server_name) {
            Ok(c) => c,
            Err(e) => return Ended::Fatal(SessionError::Address(e.to_string())),
        };
        let conn = match connecting.await {
            Ok(c) => c,
            Err(e) => return classify(&e),
        };
        self.summary.connections += 1;
        let result = self.converse(&conn, backoff, last_progress).await;
        match result {
            Err(ConverseError::Redirected(r)) => {
                conn.close(VarInt::from_u32(CloseCode::Done as u32), b"redirected");
                Ended::Redirected(r)
            }
            Ok(()) => {
                conn.close(VarInt::from_u32(CloseCode::Done as u32), b"run finished");
                Ended::Finished
            }
            Err(e) => match conn.close_reason() {
                Some(reason) => classify(&reason),
                None => {
                    conn.close(
                        VarInt::from_u32(CloseCode::ProtocolViolation as u32),
                        b"client error",
                    );
                    match e {
                        ConverseError::Redirected(r) => Ended::Redirected(r),
                        ConverseError::Fatal(e) => Ended::Fatal(e),
                        ConverseError::Stream(e) => Ended::Retry(e.to_string()),
                        ConverseError::Connection(e) => classify(&e),
                    }
                }
            },
        }
    }

    /// One connection's worth of work; `Ok` when the run finished.
    async fn converse(
        &mut self,
        conn: &quinn::Connection,
        backoff: &mut Backoff,
        last_progress: &mut Instant,
    ) -> Result<(), ConverseError> {
        let limits = FrameLimits::default();
        let (mut send, mut recv) = conn.open_bi().await?;
        write_message(
            &mut send,
            &Message::Hello(Hello {
                protocol: self.options.protocol_version,
                software: format!("covey-client {}", env!("CARGO_PKG_VERSION")),
            }),
        )
        .await?;
        let _ = send.finish();
        match read_message(&mut recv, limits).await? {
            Message::Welcome(w) if w.protocol == self.options.protocol_version => {}
            Message::Redirect(r) => return Err(ConverseError::Redirected(r)),
            Message::Welcome(w) => {
                return Err(ConverseError::Fatal(SessionError::Incompatible(format!(
                    "server speaks protocol {}, this client {}",
                    w.protocol, self.options.protocol_version
                ))));
            }
            Message::Error(report) if report.code == CloseCode::IncompatibleVersion => {
                return Err(ConverseError::Fatal(SessionError::Incompatible(
                    report.detail,
                )));
            }
            other => {
                return Err(ConverseError::Stream(StreamError::Unexpected {
                    expected: "Welcome",
                    got: other.kind(),
                }));
            }
        }
        debug!("connected");
        backoff.attempt = 0;
        *last_progress = Instant::now();
        if self.identity.renewal_due(unix_now()) {
            match self.renew(conn).await {
                Ok(not_after) => info!(not_after_unix = not_after, "certificate renewed"),
                Err(e) => warn!("certificate renewal failed; retrying at the next connection: {e}"),
            }
        }
        self.resume_upload(conn).await?;
        loop {
            let (mut send, mut recv) = conn.open_bi().await?;
            write_message(&mut send, &Message::CheckIn).await?;
            let _ = send.finish();
            match read_message(&mut recv, limits).await? {
                Message::Task(task) => {
                    let started = Instant::now();
                    let done = self.round(conn, task, &mut recv).await;
                    self.summary.round_time += started.elapsed();
                    done?;
                    *last_progress = Instant::now();
                }
                Message::Evaluate(task) => {
                    self.evaluate(conn, task, &mut recv).await?;
                }
                Message::RunFinished { final_version } => {
                    info!(version = %final_version, "the server finished the run");
                    self.summary.final_version = Some(final_version);
                    return Ok(());
                }
                other => {
                    return Err(ConverseError::Stream(StreamError::Unexpected {
                        expected: "Task or RunFinished",
                        got: other.kind(),
                    }));
                }
            }
        }
    }

    /// Runs `work` on the trainer on a blocking thread, so training never
    /// stalls the connection's keep-alives.
    async fn off_thread<T: Send + 'static>(
        &mut self,
        work: impl FnOnce(&mut dyn Trainer) -> T + Send + 'static,
    ) -> Result<T, ConverseError> {
        let Some(mut trainer) = self.trainer.take() else {
            let lost = TrainError::Panicked("an earlier training thread".into());
            return Err(ConverseError::Fatal(lost.into()));
        };
        let (trainer, out) = tokio::task::spawn_blocking(move || {
            let out = work(trainer.as_mut());
            (trainer, out)
        })
        .await
        .map_err(|e| ConverseError::Fatal(TrainError::Panicked(e.to_string()).into()))?;
        self.trainer = Some(trainer);
        Ok(out)
    }

    /// Evaluates the sent versions on held-out data and reports back.
    async fn evaluate(
        &mut self,
        conn: &quinn::Connection,
        task: EvalTask,
        recv: &mut quinn::RecvStream,
    ) -> Result<(), ConverseError> {
        if task.versions.len() > MAX_EVAL_VERSIONS {
            return Err(ConverseError::Stream(StreamError::Unexpected {
                expected: "at most 4 versions to evaluate",
                got: "more",
            }));
        }
        if let Err(e) = task.spec.validate() {
            warn!("refusing the evaluation: its model cannot be built: {e}");
            return Err(ConverseError::Stream(StreamError::Unexpected {
                expected: "an evaluation whose model can be built",
                got: "an invalid model spec",
            }));
        }
        let plan = ChunkPlan::new(task.spec.param_count(), task.chunk_len);
        let limits = FrameLimits {
            max_frame: plan
                .max_frame_body(UpdateEncoding::F32)
                .max(FrameLimits::default().max_frame),
        };
        let mut models = Vec::with_capacity(task.versions.len());
        for _ in &task.versions {
            models.push(read_tensor(recv, plan, UpdateEncoding::F32, limits).await?);
            self.summary.bytes_down += plan.wire_bytes(UpdateEncoding::F32);
        }
        let spec = task.spec;
        let results: Result<Vec<_>, TrainError> = self
            .off_thread(move |trainer| {
                models
                    .iter()
                    .map(|w| trainer.evaluate(spec.clone(), w))
                    .collect()
            })
            .await?;
        let (examples, results) = match results {
            Ok(r) if r.iter().all(Option::is_some) && !r.is_empty() => {
                let examples = r.first().and_then(|m| m.map(|(_, n)| n)).unwrap_or(0);
                (examples, r.into_iter().flatten().map(|(m, _)| m).collect())
            }
            Ok(_) => (0, Vec::new()),
            Err(e) => {
                warn!("federated evaluation failed: {e}");
                (0, Vec::new())
            }
        };
        let (mut send, _recv) = conn.open_bi().await?;
        let report = EvalReport {
            id: task.id,
            examples,
            results,
        };
        write_message(&mut send, &Message::EvalReport(report)).await?;
        let _ = send.finish();
        Ok(())
    }

    /// Secure aggregation's key phases: advertise signed keys, check the
    /// roster, share secrets. `None` when the round goes on without this
    /// device (aborted, or a roster it refuses).
    async fn key_phases(
        &mut self,
        conn: &quinn::Connection,
        task: &Task,
        params: SecAggParams,
        bits: u32,
        dropout: Option<SecAggPhase>,
    ) -> Result<Option<Participant>, ConverseError> {
        let identity = match &self.secagg_identity {
            Ok(id) => id.clone(),
            Err(e) => {
                warn!(round = %task.round, "cannot take part in secure aggregation: {e}");
                return Ok(None);
            }
        };
        let round = task.round;
        if dropout == Some(SecAggPhase::Advertise) {
            return Err(drop_out(conn, round, SecAggPhase::Advertise));
        }
        let mut participant = Participant::new(round, params, bits, secagg_secrets()?);
        let advertise = match participant.advertise(|m| identity.0.sign(m)) {
            Ok(a) => a,
            Err(e) => {
                warn!(round = %round, "cannot sign secure-aggregation keys: {e}");
                return Ok(None);
            }
        };
        let roster = match secagg_exchange(conn, SecAggMessage::Advertise(advertise)).await? {
            SecAggMessage::Roster(r) => r,
            SecAggMessage::Aborted { reason, .. } => {
                info!(round = %round, "secure aggregation ended for this device: {reason}");
                return Ok(None);
            }
            _ => {
                return Err(ConverseError::Stream(StreamError::Unexpected {
                    expected: "Roster",
                    got: "another secure-aggregation message",
                }));
            }
        };
        if dropout == Some(SecAggPhase::Share) {
            return Err(drop_out(conn, round, SecAggPhase::Share));
        }
        let verifier = identity.clone();
        let mut rng = rand_chacha::ChaCha20Rng::from_os_rng();
        let now = covey_protocol::secagg::keys::UnixTime::now();
        let shares =
            match participant.on_roster(&roster, verifier.1.roster_check(round, now), &mut rng) {
                Ok(s) => s,
                Err(e) => {
                    warn!(round = %round, "refusing the secure-aggregation roster: {e}");
                    return Ok(None);
                }
            };
        match secagg_exchange(conn, SecAggMessage::ShareKeys(shares)).await? {
            SecAggMessage::IncomingShares(incoming) => {
                if let Err(e) = participant.on_incoming(incoming) {
                    warn!(round = %round, "refusing the shares relayed to this device: {e}");
                    return Ok(None);
                }
                Ok(Some(participant))
            }
            SecAggMessage::Aborted { reason, .. } => {
                info!(round = %round, "secure aggregation ended for this device: {reason}");
                Ok(None)
            }
            _ => Err(ConverseError::Stream(StreamError::Unexpected {
                expected: "IncomingShares",
                got: "another secure-aggregation message",
            })),
        }
    }

    /// Secure aggregation's last phase: one share per neighbour, never both.
    async fn unmask_phase(
        &mut self,
        conn: &quinn::Connection,
        task: &Task,
        mut participant: Participant,
        dropout: Option<SecAggPhase>,
    ) -> Result<(), ConverseError> {
        let round = task.round;
        if dropout == Some(SecAggPhase::Unmask) {
            return Err(drop_out(conn, round, SecAggPhase::Unmask));
        }
        let request = match secagg_exchange(conn, SecAggMessage::AwaitUnmask { round }).await? {
            SecAggMessage::UnmaskRequest(r) => r,
            SecAggMessage::Aborted { reason, .. } => {
                info!(round = %round, "secure aggregation ended for this device: {reason}");
                return Ok(());
            }
            _ => {
                return Err(ConverseError::Stream(StreamError::Unexpected {
                    expected: "UnmaskRequest",
                    got: "another secure-aggregation message",
                }));
            }
        };
        let shares = match participant.on_unmask(&request) {
            Ok(s) => s,
            Err(e) => {
                warn!(round = %round, "refusing the unmask request: {e}");
                return Ok(());
            }
        };
        match secagg_exchange(conn, SecAggMessage::UnmaskShares(shares)).await? {
            SecAggMessage::Done { .. } => debug!(round = %round, "unmask shares delivered"),
            SecAggMessage::Aborted { reason, .. } => {
                info!(round = %round, "secure aggregation ended: {reason}")
            }
            _ => {}
        }
        Ok(())
    }

    async fn round(
        &mut self,
        conn: &quinn::Connection,
        task: Task,
        recv: &mut quinn::RecvStream,
    ) -> Result<(), ConverseError> {
        // Sizes come from the spec, so it is checked before anything is
        // sized from it (an external model's shapes are arbitrary numbers).
        // Without a size the model's frames cannot be skipped either: this
        // task's stream is dropped, and the device checks in again.
        if let Err(e) = task.spec.validate() {
            warn!(round = %task.round, "refusing the task: its model cannot be built: {e}");
            return Err(ConverseError::Stream(StreamError::Unexpected {
                expected: "a task whose model can be built",
                got: "an invalid model spec",
            }));
        }
        let params = task.spec.param_count();
        let model_bytes = params as u64 * 4;
        if model_bytes > self.options.max_model_bytes {
            return Err(ConverseError::Fatal(SessionError::ModelTooLarge {
                bytes: model_bytes,
                limit: self.options.max_model_bytes,
            }));
        }
        let plan = ChunkPlan::new(params, task.chunk_len);
        let limits = FrameLimits {
            max_frame: plan
                .max_frame_body(UpdateEncoding::F32)
                .max(FrameLimits::default().max_frame),
        };
        let global = read_tensor(recv, plan, UpdateEncoding::F32, limits).await?;
        self.summary.bytes_down += plan.wire_bytes(UpdateEncoding::F32);
        if !task.spec.assets().is_empty() {
            let Some(cache) = self.options.assets.clone() else {
                warn!(round = %task.round, "refusing the task: its model needs fetched files, and this device keeps no asset cache");
                return Ok(());
            };
            match crate::fetch::fetch_assets(conn, &task.spec, &cache).await {
                Ok(bytes) => self.summary.bytes_down += bytes,
                Err(FetchError::Stream(e)) => return Err(e.into()),
                Err(FetchError::Connection(e)) => return Err(e.into()),
                Err(e) => {
                    warn!(round = %task.round, "skipping the round: {e}");
                    return Ok(());
                }
            }
        }
        let dropout = self.options.dropout.and_then(|d| {
            (self.rng.random::<f64>() < d.probability).then(|| {
                d.phase.unwrap_or(
                    [
                        SecAggPhase::Advertise,
                        SecAggPhase::Share,
                        SecAggPhase::MaskedInput,
                        SecAggPhase::Unmask,
                    ][self.rng.random_range(0..4)],
                )
            })
        });
        let mut participant = match (task.secure_aggregation, &task.privacy) {
            (None, _) if self.options.require_secure_aggregation => {
                return Err(ConverseError::Fatal(SessionError::Downgrade));
            }
            (None, _) => None,
            (Some(params), UpdatePrivacy::Distributed { quantizer, .. }) => {
                let bits = quantizer.bits;
                match self.key_phases(conn, &task, params, bits, dropout).await? {
                    Some(p) => Some(p),
                    None => return Ok(()),
                }
            }
            (Some(_), _) => {
                warn!(round = %task.round, "the task asks to mask an unquantized update; skipping the round");
                return Ok(());
            }
        };
        info!(round = %task.round, base = %task.base_version, "training");
        let task_for_training = task.clone();
        let training = Instant::now();
        let result = self
            .off_thread(move |trainer| trainer.train_owned(&task_for_training, global))
            .await?;
        self.summary.train_time += training.elapsed();
        let output = match result {
            Ok(o) => o,
            Err(e) => {
                // Skip this round; checking in again tells the server.
                warn!(round = %task.round, "local training failed: {e}");
                return Ok(());
            }
        };
        self.summary.rounds_trained += 1;
        let mut delta = output.delta;
        // Clipping and noise happen here, on the device, whatever the
        // trainer did: what leaves is bounded, and noised when asked.
        let (within_clip, update) = match task.privacy {
            UpdatePrivacy::Plain => (None, Outgoing::Floats(delta)),
            UpdatePrivacy::Clipped { clip } => (
                Some(clip_l2(&mut delta, clip) <= clip.get()),
                Outgoing::Floats(delta),
            ),
            UpdatePrivacy::Distributed {
                clip,
                quantizer,
                noise_sigma,
            } => {
                clip_l2(&mut delta, clip);
                let mut rounding = ChaCha8Rng::from_rng(&mut self.rng);
                let noised = tokio::task::spawn_blocking(move || {
                    // Zero noise: secure aggregation without DP.
                    if noise_sigma == 0.0 {
                        return quantizer.encode(&delta, None, &mut rounding);
                    }
                    let gaussian = DiscreteGaussian::new(noise_sigma)?;
                    let mut noise = NoiseRng::from_os()?;
                    quantizer.encode(&delta, Some((&gaussian, &mut noise)), &mut rounding)
                })
                .await;
                match noised {
                    Ok(Ok(words)) => (None, Outgoing::Ring(words, quantizer.bits)),
                    // Nothing un-noised ever leaves: skip the round instead.
                    Ok(Err(e)) => {
                        warn!(round = %task.round, "cannot noise the update, skipping the round: {e}");
                        return Ok(());
                    }
                    Err(e) => {
                        warn!(round = %task.round, "noise task failed, skipping the round: {e}");
                        return Ok(());
                    }
                }
            }
        };
        // Without secure aggregation the upload is the only step to miss.
        if dropout == Some(SecAggPhase::MaskedInput)
            || (dropout.is_some() && task.secure_aggregation.is_none())
        {
            return Err(drop_out(conn, task.round, SecAggPhase::MaskedInput));
        }
        let update = match (participant.take(), update) {
            (Some(mut p), Outgoing::Ring(mut words, bits)) => {
                let masked = tokio::task::spawn_blocking(move || {
                    let r = p.mask(&mut words);
                    (p, words, r)
                })
                .await
                .map_err(|e| ConverseError::Fatal(TrainError::Panicked(e.to_string()).into()))?;
                let (p, words, result) = masked;
                if let Err(e) = result {
                    warn!(round = %task.round, "cannot mask the update, skipping the round: {e}");
                    return Ok(());
                }
                participant = Some(p);
                Outgoing::Ring(words, bits)
            }
            (Some(_), Outgoing::Floats(_)) => {
                // Never reached: a masked task is quantized above.
                warn!(round = %task.round, "refusing to send an unmasked update");
                return Ok(());
            }
            (None, update) => update,
        };
        let (payload, param_count) = match &update {
            Outgoing::Floats(v) => (Payload::Floats(task.update_encoding), v.len()),
            Outgoing::Ring(w, bits) => (Payload::Ring { bits: *bits }, w.len()),
        };
        let header = UpdateHeader {
            round: task.round,
            base_version: task.base_version,
            payload,
            param_count: param_count as u64,
            num_examples: output.num_examples,
            metrics: output.metrics,
            within_clip,
        };
        let upload = PendingUpload {
            header,
            update,
            chunk_len: task.chunk_len,
            encoding: task.update_encoding,
            until: Instant::now() + Duration::from_millis(task.deadline_ms),
        };
        let receipt = match send_update(conn, &upload, &mut self.rng).await {
            Ok((receipt, bytes)) => {
                self.summary.bytes_up += bytes;
                receipt
            }
            Err(e) => {
                // A masked update cannot be resent: its keys died with
                // the connection. A plain or noised one can.
                if participant.is_none() {
                    self.pending = Some(upload);
                }
                return Err(e);
            }
        };
        if self.note_receipt(task.round, receipt)
            && let Some(p) = participant
        {
            self.unmask_phase(conn, &task, p, dropout).await?;
        }
        Ok(())
    }

    /// Counts the server's verdict on an update; true when accepted.
    fn note_receipt(&mut self, round: RoundId, receipt: UpdateReceipt) -> bool {
        match receipt {
            UpdateReceipt::Accepted => {
                self.summary.updates_accepted += 1;
                debug!(round = %round, "update accepted");
                true
            }
            UpdateReceipt::Rejected(reason) => {
                self.summary.updates_rejected += 1;
                warn!(round = %round, "update rejected: {reason}");
                false
            }
        }
    }

    /// Sends again the update a lost connection cut off, while its round
    /// may still take it.
    async fn resume_upload(&mut self, conn: &quinn::Connection) -> Result<(), ConverseError> {
        let Some(upload) = self.pending.take() else {
            return Ok(());
        };
        if Instant::now() >= upload.until {
            debug!(round = %upload.header.round, "the cut-off update's round is over; dropping it");
            return Ok(());
        }
        info!(round = %upload.header.round, "sending again the update a lost connection cut off");
        match send_update(conn, &upload, &mut self.rng).await {
            Ok((receipt, bytes)) => {
                self.summary.bytes_up += bytes;
                self.note_receipt(upload.header.round, receipt);
                Ok(())
            }
            Err(e) => {
                self.pending = Some(upload);
                Err(e)
            }
        }
    }
}

/// An update whose receipt has not arrived: kept so that a connection lost
/// mid-upload costs the round nothing (the server waits for the client a
/// grace period).
struct PendingUpload {
    header: UpdateHeader,
    update: Outgoing,
    chunk_len: u32,
    encoding: UpdateEncoding,
    /// The round's deadline; after it, resending is pointless.
    until: Instant,
}

/// Sends one update and reads the server's receipt; returns it and the
/// bytes sent.
async fn send_update(
    conn: &quinn::Connection,
    upload: &PendingUpload,
    rng: &mut ChaCha8Rng,
) -> Result<(UpdateReceipt, u64), ConverseError> {
    let (mut send, mut recv) = conn.open_bi().await?;
    write_message(&mut send, &Message::Update(upload.header.clone())).await?;
    // The server says when it has room, or refuses at once.
    match read_message(&mut recv, FrameLimits::default()).await? {
        Message::SendUpdate => {}
        Message::UpdateReceipt(receipt) => return Ok((receipt, 0)),
        other => {
            return Err(ConverseError::Stream(StreamError::Unexpected {
                expected: "SendUpdate or UpdateReceipt",
                got: other.kind(),
            }));
        }
    }
    let plan = ChunkPlan::new(upload.header.param_count as usize, upload.chunk_len);
    let sent = match &upload.update {
        Outgoing::Floats(values) => {
            write_tensor(&mut send, values, plan, upload.encoding, rng).await
        }
        Outgoing::Ring(words, _) => write_words(&mut send, words, plan).await,
    };
    // The server may stop reading early to refuse; its receipt says why.
    let bytes = sent.unwrap_or(0);
    let _ = send.finish();
    match read_message(&mut recv, FrameLimits::default()).await? {
        Message::UpdateReceipt(receipt) => Ok((receipt, bytes)),
        other => Err(ConverseError::Stream(StreamError::Unexpected {
            expected: "UpdateReceipt",
            got: other.kind(),
        })),
    }
}

/// An update as it leaves the device.
enum Outgoing {
    Floats(Vec<f32>),
    /// Ring words and the ring's bits.
    Ring(Vec<u32>, u32),
}

enum ConverseError {
    /// Not an error: the server sent this device on.
    Redirected(Redirect),
    Connection(ConnectionError),
    Stream(StreamError),
    Fatal(SessionError),
}

impl From<ConnectionError> for ConverseError {
    fn from(e: ConnectionError) -> Self {
        Self::Connection(e)
    }
}

impl From<StreamError> for ConverseError {
    fn from(e: StreamError) -> Self {
        Self::Stream(e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_to_its_cap_and_jitters() {
        let mut rng = ChaCha8Rng::seed_from_u64(0);
        let mut b = Backoff {
            initial: Duration::from_millis(100),
            max: Duration::from_secs(1),
            attempt: 0,
        };
        let pauses: Vec<Duration> = (0..40).map(|_| b.next(&mut rng)).collect();
        assert!(pauses.iter().all(|p| *p <= Duration::from_secs(1)));
        assert!(pauses[0] <= Duration::from_millis(100));
        let late: Vec<_> = pauses[10..].iter().collect();
        assert!(late.iter().any(|p| **p > Duration::from_millis(500)));
        assert!(late.windows(2).any(|w| w[0] != w[1]), "no jitter");
    }
}
