//! The cluster's roles as separate processes on loopback: three nats-server
//! nodes, two `covey-server coordinator` replicas and three `covey-server
//! aggregator` leaves, with devices on each leaf. The released model must
//! be exactly what one server computes from the same updates, and the
//! failures the design names (a leaf killed mid-round, the leading root
//! killed, a NATS node killed) must cost no more than they should.

mod common;
#[path = "common/nats.rs"]
mod nats;

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use common::*;
use covey_protocol::{ModelVersion, identity::IdentityBundle};
use covey_server::{
    cluster::{
        jetstream::Cluster,
        leaves::Heard,
        route::LeafId,
        state::{Finished, RootState},
    },
    state::store::RoundOutcome,
};
use nats::Nats;

/// A role's process, killed on drop; its log is kept for failures.
struct Role {
    name: String,
    child: Option<Child>,
    log: PathBuf,
}

impl Role {
    fn start(name: &str, args: &[String], logs: &Path) -> Self {
        let log = logs.join(format!("{name}.log"));
        let file = std::fs::File::create(&log).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_covey-server"))
            .args(args)
            .env(
                "COVEY_LOG",
                "info,quinn=warn,quinn_proto=warn,async_nats=warn",
            )
            .stdout(Stdio::null())
            .stderr(file)
            .spawn()
            .unwrap();
        Self {
            name: name.into(),
            child: Some(child),
            log,
        }
    }

    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Waits for the process to exit on its own; its status.
    fn wait(&mut self, within: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + within;
        let child = self.child.as_mut()?;
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                self.child = None;
                return Some(status);
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn dump(&self) {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let tail: Vec<&str> = text.lines().rev().take(40).collect();
        eprintln!("--- {} (last lines) ---", self.name);
        for l in tail.iter().rev() {
            eprintln!("{l}");
        }
    }
}

impl Drop for Role {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.dump();
        }
        self.kill();
    }
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}

struct Federation {
    nats: Nats,
    tmp: tempfile::TempDir,
    roots: Vec<Role>,
    leaves: Vec<Role>,
    bundles: Vec<IdentityBundle>,
    initial: Vec<f32>,
}

fn nats_args(nats: &Nats) -> Vec<String> {
    let mut args = Vec::new();
    for url in &nats.urls {
        args.push("--nats".into());
        args.push(url.clone());
    }
    args
}

impl Federation {
    /// One state directory, enrolled once and copied to each process, as an
    /// operator would provision machines.
    async fn start(cfg: covey_server::ServerConfig, devices: usize, leaves: usize) -> Self {
        let nats = Nats::start();
        let _ = nats.key().await;
        let tmp = tempfile::tempdir().unwrap();
        let base = tmp.path().join("base");
        let state = init(&base, &cfg);
        let names: Vec<String> = (0..devices).map(|i| format!("device-{i}")).collect();
        let names: Vec<&str> = names.iter().map(String::as_str).collect();
        let bundles = enroll(&state, &names);
        let initial = state
            .open_store()
            .unwrap()
            .model(ModelVersion(0))
            .unwrap()
            .weights;
        let logs = tmp.path().join("logs");
        std::fs::create_dir_all(&logs).unwrap();
        let mut roots = Vec::new();
        for r in ["r1", "r2"] {
            let dir = tmp.path().join(r);
            copy_dir(&base, &dir);
            let mut args = vec![
                "coordinator".to_string(),
                "--dir".into(),
                dir.display().to_string(),
                "--name".into(),
                r.into(),
                "--lease-ms".into(),
                "2000".into(),
            ];
            args.extend(nats_args(&nats));
            roots.push(Role::start(r, &args, &logs));
        }
        let mut leaf_roles = Vec::new();
        for i in 0..leaves {
            let name = format!("leaf-{i}");
            let dir = tmp.path().join(&name);
            copy_dir(&base, &dir);
            let mut args = vec![
                "aggregator".to_string(),
                "--dir".into(),
                dir.display().to_string(),
                "--leaf".into(),
                name.clone(),
            ];
            args.extend(nats_args(&nats));
            leaf_roles.push(Role::start(&name, &args, &logs));
        }
        Self {
            nats,
            tmp,
            roots,
            leaves: leaf_roles,
            bundles,
            initial,
        }
    }

