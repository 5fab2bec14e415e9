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
    ALPN, ModelVersion, PROTOCOL_VERSION, UpdateEncoding,
    frame::FrameLimits,
    identity::IdentityBundle,
    io::{StreamError, read_message, read_tensor, write_message, write_tensor, write_words},
    message::{
        CloseCode, EvalReport, EvalTask, Hello, Message, Payload, Task, UpdateHeader,
        UpdatePrivacy, UpdateReceipt,
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

use crate::trainer::{TrainError, Trainer};

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
}

/// TLS 1.3 with the enrollment CA as the only root and the device
/// certificate for client auth.
pub fn client_config(
    identity: &IdentityBundle,
    idle_timeout: Duration,
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
    tls.alpn_protocols = vec![ALPN.to_vec()];
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
enum Ended {
    /// The server finished the run.
    Finished,
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
    };
    let mut backoff = Backoff {
        initial: options.initial_backoff,
        max: options.max_backoff,
        attempt: 0,
    };
    let mut last_progress = Instant::now();
    let result = loop {
        let ended = session
            .attempt(
                &endpoint,
                addr,
                &identity.server_name,
                &mut backoff,
                &mut last_progress,
            )
            .await;
        match ended {
            Ended::Finished => break Ok(session.summary.clone()),
            Ended::Fatal(e) => break Err(e),
            Ended::Retry(reason) => {
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
}

impl Session {
    async fn attempt(
        &mut self,
        endpoint: &quinn::Endpoint,
        addr: SocketAddr,
        server_name: &str,
        backoff: &mut Backoff,
        last_progress: &mut Instant,
    ) -> Ended {
        let connecting = match endpoint.connect(addr, server_name) {
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
        loop {
            let (mut send, mut recv) = conn.open_bi().await?;
            write_message(&mut send, &Message::CheckIn).await?;
            let _ = send.finish();
            match read_message(&mut recv, limits).await? {
                Message::Task(task) => {
                    self.round(conn, task, &mut recv).await?;
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
            .off_thread(move |trainer| models.iter().map(|w| trainer.evaluate(spec, w)).collect())
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

    async fn round(
        &mut self,
        conn: &quinn::Connection,
        task: Task,
        recv: &mut quinn::RecvStream,
    ) -> Result<(), ConverseError> {
        let params = task.spec.param_count();
        let plan = ChunkPlan::new(params, task.chunk_len);
        let limits = FrameLimits {
            max_frame: plan
                .max_frame_body(UpdateEncoding::F32)
                .max(FrameLimits::default().max_frame),
        };
        let global = read_tensor(recv, plan, UpdateEncoding::F32, limits).await?;
        self.summary.bytes_down += plan.wire_bytes(UpdateEncoding::F32);
        info!(round = %task.round, base = %task.base_version, "training");
        let task_for_training = task.clone();
        let result = self
            .off_thread(move |trainer| trainer.train(&task_for_training, &global))
            .await?;
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
        let (mut send, mut recv) = conn.open_bi().await?;
        write_message(&mut send, &Message::Update(header)).await?;
        let up_plan = ChunkPlan::new(param_count, task.chunk_len);
        let sent = match &update {
            Outgoing::Floats(values) => {
                write_tensor(
                    &mut send,
                    values,
                    up_plan,
                    task.update_encoding,
                    &mut self.rng,
                )
                .await
            }
            Outgoing::Ring(words, _) => write_words(&mut send, words, up_plan).await,
        };
        // The server may stop reading early to refuse; its receipt says why.
        if let Ok(n) = sent {
            self.summary.bytes_up += n;
        }
        let _ = send.finish();
        match read_message(&mut recv, FrameLimits::default()).await? {
            Message::UpdateReceipt(UpdateReceipt::Accepted) => {
                self.summary.updates_accepted += 1;
                debug!(round = %task.round, "update accepted");
            }
            Message::UpdateReceipt(UpdateReceipt::Rejected(reason)) => {
                self.summary.updates_rejected += 1;
                warn!(round = %task.round, "update rejected: {reason}");
            }
            other => {
                return Err(ConverseError::Stream(StreamError::Unexpected {
                    expected: "UpdateReceipt",
                    got: other.kind(),
                }));
            }
        }
        Ok(())
    }
}

/// An update as it leaves the device.
enum Outgoing {
    Floats(Vec<f32>),
    /// Ring words and the ring's bits.
    Ring(Vec<u32>, u32),
}

enum ConverseError {
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
