//! Crash soak: runs federations whose server is SIGKILLed at random moments
//! (start-up, waiting, mid-round, mid-upload, mid-commit) and restarted,
//! and whose devices are killed at random moments and restarted, then
//! checks that every run finished with no model version lost, duplicated
//! or half-applied.
//!
//! The server runs in a child process (this binary, `serve` mode, which is
//! `covey-server run`'s code path), so the kill is a real SIGKILL of a real
//! process with a real sled store; the clients run here and reconnect.
//!
//! `cargo run --release -p covey-examples --bin covey-soak -- --trials 20`
#![forbid(unsafe_code)]

use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
    process::{Child, Command, ExitCode, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail, ensure};
use clap::{Parser, Subcommand};
use covey_client::{ClientOptions, TrainOutput, Trainer, trainer::TrainError};
use covey_protocol::{
    ModelVersion,
    message::{LocalMetrics, Task},
};
use covey_server::{Server, ServerConfig, StateDir, state::store::RoundOutcome};
use rand::{Rng, SeedableRng, seq::SliceRandom};

#[derive(Parser)]
struct Args {
    #[command(subcommand)]
    mode: Option<Mode>,
    /// Federations to run, each with its own kills.
    #[arg(long, default_value_t = 20)]
    trials: u32,
    /// SIGKILLs per federation, each at a random moment after a (re)start.
    #[arg(long, default_value_t = 3)]
    kills: u32,
    /// Rounds per federation.
    #[arg(long, default_value_t = 8)]
    rounds: u64,
    #[arg(long, default_value_t = 3)]
    clients: u32,
    /// Devices killed per federation (their task aborted mid-whatever,
    /// connection and all) and started again with the same identity.
    #[arg(long, default_value_t = 2)]
    client_kills: u32,
    /// Latest moment of a kill after a (re)start, in milliseconds.
    #[arg(long, default_value_t = 1500)]
    max_kill_ms: u64,
    #[arg(long, default_value_t = 1)]
    seed: u64,
}

#[derive(Subcommand)]
enum Mode {
    /// Internal: serve one state directory until its run finishes.
    Serve { dir: PathBuf },
}

/// Updates that depend only on the client and the base version, so the
/// final model is known exactly whatever the kills did.
struct Scripted {
    id: u32,
}

fn scripted_delta(id: u32, base: u64, len: usize) -> Vec<f32> {
    (0..len)
        .map(|i| ((i % 5) as f32 - 2.0) * 1e-3 * (id as f32 + 1.0) + base as f32 * 1e-4)
        .collect()
}

impl Trainer for Scripted {
    fn train(&mut self, task: &Task, global: &[f32]) -> Result<TrainOutput, TrainError> {
        // Keeps rounds in flight long enough to be killed in.
        std::thread::sleep(Duration::from_millis(150));
        Ok(TrainOutput {
            delta: scripted_delta(self.id, task.base_version.0, global.len()),
            num_examples: 100,
            metrics: LocalMetrics::default(),
        })
    }
}

fn main() -> ExitCode {
    let args = Args::parse();
    if let Some(Mode::Serve { dir }) = &args.mode {
        return match serve(dir) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("serve: {e:#}");
                ExitCode::FAILURE
            }
        };
    }
    let mut failures = 0;
    for trial in 0..args.trials {
        match run_trial(&args, trial) {
            Ok(report) => println!("trial {trial}: ok — {report}"),
            Err(e) => {
                failures += 1;
                println!("trial {trial}: FAILED — {e:#}");
            }
        }
    }
    println!(
        "{} of {} trials passed ({} kills each, {} rounds, {} clients)",
        args.trials - failures,
        args.trials,
        args.kills,
        args.rounds,
        args.clients
    );
    if failures == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

fn serve(dir: &Path) -> Result<()> {
    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(async {
        let server = Server::open(&StateDir::new(dir))?;
        server.run().await?;
        Ok(())
    })
}

/// Kills the child on drop, so a failed trial leaves no server behind.
struct ServerProcess(Child);

