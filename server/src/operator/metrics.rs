//! The Prometheus endpoint: what an operator's dashboards and alerts read.
//!
//! Counters are the run's own bookkeeping (the run summary and round records
//! read the byte counters from here), so the endpoint never disagrees with
//! `status`. Labels carry reasons and phases, never client identities.

use std::{
    convert::Infallible,
    net::SocketAddr,
    sync::{Arc, atomic::AtomicU64},
    time::Duration,
};

use http_body_util::Full;
use hyper::{Method, Request, Response, StatusCode, body::Bytes, service::service_fn};
use hyper_util::rt::{TokioIo, TokioTimer};
use prometheus_client::{
    encoding::{EncodeLabelSet, text::encode},
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::{Registry, Unit},
};
use tracing::{debug, warn};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Outcome {
    pub outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Reason {
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Phase {
    pub phase: &'static str,
}

/// Refusals that are not limits: a client that failed QUIC's address
/// validation or the TLS and version handshake, and a refused dashboard
/// sign-in.
pub const ADDRESS_VALIDATION_FAILED: &str = "address validation failed";
pub const HANDSHAKE_FAILED: &str = "handshake failed";
pub const DASHBOARD_SIGN_IN_REFUSED: &str = "dashboard sign-in refused";

/// Every series the server exports.
pub struct Metrics {
    registry: Registry,
    /// Rounds ended, by outcome (committed, aborted).
    pub rounds: Family<Outcome, Counter>,
    /// The current global model version.
    pub model_version: Gauge,
    /// The version the run stops at, so alerts can tell a finished run
    /// from a stalled one.
    pub target_version: Gauge,
    /// How long a round may collect; the stall alert counts in these.
    pub round_timeout: Gauge<f64, AtomicU64>,
    /// When the last version was committed (or the server started).
    pub last_commit: Gauge<f64, AtomicU64>,
    /// The ε the run may spend (0 without differential privacy).
    pub epsilon_target: Gauge<f64, AtomicU64>,
    /// The smallest cohort a release may come from (k).
    pub min_cohort: Gauge,
    /// The last committed version on the server's test set (central
    /// evaluation), and the devices' mean training loss in its round.
    pub test_accuracy: Gauge<f64, AtomicU64>,
    pub test_loss: Gauge<f64, AtomicU64>,
    pub client_loss: Gauge<f64, AtomicU64>,
    /// Members selected for the round in progress (or the last one); in
    /// FedBuff mode, tasks handed out for the open buffer.
    pub selected: Gauge,
    /// Updates accepted into the last ended round.
    pub participants: Gauge,
    /// Updates accepted, over the run.
    pub updates_accepted: Counter,
    /// Updates refused, by reason.
    pub rejected: Family<Reason, Counter>,
    /// Uploads cut off by a lost connection (the client may resume).
    pub uploads_interrupted: Counter,
    /// Update payload bytes received, frame headers included.
    pub bytes_in: Counter,
    /// Model payload bytes sent, frame headers included.
    pub bytes_out: Counter,
    /// Seconds spent in each phase of a round.
    pub phase_seconds: Family<Phase, Histogram>,
    /// ε spent so far (0 without differential privacy).
    pub epsilon: Gauge<f64, AtomicU64>,
    /// Connections open now.
    pub connections_open: Gauge,
    /// Connections accepted after the handshake, over the run.
    pub connections_accepted: Counter,
    /// A leaf's: devices sent to their own leaf or told to come back later.
    pub redirects: Counter,
    /// Connections and requests refused, by reason.
    pub connections_refused: Family<Reason, Counter>,
    /// The latest duration of each phase, for the dashboard (a histogram
    /// cannot be read back).
    latest_phase: std::sync::Mutex<std::collections::BTreeMap<&'static str, f64>>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("covey");
        let rounds = Family::<Outcome, Counter>::default();
        registry.register("rounds", "Rounds ended, by outcome", rounds.clone());
        let model_version = Gauge::default();
        registry.register(
            "model_version",
            "Current global model version",
            model_version.clone(),
        );
        let target_version = Gauge::default();
        registry.register(
            "target_version",
            "The version the run stops at",
            target_version.clone(),
        );
        let round_timeout = Gauge::<f64, AtomicU64>::default();
        registry.register_with_unit(
            "round_timeout",
            "How long a round may collect updates",
            Unit::Seconds,
            round_timeout.clone(),
        );
        let last_commit = Gauge::<f64, AtomicU64>::default();
        registry.register_with_unit(
            "last_commit_timestamp",
            "Unix time of the last commit, or of the server's start",
            Unit::Seconds,
            last_commit.clone(),
        );
        let epsilon_target = Gauge::<f64, AtomicU64>::default();
        registry.register(
            "epsilon_target",
            "The differential-privacy epsilon the run may spend (0 without DP)",
            epsilon_target.clone(),
        );
        let min_cohort = Gauge::default();
        registry.register(
            "min_cohort",
            "The smallest cohort a release may come from (k)",
            min_cohort.clone(),
        );
        let test_accuracy = Gauge::<f64, AtomicU64>::default();
        registry.register(
            "test_accuracy",
            "Accuracy of the last committed version on the server's test set",
            test_accuracy.clone(),
        );
        let test_loss = Gauge::<f64, AtomicU64>::default();
        registry.register(
            "test_loss",
            "Mean loss of the last committed version on the server's test set",
            test_loss.clone(),
        );
        let client_loss = Gauge::<f64, AtomicU64>::default();
        registry.register(
            "client_loss",
            "Devices' example-weighted mean training loss in the last committed round",
            client_loss.clone(),
        );
        let selected = Gauge::default();
        registry.register(
            "round_selected",
            "Members selected for the current or last round (FedBuff: tasks handed out for the open buffer)",
            selected.clone(),
        );
        let participants = Gauge::default();
        registry.register(
            "round_participants",
            "Updates accepted into the last ended round",
            participants.clone(),
        );
        let updates_accepted = Counter::default();
        registry.register(
            "updates_accepted",
            "Updates accepted into an aggregate",
            updates_accepted.clone(),
        );
        let rejected = Family::<Reason, Counter>::default();
        registry.register(
            "updates_rejected",
            "Updates refused, by reason",
            rejected.clone(),
        );
        let uploads_interrupted = Counter::default();
        registry.register(
            "uploads_interrupted",
            "Uploads cut off by a lost connection",
            uploads_interrupted.clone(),
        );
        let bytes_in = Counter::default();
        registry.register_with_unit(
            "received",
            "Update bytes received",
            Unit::Bytes,
            bytes_in.clone(),
        );
        let bytes_out = Counter::default();
        registry.register_with_unit("sent", "Model bytes sent", Unit::Bytes, bytes_out.clone());
        let phase_seconds = Family::<Phase, Histogram>::new_with_constructor(|| {
            // 1 ms to about 9 minutes.
            Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(
                0.001, 2.0, 20,
            ))
        });
        registry.register_with_unit(
            "phase",
            "Time spent in each phase of a round",
            Unit::Seconds,
            phase_seconds.clone(),
        );
        let epsilon = Gauge::<f64, AtomicU64>::default();
        registry.register(
            "epsilon_spent",
            "Differential-privacy epsilon spent so far",
            epsilon.clone(),
        );
        let connections_open = Gauge::default();
        registry.register(
            "connections_open",
            "Client connections open now",
            connections_open.clone(),
        );
        let connections_accepted = Counter::default();
        registry.register(
            "connections_accepted",
            "Connections admitted after the TLS and version handshake",
            connections_accepted.clone(),
        );
        let redirects = Counter::default();
        registry.register(
            "redirects",
            "Devices a leaf sent to the leaf that serves them, or paced",
            redirects.clone(),
        );
        let connections_refused = Family::<Reason, Counter>::default();
        registry.register(
            "connections_refused",
            "Connections and requests refused, by reason",
            connections_refused.clone(),
        );
        // Every known reason starts at zero, so rate() and alerts see the
        // series from the first scrape rather than from the first event.
        for reason in covey_protocol::message::RejectReason::ALL {
            let _ = rejected.get_or_create(&Reason {
                reason: reason.as_str(),
            });
        }
        for outcome in ["committed", "aborted"] {
            let _ = rounds.get_or_create(&Outcome { outcome });
        }
        let others = [
            ADDRESS_VALIDATION_FAILED,
            HANDSHAKE_FAILED,
            DASHBOARD_SIGN_IN_REFUSED,
        ];
        for reason in crate::admission::limits::Refusal::ALL
            .map(crate::admission::limits::Refusal::as_str)
            .into_iter()
            .chain(others)
        {
            let _ = connections_refused.get_or_create(&Reason { reason });
        }
        Self {
            registry,
            rounds,
            model_version,
            target_version,
            round_timeout,
            last_commit,
            epsilon_target,
            min_cohort,
            test_accuracy,
            test_loss,
            client_loss,
            selected,
            participants,
            updates_accepted,
            rejected,
            uploads_interrupted,
            bytes_in,
            bytes_out,
            phase_seconds,
            epsilon,
            connections_open,
            connections_accepted,
            redirects,
            connections_refused,
            latest_phase: Default::default(),
        }
    }

    pub fn observe_phase(&self, phase: &'static str, elapsed: Duration) {
        self.phase_seconds
            .get_or_create(&Phase { phase })
            .observe(elapsed.as_secs_f64());
        if let Ok(mut latest) = self.latest_phase.lock() {
            latest.insert(phase, elapsed.as_secs_f64());
        }
    }

    /// Each phase's latest duration in seconds.
    pub fn latest_phases(&self) -> std::collections::BTreeMap<&'static str, f64> {
        self.latest_phase
            .lock()
            .map(|l| l.clone())
            .unwrap_or_default()
    }

    pub fn refuse_connection(&self, reason: &'static str) {
        self.connections_refused
            .get_or_create(&Reason { reason })
            .inc();
    }

    /// Records a commit (or the start) as now, with what it measured.
    pub fn committed_now(&self, record: Option<&crate::state::store::RoundRecord>) {
        self.last_commit
            .set(crate::state::store::unix_ms_now() as f64 / 1000.0);
        let Some(r) = record else { return };
        for (gauge, value) in [
            (&self.test_accuracy, r.test_accuracy),
            (&self.test_loss, r.test_loss),
            (&self.client_loss, r.mean_client_loss),
        ] {
            if let Some(v) = value {
                gauge.set(f64::from(v));
            }
        }
    }

    /// The OpenMetrics text exposition of every series.
    pub fn render(&self) -> String {
        let mut text = String::new();
        // Writing into a String cannot fail.
        let _ = encode(&mut text, &self.registry);
        text
    }
}

