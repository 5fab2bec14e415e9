//! One round on loopback with many clients and synthetic updates (no
//! training; CNN-sized by default): wall time, bytes moved and the server's
//! peak memory, for each update encoding. The server runs as its own `covey-server` process
//! so its memory is measured alone.
//!
//! `cargo build --release -p covey-server -p covey-examples &&
//!  target/release/covey-bench-round --clients 100`; the load test is
//! `--clients 1000 --model 2nn`. `--viewers 0,4` runs each case without
//! and with that many live dashboards open (server-sent-event feeds read
//! to the end), for the dashboard's cost.
#![forbid(unsafe_code)]

use std::{
    path::PathBuf,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use clap::Parser;
use covey_client::{ClientOptions, TrainOutput, Trainer, trainer::TrainError};
use covey_protocol::{
    UpdateEncoding,
    message::{LocalMetrics, Task},
};
use covey_server::{ServerConfig, StateDir};
use rand::{Rng, SeedableRng};

#[derive(Parser)]
struct Args {
    #[arg(long, default_value_t = 100)]
    clients: usize,
    /// Encodings to measure (comma-separated).
    #[arg(long, default_value = "f32,f16,bf16,int8", value_delimiter = ',')]
    encodings: Vec<UpdateEncoding>,
    /// Model architecture: cnn (1,663,370 parameters), 2nn or logreg.
    #[arg(long, default_value = "cnn")]
    model: String,
    /// The covey-server binary (defaults to the one beside this binary).
    #[arg(long)]
    server_bin: Option<PathBuf>,
    /// Live dashboards open during the round, one run per value.
    #[arg(long, default_value = "0", value_delimiter = ',')]
    viewers: Vec<usize>,
}

/// A browser's live feed: reads the dashboard's server-sent events until
/// the server ends them; returns the bytes read.
async fn view(url: String) -> u64 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let Some(addr) = url
        .trim()
        .strip_prefix("http://")
        .map(|a| a.trim_end_matches('/').to_owned())
    else {
        return 0;
    };
    let Ok(mut stream) = tokio::net::TcpStream::connect(&addr).await else {
        return 0;
    };
    let request = format!("GET /api/events HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    if stream.write_all(request.as_bytes()).await.is_err() {
        return 0;
    }
    let mut buf = vec![0u8; 64 << 10];
    let mut total = 0;
    while let Ok(n) = stream.read(&mut buf).await {
        if n == 0 {
            break;
        }
        total += n as u64;
    }
    total
}

/// Random updates of the task's size: the bench measures transport and
/// aggregation, not training.
struct Synthetic(u64);

impl Trainer for Synthetic {
    fn train(&mut self, task: &Task, global: &[f32]) -> Result<TrainOutput, TrainError> {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(self.0 ^ task.round.0);
        Ok(TrainOutput {
            delta: (0..global.len())
                .map(|_| rng.random_range(-1e-3..1e-3))
                .collect(),
            num_examples: 600,
            metrics: LocalMetrics::default(),
        })
    }
}

fn main() -> Result<()> {
    let args = Args::parse();
    let server_bin = match args.server_bin {
        Some(p) => p,
        None => std::env::current_exe()?.with_file_name("covey-server"),
    };
    if !server_bin.exists() {
        bail!(
            "{} not found: build it with `cargo build --release -p covey-server`",
            server_bin.display()
        );
    }
    println!(
        "| model | encoding | clients | dashboards | round wall time (s) | bytes up | bytes down | server CPU (s) | server peak RSS (MiB) | dashboard bytes |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|");
    let runtime = tokio::runtime::Runtime::new()?;
    let cases: Vec<(UpdateEncoding, usize)> = args
        .encodings
        .iter()
        .flat_map(|e| args.viewers.iter().map(move |v| (*e, *v)))
        .collect();
    for (encoding, viewers) in cases {
        let tmp = tempfile::tempdir()?;
        let port = std::net::UdpSocket::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let mut config = ServerConfig::default();
        config.server.listen = format!("127.0.0.1:{port}").parse()?;
        config.server.public_addr = config.server.listen.to_string();
        config.model.architecture = args.model.clone();
        config.rounds.rounds = 1;
        config.rounds.clients_per_round = args.clients;
        config.rounds.min_clients = args.clients;
        config.rounds.quorum = args.clients;
        config.training.update_encoding = encoding.to_string();
        let state = StateDir::new(tmp.path());
        state.init(&config)?;
        let store = state.open_store()?;
        let identities = (0..args.clients)
            .map(|i| {
                state.enroll(
                    &store,
                    &format!("bench-{i}"),
                    Duration::from_secs(3600),
                    None,
                )
            })
            .collect::<Result<Vec<_>, _>>()?;
        drop(store);
        let server = Command::new(&server_bin)
            .args(["run", "--json", "--dir"])
            .arg(tmp.path())
            .env("COVEY_LOG", "warn")
            .stdout(Stdio::piped())
            .spawn()
            .context("starting covey-server")?;
        let addr = config.server.listen;
        let started = Instant::now();
        let url_file = tmp.path().join("dashboard.url");
        let feeds = runtime.block_on(async {
            let mut feeds = Vec::new();
            if viewers > 0 {
                // The server writes its dashboard's address once it serves.
                let mut url = None;
                for _ in 0..200 {
                    if let Ok(text) = std::fs::read_to_string(&url_file) {
                        url = Some(text);
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(25)).await;
                }
                let url = url.context("the server wrote no dashboard.url")?;
                feeds = (0..viewers)
                    .map(|_| tokio::spawn(view(url.clone())))
                    .collect();
            }
            Ok::<_, anyhow::Error>(feeds)
        })?;
        runtime.block_on(async {
            let tasks: Vec<_> = identities
                .into_iter()
                .enumerate()
                .map(|(i, id)| {
                    let options = ClientOptions {
                        server_addr: Some(addr),
                        initial_backoff: Duration::from_millis(50),
                        give_up_after: Some(Duration::from_secs(300)),
                        ..ClientOptions::default()
                    };
                    tokio::spawn(async move {
                        covey_client::run(&id, Box::new(Synthetic(i as u64)), options).await
                    })
                })
                .collect();
            for t in tasks {
                t.await??;
            }
            Ok::<_, anyhow::Error>(())
        })?;
        let out = server.wait_with_output()?;
        let wall = started.elapsed();
        let mut dashboard_bytes = 0;
        for feed in feeds {
            dashboard_bytes += runtime.block_on(feed)?;
        }
        let summary: serde_json::Value = serde_json::from_slice(&out.stdout)
            .with_context(|| format!("server output: {}", String::from_utf8_lossy(&out.stdout)))?;
        let report =
            covey_server::operator::status::Report::from_store(&state.open_store()?, false)?;
        let round = report.rounds.first().context("no round recorded")?;
        println!(
            "| {} | {encoding} | {} | {viewers} | {:.2} (process {:.2}) | {} | {} | {:.2} | {:.0} | {dashboard_bytes} |",
            args.model,
            args.clients,
            round.seconds.unwrap_or(f64::NAN),
            wall.as_secs_f64(),
            summary["bytes_up"],
            summary["bytes_down"],
            summary["cpu_seconds"].as_f64().unwrap_or(f64::NAN),
            summary["peak_rss_bytes"].as_f64().unwrap_or(f64::NAN) / (1 << 20) as f64,
        );
    }
    Ok(())
}
