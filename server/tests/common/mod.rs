//! Shared harness: state directories, enrolled identities, servers on
//! loopback ports chosen at run time, and a trainer whose updates are known.
#![allow(dead_code)]

use std::{net::SocketAddr, path::Path, sync::Arc, time::Duration};

use covey_client::{
    ClientOptions, TrainOutput, Trainer, session::client_config, trainer::TrainError,
};
use covey_protocol::{
    PROTOCOL_VERSION, UpdateEncoding,
    frame::FrameLimits,
    identity::IdentityBundle,
    io::{read_message, write_message},
    message::{Hello, LocalMetrics, Message, Payload, Task, UpdateHeader},
    tensor::ChunkPlan,
};
use covey_server::{RunSummary, Server, ServerConfig, StateDir};

pub fn config(model: &str, rounds: u64, clients: usize) -> ServerConfig {
    let mut c = ServerConfig::default();
    c.server.listen = "127.0.0.1:0".parse().unwrap();
    c.server.public_addr = "127.0.0.1:0".into();
    c.model.architecture = model.into();
    c.rounds.rounds = rounds;
    c.rounds.clients_per_round = clients;
    c.rounds.min_clients = clients;
    c.rounds.quorum = clients;
    c.rounds.round_timeout_secs = 60.0;
    // Tests of small cohorts; the k-threshold has its own.
    c.compliance.min_cohort = 1;
    c
}