/// Counts a connection as open for as long as the guard lives.
pub struct OpenConnection(Arc<Metrics>);

impl OpenConnection {
    pub fn new(metrics: Arc<Metrics>) -> Self {
        metrics.connections_open.inc();
        Self(metrics)
    }
}

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.0.connections_open.dec();
    }
}

/// Slow or silent scrapers are cut off after this long.
const HEADER_TIMEOUT: Duration = Duration::from_secs(5);

/// Serves `GET /metrics` on `listener` until the task is dropped.
pub async fn serve(listener: tokio::net::TcpListener, metrics: Arc<Metrics>) {
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                warn!("metrics endpoint: accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let metrics = metrics.clone();
        tokio::spawn(async move {
            let service = service_fn(move |request: Request<hyper::body::Incoming>| {
                let metrics = metrics.clone();
                async move { Ok::<_, Infallible>(respond(&request, &metrics)) }
            });
            let served = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .serve_connection(TokioIo::new(stream), service)
                .await;
            if let Err(e) = served {
                debug!("metrics endpoint: connection ended: {e}");
            }
        });
    }
}

fn respond(request: &Request<hyper::body::Incoming>, metrics: &Metrics) -> Response<Full<Bytes>> {
    let (status, content_type, body) = match (request.method(), request.uri().path()) {
        (&Method::GET, "/metrics") => (
            StatusCode::OK,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            metrics.render(),
        ),
        (&Method::GET, _) => (
            StatusCode::NOT_FOUND,
            "text/plain; charset=utf-8",
            "not found; metrics are at /metrics\n".to_owned(),
        ),
        _ => (
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain; charset=utf-8",
            "only GET is served\n".to_owned(),
        ),
    };
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    if let Ok(value) = content_type.parse() {
        response
            .headers_mut()
            .insert(hyper::header::CONTENT_TYPE, value);
    }
    response
}