impl Drop for ServerProcess {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn spawn_server(dir: &Path) -> Result<ServerProcess> {
    Ok(ServerProcess(
        Command::new(std::env::current_exe()?)
            .arg("serve")
            .arg(dir)
            .env("COVEY_LOG", "error")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting the server process")?,
    ))
}

fn run_trial(args: &Args, trial: u32) -> Result<String> {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(args.seed ^ u64::from(trial) << 32);
    let tmp = tempfile::tempdir()?;
    let port = std::net::UdpSocket::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let mut config = ServerConfig::default();
    config.server.listen = format!("127.0.0.1:{port}").parse()?;
    config.server.public_addr = config.server.listen.to_string();
    config.model.architecture = "logreg".into();
    config.rounds.rounds = args.rounds;
    config.rounds.min_clients = args.clients as usize;
    config.rounds.clients_per_round = args.clients as usize;
    config.rounds.quorum = args.clients as usize;
    config.rounds.round_timeout_secs = 30.0;
    // A killed device sends nothing: notice within seconds, not the
    // production defaults' half minute.
    config.server.idle_timeout_secs = 3;
    config.server.keep_alive_secs = 1;
    config.rounds.rejoin_grace_secs = 2.0;
    config.compliance.min_cohort = 1;
    let state = StateDir::new(tmp.path());
    state.init(&config)?;
    let bundles = {
        let store = state.open_store()?;
        (0..args.clients)
            .map(|i| {
                state.enroll(
                    &store,
                    &format!("device-{i}"),
                    Duration::from_secs(3600),
                    None,
                )
            })
            .collect::<Result<Vec<_>, _>>()?
    };
    let addr = config.server.listen;

    let runtime = tokio::runtime::Runtime::new()?;
    let spawn_client = |i: usize| {
        let bundle = bundles[i].clone();
        runtime.spawn(async move {
            let options = ClientOptions {
                server_addr: Some(addr),
                initial_backoff: Duration::from_millis(50),
                max_backoff: Duration::from_millis(500),
                give_up_after: Some(Duration::from_secs(60)),
                idle_timeout: Duration::from_secs(2),
                ..ClientOptions::default()
            };
            covey_client::run(&bundle, Box::new(Scripted { id: i as u32 }), options).await
        })
    };
    let mut clients: Vec<_> = (0..bundles.len()).map(spawn_client).collect();

    // Server and device kills in a random order, each a random time after
    // the previous event.
    let mut events: Vec<bool> = (0..args.kills)
        .map(|_| true)
        .chain((0..args.client_kills).map(|_| false))
        .collect();
    events.shuffle(&mut rng);
    let started = Instant::now();
    let mut kill_times = Vec::new();
    let mut device_kills = Vec::new();
    let mut server = spawn_server(tmp.path())?;
    for kill_server in events {
        let after = Duration::from_millis(rng.random_range(0..=args.max_kill_ms));
        std::thread::sleep(after);
        if server.0.try_wait()?.is_some() {
            break; // The run finished first.
        }
        if kill_server {
            server.0.kill()?; // SIGKILL
            server.0.wait()?;
            kill_times.push(after.as_millis());
            server = spawn_server(tmp.path())?;
        } else {
            let victim = rng.random_range(0..clients.len());
            clients[victim].abort();
            device_kills.push(after.as_millis());
            clients[victim] = spawn_client(victim);
        }
    }
    let deadline = Instant::now() + Duration::from_secs(180);
    let status = loop {
        if let Some(status) = server.0.try_wait()? {
            break status;
        }
        ensure!(Instant::now() < deadline, "the server never finished");
        std::thread::sleep(Duration::from_millis(50));
    };
    ensure!(status.success(), "the last server exited with {status}");
    for client in clients {
        let summary = runtime.block_on(client)?.context("a client failed")?;
        ensure!(
            summary.final_version == Some(ModelVersion(args.rounds)),
            "a client ended at {:?}",
            summary.final_version
        );
    }
    let (abandoned, aborted) = check_store(&state, args)?;
    Ok(format!(
        "server killed at {kill_times:?} ms, devices at {device_kills:?} ms after the previous event, {abandoned} rounds abandoned and {aborted} aborted (then retried), {:.1} s",
        started.elapsed().as_secs_f64()
    ))
}

/// Every version once, every round id once, and the exact final model;
/// returns the rounds abandoned by a server kill and aborted otherwise.
fn check_store(state: &StateDir, args: &Args) -> Result<(usize, usize)> {
    let store = state.open_store()?;
    let versions: Vec<u64> = store.versions()?.into_iter().map(|v| v.0).collect();
    ensure!(
        versions == (0..=args.rounds).collect::<Vec<_>>(),
        "stored versions {versions:?}"
    );
    let records = store.rounds()?;
    let committed: Vec<u64> = records
        .iter()
        .filter_map(|r| match r.outcome {
            RoundOutcome::Committed { version } => Some(version.0),
            _ => None,
        })
        .collect();
    ensure!(
        committed.len() as u64 == args.rounds
            && committed.iter().copied().collect::<BTreeSet<_>>() == (1..=args.rounds).collect(),
        "committed versions {committed:?}"
    );
    let ids: BTreeSet<u64> = records.iter().map(|r| r.round.0).collect();
    ensure!(ids.len() == records.len(), "a round id was reused");
    if records
        .iter()
        .any(|r| matches!(r.outcome, RoundOutcome::InFlight))
    {
        bail!("a round is still in flight after the run finished");
    }
    // Equal example counts: each round adds the mean of the clients' deltas.
    let w0 = store.model(ModelVersion(0))?.weights;
    let mut expected: Vec<f64> = w0.iter().map(|&v| f64::from(v)).collect();
    for base in 0..args.rounds {
        for id in 0..args.clients {
            let d = scripted_delta(id, base, expected.len());
            for (w, d) in expected.iter_mut().zip(d) {
                *w += f64::from(d) / f64::from(args.clients);
            }
        }
    }
    let last = store.model(ModelVersion(args.rounds))?.weights;
    let worst = last
        .iter()
        .zip(&expected)
        .map(|(a, e)| (f64::from(*a) - e).abs())
        .fold(0.0, f64::max);
    ensure!(
        worst <= 1e-5,
        "the final model is off by {worst}: a round was lost, repeated or half-applied"
    );
    let count = |f: fn(&RoundOutcome) -> bool| records.iter().filter(|r| f(&r.outcome)).count();
    Ok((
        count(|o| *o == RoundOutcome::Abandoned),
        count(|o| matches!(o, RoundOutcome::Aborted { .. })),
    ))
}
