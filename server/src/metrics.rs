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

/// Every series the server exports.
pub struct Metrics {
    registry: Registry,
    /// Rounds ended, by outcome (committed, aborted).
    pub rounds: Family<Outcome, Counter>,
    /// The current global model version.
    pub model_version: Gauge,
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
        let connections_refused = Family::<Reason, Counter>::default();
        registry.register(
            "connections_refused",
            "Connections and requests refused, by reason",
            connections_refused.clone(),
        );
        Self {
            registry,
            rounds,
            model_version,
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