/// Binds the endpoint now, so a bad address fails at start-up, not later.
pub fn bind(addr: SocketAddr) -> std::io::Result<std::net::TcpListener> {
    let listener = std::net::TcpListener::bind(addr)?;
    listener.set_nonblocking(true)?;
    Ok(listener)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rendering_names_every_series_with_its_labels() {
        let m = Metrics::new();
        m.rounds
            .get_or_create(&Outcome {
                outcome: "committed",
            })
            .inc();
        m.rejected
            .get_or_create(&Reason {
                reason: "non-finite values",
            })
            .inc_by(3);
        m.bytes_in.inc_by(1234);
        m.epsilon.set(1.5);
        m.observe_phase("collect", Duration::from_millis(250));
        let _open = OpenConnection::new(Arc::new(Metrics::new()));
        let text = m.render();
        for line in [
            "covey_rounds_total{outcome=\"committed\"} 1",
            "covey_updates_rejected_total{reason=\"non-finite values\"} 3",
            "covey_received_bytes_total 1234",
            "covey_epsilon_spent 1.5",
            "covey_phase_seconds_count{phase=\"collect\"} 1",
            "covey_connections_open 0",
            "covey_target_version 0",
            "covey_last_commit_timestamp_seconds 0.0",
            "covey_round_timeout_seconds 0.0",
            "covey_epsilon_target 0.0",
        ] {
            assert!(text.contains(line), "missing {line:?} in\n{text}");
        }
        assert!(text.ends_with("# EOF\n"));
    }

    #[test]
    fn an_open_connection_counts_until_dropped() {
        let m = Arc::new(Metrics::new());
        let a = OpenConnection::new(m.clone());
        let b = OpenConnection::new(m.clone());
        assert_eq!(m.connections_open.get(), 2);
        drop(a);
        assert_eq!(m.connections_open.get(), 1);
        drop(b);
        assert_eq!(m.connections_open.get(), 0);
    }
}