pub fn init(dir: &Path, config: &ServerConfig) -> StateDir {
    let filter = tracing_subscriber::EnvFilter::try_from_env("COVEY_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_test_writer()
        .try_init();
    let state = StateDir::new(dir);
    state.init(config).unwrap();
    state
}

pub fn enroll(state: &StateDir, names: &[&str]) -> Vec<IdentityBundle> {
    let store = state.open_store().unwrap();
    names
        .iter()
        .map(|n| {
            state
                .enroll(&store, n, Duration::from_secs(3600), None)
                .unwrap()
        })
        .collect()
}

pub fn start(state: &StateDir) -> (SocketAddr, tokio::task::JoinHandle<RunSummary>) {
    let server = Server::open(state).unwrap();
    let addr = server.local_addr().unwrap();
    (
        addr,
        tokio::spawn(async move { server.run().await.unwrap() }),
    )
}

pub fn options(addr: SocketAddr) -> ClientOptions {
    ClientOptions {
        server_addr: Some(addr),
        initial_backoff: Duration::from_millis(50),
        max_backoff: Duration::from_millis(500),
        give_up_after: Some(Duration::from_secs(60)),
        idle_timeout: Duration::from_secs(3),
        ..ClientOptions::default()
    }
}

/// The update client `id` sends when training on `base`: known values,
/// so tests can check the server's arithmetic exactly.
pub fn scripted_delta(id: u32, base: u64, len: usize) -> Vec<f32> {
    (0..len)
        .map(|i| ((i % 7) as f32 - 3.0) * 1e-3 * (id as f32 + 1.0) + base as f32 * 1e-4)
        .collect()
}

pub fn scripted_examples(id: u32) -> u64 {
    10 * (u64::from(id) + 1)
}

/// Returns [`scripted_delta`], after an optional pause that keeps rounds in
/// flight long enough for fault injection.
pub struct ScriptedTrainer {
    pub id: u32,
    pub pause: Duration,
}

impl Trainer for ScriptedTrainer {
    fn train(&mut self, task: &Task, global: &[f32]) -> Result<TrainOutput, TrainError> {
        std::thread::sleep(self.pause);
        Ok(TrainOutput {
            delta: scripted_delta(self.id, task.base_version.0, global.len()),
            num_examples: scripted_examples(self.id),
            metrics: LocalMetrics {
                loss: 1.0 + self.id as f32,
                accuracy: 0.5,
            },
        })
    }

    fn evaluate(
        &mut self,
        _spec: covey_protocol::model::ModelSpec,
        weights: &[f32],
    ) -> Result<Option<(LocalMetrics, u64)>, TrainError> {
        Ok(Some(scripted_eval(self.id, weights[0])))
    }
}

/// FedAvg by hand: w ← w + Σ nᵢΔᵢ / Σ nᵢ over `ids`, for each base version.
pub fn expected_model(initial: &[f32], ids: &[u32], rounds: u64) -> Vec<f32> {
    expected_with_momentum(initial, ids, rounds, 0.0)
}

/// The same under FedAvgM at a server learning rate of 1: each round's
/// mean update goes into the momentum `m = β·m + mean`, and `m` into the
/// model.
pub fn expected_with_momentum(initial: &[f32], ids: &[u32], rounds: u64, beta: f64) -> Vec<f32> {
    let mut w: Vec<f64> = initial.iter().map(|&v| f64::from(v)).collect();
    let mut m = vec![0.0f64; w.len()];
    for base in 0..rounds {
        let total: f64 = ids.iter().map(|&id| scripted_examples(id) as f64).sum();
        let mut mean = vec![0.0f64; w.len()];
        for &id in ids {
            let d = scripted_delta(id, base, w.len());
            let n = scripted_examples(id) as f64;
            for (mi, di) in mean.iter_mut().zip(&d) {
                *mi += n * f64::from(*di) / total;
            }
        }
        for ((wi, mi), d) in w.iter_mut().zip(&mut m).zip(&mean) {
            *mi = beta * *mi + d;
            *wi += *mi;
        }
    }
    w.into_iter().map(|v| v as f32).collect()
}

pub fn assert_close(actual: &[f32], expected: &[f32], tol: f32) {
    assert_eq!(actual.len(), expected.len());
    for (i, (a, e)) in actual.iter().zip(expected).enumerate() {
        assert!((a - e).abs() <= tol, "param {i}: {a} vs expected {e}");
    }
}

/// A QUIC connection with `bundle`'s certificate, before any message, or
/// why the TLS handshake failed.
pub async fn try_connect(
    bundle: &IdentityBundle,
    addr: SocketAddr,
) -> Result<quinn::Connection, quinn::ConnectionError> {
    let mut endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    endpoint.set_default_client_config(client_config(bundle, Duration::from_secs(10)).unwrap());
    endpoint.connect(addr, &bundle.server_name).unwrap().await
}

/// A raw, authenticated QUIC connection for sending hand-made frames.
pub async fn raw_connection(bundle: &IdentityBundle, addr: SocketAddr) -> quinn::Connection {
    let conn = try_connect(bundle, addr).await.unwrap();
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    write_message(
        &mut send,
        &Message::Hello(Hello {
            protocol: PROTOCOL_VERSION,
            software: "test".into(),
        }),
    )
    .await
    .unwrap();
    send.finish().unwrap();
    let welcome = read_message(&mut recv, FrameLimits::default())
        .await
        .unwrap();
    assert!(matches!(welcome, Message::Welcome(_)), "got {welcome:?}");
    conn
}

/// On a raw connection: checks in, waits to be selected, reads the task's
/// model, and returns the task.
pub async fn selected_task(conn: &quinn::Connection) -> Task {
    use covey_protocol::{UpdateEncoding, io::read_tensor, tensor::ChunkPlan};
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    write_message(&mut send, &Message::CheckIn).await.unwrap();
    send.finish().unwrap();
    let Message::Task(task) = read_message(&mut recv, FrameLimits::default())
        .await
        .unwrap()
    else {
        panic!("expected a task");
    };
    let plan = ChunkPlan::new(task.spec.param_count(), task.chunk_len);
    read_tensor(
        &mut recv,
        plan,
        UpdateEncoding::F32,
        FrameLimits { max_frame: 8 << 20 },
    )
    .await
    .unwrap();
    task
}

/// Waits for the server to close `conn`; returns (code, reason).
pub async fn close_of(conn: &quinn::Connection) -> (u64, String) {
    match tokio::time::timeout(Duration::from_secs(30), conn.closed()).await {
        Ok(quinn::ConnectionError::ApplicationClosed(c)) => (
            c.error_code.into_inner(),
            String::from_utf8_lossy(&c.reason).into_owned(),
        ),
        other => panic!("expected an application close, got {other:?}"),
    }
}

pub fn spawn_scripted(
    bundles: &[IdentityBundle],
    addr: SocketAddr,
    pause: Duration,
) -> Vec<tokio::task::JoinHandle<covey_client::ClientSummary>> {
    bundles
        .iter()
        .enumerate()
        .map(|(i, b)| {
            let b = b.clone();
            tokio::spawn(async move {
                let trainer = Box::new(ScriptedTrainer {
                    id: i as u32,
                    pause,
                });
                covey_client::run(&b, trainer, options(addr)).await.unwrap()
            })
        })
        .collect()
}

pub fn shared<T>(v: T) -> Arc<T> {
    Arc::new(v)
}

/// Held-out metrics a scripted client reports for a model whose first
/// weight is `w0`, and its example count.
pub fn scripted_eval(id: u32, w0: f32) -> (LocalMetrics, u64) {
    (
        LocalMetrics {
            loss: id as f32 + w0,
            accuracy: 0.1 * (id as f32 + 1.0),
        },
        5 * (u64::from(id) + 1),
    )
}

/// Sends one update for `task` and returns the server's receipt.
pub async fn send_update(
    conn: &quinn::Connection,
    task: &Task,
    values: &[f32],
    within_clip: Option<bool>,
) -> Message {
    let plan = ChunkPlan::new(values.len(), task.chunk_len);
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    let header = UpdateHeader {
        round: task.round,
        base_version: task.base_version,
        payload: Payload::Floats(UpdateEncoding::F32),
        param_count: values.len() as u64,
        num_examples: 10,
        metrics: LocalMetrics::default(),
        within_clip,
    };
    write_message(&mut send, &Message::Update(header))
        .await
        .unwrap();
    // A refusal comes at once; otherwise the server asks for the chunks.
    match read_message(&mut recv, FrameLimits::default())
        .await
        .unwrap()
    {
        Message::SendUpdate => {}
        refusal => return refusal,
    }
    let mut rng = <rand_chacha::ChaCha8Rng as rand::SeedableRng>::seed_from_u64(0);
    let _ =
        covey_protocol::io::write_tensor(&mut send, values, plan, UpdateEncoding::F32, &mut rng)
            .await;
    read_message(&mut recv, FrameLimits::default())
        .await
        .unwrap()
}