    async fn cluster(&self) -> Cluster {
        Cluster::connect(&self.nats.config()).await.unwrap()
    }

    /// Each leaf's address, as its heartbeat advertises it.
    async fn leaf_addrs(&self) -> BTreeMap<LeafId, SocketAddr> {
        let mut heard = self
            .cluster()
            .await
            .patiently(|c| async move { c.leaves().await?.watch().await })
            .await
            .unwrap();
        let mut addrs = BTreeMap::new();
        tokio::time::timeout(Duration::from_secs(60), async {
            while addrs.len() < self.leaves.len() {
                if let Some(Heard::Beat { leaf, beat }) = heard.recv().await {
                    addrs.insert(leaf, beat.addr.parse().unwrap());
                }
            }
        })
        .await
        .expect("every leaf beats within a minute");
        addrs
    }

    /// Scripted devices, device i on leaf i mod leaves; their ids are
    /// their indices, so the expected model is known.
    async fn devices(
        &self,
        pause: Duration,
    ) -> Vec<(usize, tokio::task::JoinHandle<covey_client::ClientSummary>)> {
        let addrs: Vec<SocketAddr> = self.leaf_addrs().await.into_values().collect();
        self.bundles
            .iter()
            .enumerate()
            .map(|(i, b)| {
                let (b, addr) = (b.clone(), addrs[i % addrs.len()]);
                let task = tokio::spawn(async move {
                    let trainer = Box::new(ScriptedTrainer {
                        id: i as u32,
                        pause,
                    });
                    covey_client::run(&b, trainer, options(addr)).await.unwrap()
                });
                (i % addrs.len(), task)
            })
            .collect()
    }

    async fn state(&self) -> Option<RootState> {
        let key = self.nats.key().await;
        let (_, record) = key.read().await.ok()??;
        RootState::from_bytes(&record.state).ok()?
    }

    /// Polls the root's state until `done` holds.
    async fn until(
        &self,
        within: Duration,
        what: &str,
        done: impl Fn(&RootState) -> bool,
    ) -> RootState {
        let deadline = Instant::now() + within;
        loop {
            if let Some(s) = self.state().await
                && done(&s)
            {
                return s;
            }
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn model(&self, state: &RootState) -> Vec<f32> {
        let objects = self
            .cluster()
            .await
            .patiently(|c| async move { c.objects().await })
            .await
            .unwrap();
        objects.get_model(&state.model).await.unwrap().weights
    }

    /// The replica holding the lease.
    async fn leader(&self) -> usize {
        let key = self.nats.key().await;
        let (_, record) = key.read().await.unwrap().unwrap();
        if record.holder.starts_with("r1-") {
            0
        } else {
            1
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_leaves_and_two_roots_release_what_one_server_would() {
    let fed = Federation::start(config("logreg", 2, 6), 6, 3).await;
    let devices = fed.devices(Duration::ZERO).await;
    for (_, d) in devices {
        let s = tokio::time::timeout(Duration::from_secs(120), d)
            .await
            .expect("devices finish")
            .unwrap();
        assert_eq!(s.final_version, Some(ModelVersion(2)));
        assert_eq!(s.updates_accepted, 2);
    }
    let state = fed
        .until(Duration::from_secs(10), "the run to finish", |s| {
            s.finished.is_some()
        })
        .await;
    assert_eq!(state.version, ModelVersion(2));
    assert_eq!(state.finished, Some(Finished::TargetReached));
    // Each leaf summed two devices' updates; the root merged the three
    // partial sums: FedAvg over all six, as a single server computes it.
    let model = fed.model(&state).await;
    assert_close(
        &model,
        &expected_model(&fed.initial, &[0, 1, 2, 3, 4, 5], 2),
        1e-6,
    );
    let last = state.last.expect("the last round's record");
    assert_eq!((last.selected, last.accepted), (6, 6));
    assert_eq!(
        last.outcome,
        RoundOutcome::Committed {
            version: ModelVersion(2)
        }
    );
    let mut fed = fed;
    for leaf in &mut fed.leaves {
        let status = leaf
            .wait(Duration::from_secs(30))
            .expect("leaves exit once the run is over");
        assert!(status.success(), "{} exited with {status}", leaf.name);
    }
}
