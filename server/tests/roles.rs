//! The cluster's roles as separate processes on loopback: three nats-server
//! nodes, two `covey-server coordinator` replicas and three `covey-server
//! aggregator` leaves, with devices on each leaf. The released model must
//! be exactly what one server computes from the same updates, and the
//! failures the design names (a leaf killed mid-round, the leading root
//! frozen as by a partition and thawed, the leading root killed, a NATS
//! node killed) must cost no more than they should. Revocations, routing
//! by redirect, secure aggregation and central DP run split as well.

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
    StateDir,
    cluster::{
        at_rest::AtRest,
        jetstream::Cluster,
        leaves::Heard,
        route::LeafId,
        state::{Finished, RootState},
    },
    state::{audit::AuditEvent, sealing::DataKey, store::RoundOutcome},
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

    /// SIGSTOP or SIGCONT: a process frozen, as by a partition or a long
    /// pause, and thawed.
    fn signal(&self, sig: &str) {
        let pid = self.child.as_ref().expect("running").id();
        let status = Command::new("kill")
            .args([sig, &pid.to_string()])
            .status()
            .unwrap();
        assert!(status.success());
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
        let tail: Vec<&str> = text.lines().rev().take(60).collect();
        eprintln!("--- {} (last lines) ---", self.name);
        for l in tail.iter().rev() {
            eprintln!("{l}");
        }
    }
}

impl Drop for Role {
    fn drop(&mut self) {
        // The harness shows it only for a failed test (or --nocapture).
        self.dump();
        self.kill();
    }
}

struct Federation {
    nats: Nats,
    /// The root's key, through one connection that outlives node losses.
    key: covey_server::cluster::jetstream::RootKey,
    roots: Vec<Role>,
    leaves: Vec<Role>,
    bundles: Vec<IdentityBundle>,
    initial: Vec<f32>,
    /// The provisioning directory every process's was copied from.
    base: PathBuf,
    /// Its data key, which seals what the roles keep in JetStream.
    data_key: DataKey,
    /// Last: the roles' logs must outlive their dumps.
    _tmp: tempfile::TempDir,
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
    /// `redirect`: leaves send each device to the leaf its pseudonym
    /// hashes to; without it each serves whoever connects.
    async fn start(
        cfg: covey_server::ServerConfig,
        devices: usize,
        leaves: usize,
        redirect: bool,
    ) -> Self {
        let nats = Nats::start();
        let key = nats.key().await;
        let tmp = tempfile::tempdir().unwrap();
        let base = tmp.path().join("base");
        let state = init(&base, &cfg);
        let names: Vec<String> = (0..devices).map(|i| format!("device-{i}")).collect();
        let names: Vec<&str> = names.iter().map(String::as_str).collect();
        let bundles = enroll(&state, &names);
        let (initial, data_key) = {
            let store = state.open_store().unwrap();
            let initial = store.model(ModelVersion(0)).unwrap().weights;
            (initial, store.data_key())
        };
        let logs = tmp.path().join("logs");
        std::fs::create_dir_all(&logs).unwrap();
        let mut roots = Vec::new();
        for r in ["r1", "r2"] {
            let dir = tmp.path().join(r);
            nats::provision(&base, &dir);
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
            nats::provision(&base, &dir);
            let mut args = vec![
                "aggregator".to_string(),
                "--dir".into(),
                dir.display().to_string(),
                "--leaf".into(),
                name.clone(),
            ];
            if !redirect {
                args.push("--no-redirect".into());
            }
            args.extend(nats_args(&nats));
            leaf_roles.push(Role::start(&name, &args, &logs));
        }
        Self {
            nats,
            key,
            base,
            data_key,
            _tmp: tmp,
            roots,
            leaves: leaf_roles,
            bundles,
            initial,
        }
    }

    async fn cluster(&self) -> Cluster {
        Cluster::connect(&self.nats.config(), self.data_key.clone())
            .await
            .unwrap()
    }

    fn at_rest(&self) -> AtRest {
        AtRest::new(self.data_key.clone(), &self.nats.config().bucket)
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
        let (_, record) = self.key.read().await.ok()??;
        RootState::open(&self.at_rest(), &record.state).ok()?
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
                eprintln!(
                    "{what} after {:?}",
                    within - deadline.saturating_duration_since(Instant::now())
                );
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
        // Right after a node's loss the bucket may still be moving.
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            match objects.get_model(&state.model).await {
                Ok(model) => return model.weights,
                Err(e) if Instant::now() < deadline => {
                    eprintln!("reading the model again: {e}");
                    tokio::time::sleep(Duration::from_millis(250)).await;
                }
                Err(e) => panic!("cannot read the committed model: {e}"),
            }
        }
    }

    /// Runs `covey-server ARGS` (with `--nats ...` if `cluster`) to its
    /// end, as an operator would on the provisioning directory; its stdout.
    fn cli(&self, args: &[&str], cluster: bool) -> String {
        let mut command = Command::new(env!("CARGO_BIN_EXE_covey-server"));
        command.args(args);
        if cluster {
            command.args(nats_args(&self.nats));
        }
        let out = command.output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{args:?}: {stderr}");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Runs an enroll or revoke on the cluster; checks it reached the registry.
    fn admin(&self, args: &[&str]) {
        assert!(self.cli(args, true).contains("cluster's registry"));
    }

    fn tmp(&self) -> &Path {
        self._tmp.path()
    }

    /// The replica holding the lease.
    async fn leader(&self) -> usize {
        let (_, record) = self.key.read().await.unwrap().unwrap();
        if record.holder.starts_with("r1-") {
            0
        } else {
            1
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_leaves_and_two_roots_release_what_one_server_would() {
    let fed = Federation::start(config("logreg", 2, 6), 6, 3, false).await;
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
    let state_before_strangers = state.clone();
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

    // A role provisioned from another state directory cannot open the
    // cluster's sealed state: it refuses to start, naming the data key,
    // and the cluster's state is untouched.
    let stranger = fed.tmp().join("stranger");
    init(&stranger, &config("logreg", 2, 6));
    let dir = stranger.display().to_string();
    for args in [
        vec!["coordinator", "--dir", dir.as_str(), "--name", "r3"],
        vec!["aggregator", "--dir", dir.as_str(), "--leaf", "leaf-9"],
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_covey-server"))
            .args(&args)
            .args(nats_args(&fed.nats))
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} started");
        assert!(
            stderr.contains("does not open with this state directory's data key"),
            "{args:?}: {stderr}"
        );
    }
    assert_eq!(fed.state().await, Some(state_before_strangers));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_leaf_a_frozen_root_a_killed_root_and_a_killed_nats_node_cost_only_their_share() {
    let mut cfg = config("logreg", 4, 6);
    cfg.rounds.min_clients = 4;
    cfg.rounds.quorum = 4;
    // FedAvgM: the momentum must survive both takeovers with the model.
    cfg.aggregation.optimizer = "fedavgm".into();
    cfg.aggregation.momentum = 0.5;
    let mut fed = Federation::start(cfg, 6, 3, false).await;
    // Training takes a second, so each kill lands mid-round.
    let devices = fed.devices(Duration::from_secs(1)).await;
    // Every state the root commits, as often as it can be read: round ids
    // must only grow, across the takeover too.
    let (key, at_rest) = (fed.key.clone(), fed.at_rest());
    let (seen_tx, mut seen) = tokio::sync::mpsc::unbounded_channel();
    let watcher = tokio::spawn(async move {
        loop {
            if let Ok(Some((_, record))) = key.read().await
                && let Ok(Some(state)) = RootState::open(&at_rest, &record.state)
                && seen_tx.send(state).is_err()
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    });

    // Leaf 2 dies while its devices train for round 1: they count as
    // dropouts, and four devices on the other two leaves meet the quorum.
    let planned = fed
        .until(Duration::from_secs(60), "the first plan", |s| {
            s.plan.is_some()
        })
        .await;
    fed.leaves[2].kill();
    let v1 = fed
        .until(Duration::from_secs(60), "version 1", |s| {
            s.version == ModelVersion(1)
        })
        .await;
    let last = v1.last.clone().unwrap();
    assert_eq!(last.accepted, 4, "the killed leaf's devices dropped out");
    let quotas = &planned.plan.unwrap().quotas;
    assert_eq!(last.selected, quotas.values().sum::<usize>());

    // The leading root freezes with round 2 planned, as if cut off: the
    // standby takes the lease, reads the plan, and commits exactly one
    // version 2. Thawed, the old root's writes are refused and it stands by.
    fed.until(Duration::from_secs(60), "the second plan", |s| {
        s.plan.as_ref().is_some_and(|p| p.base == ModelVersion(1))
    })
    .await;
    let frozen = fed.leader().await;
    fed.roots[frozen].signal("-STOP");
    fed.until(Duration::from_secs(60), "version 2", |s| {
        s.version == ModelVersion(2)
    })
    .await;
    assert_ne!(fed.leader().await, frozen, "the standby holds the lease");
    fed.roots[frozen].signal("-CONT");

    // Now the leader dies with round 3 planned: the thawed replica takes
    // over and commits exactly one version 3.
    fed.until(Duration::from_secs(60), "the third plan", |s| {
        s.plan.as_ref().is_some_and(|p| p.base == ModelVersion(2))
    })
    .await;
    let leader = fed.leader().await;
    fed.roots[leader].kill();
    fed.until(Duration::from_secs(60), "version 3", |s| {
        s.version == ModelVersion(3)
    })
    .await;
    assert_eq!(fed.leader().await, frozen, "the thawed replica leads");

    // One of three NATS nodes dies: rounds go on.
    fed.nats.kill(0);
    let done = fed
        .until(Duration::from_secs(120), "the run to finish", |s| {
            s.finished.is_some()
        })
        .await;
    assert_eq!(done.version, ModelVersion(4));
    // Devices 2 and 5 were on the killed leaf; every version is FedAvgM
    // over the other four, its momentum carried through both takeovers.
    let model = fed.model(&done).await;
    assert_close(
        &model,
        &expected_with_momentum(&fed.initial, &[0, 1, 3, 4], 4, 0.5),
        1e-6,
    );
    assert!(done.moments.is_some());
    for (leaf, d) in devices {
        if leaf == 2 {
            d.abort();
            continue;
        }
        let s = tokio::time::timeout(Duration::from_secs(60), d)
            .await
            .expect("devices finish")
            .unwrap();
        assert_eq!(s.final_version, Some(ModelVersion(4)));
    }
    watcher.abort();
    let mut states = Vec::new();
    while let Ok(s) = seen.try_recv() {
        states.push(s);
    }
    let mut planned_rounds: Vec<_> = states
        .iter()
        .filter_map(|s| s.plan.as_ref().map(|p| p.round))
        .collect();
    planned_rounds.dedup();
    assert!(
        planned_rounds.windows(2).all(|w| w[0] < w[1]),
        "round ids only grow: {planned_rounds:?}"
    );
    let mut versions: Vec<_> = states
        .iter()
        .map(|s| (s.version, s.committed_round))
        .collect();
    versions.dedup();
    assert!(
        versions
            .windows(2)
            .all(|w| w[0].0 < w[1].0 && w[0].1 < w[1].1),
        "each version once, each from a new round: {versions:?}"
    );

    // The trail the two roots wrote in turn is one chain under the
    // provisioning directory's audit key: every plan and every commit once,
    // across the freeze, the kill and the lost node, closed by the export.
    let trail = fed.tmp().join("cluster-audit.jsonl");
    let public_key = fed.tmp().join("audit.pub");
    let base = fed.base.display().to_string();
    fed.cli(
        &[
            "audit",
            "public-key",
            "--dir",
            &base,
            "--out",
            &public_key.display().to_string(),
        ],
        false,
    );
    let out = fed.cli(
        &[
            "audit",
            "export",
            "--dir",
            &base,
            "--out",
            &trail.display().to_string(),
        ],
        true,
    );
    assert!(out.contains("of the cluster's trail"), "{out}");
    let key = covey_server::state::audit::parse_public_key(
        &std::fs::read_to_string(&public_key).unwrap(),
    )
    .unwrap();
    let verified = covey_server::state::audit::verify_export(
        std::io::BufReader::new(std::fs::File::open(&trail).unwrap()),
        &key,
        &[],
    )
    .expect("the cluster's trail verifies");
    let events: Vec<_> = verified.events.iter().map(|e| e.event.clone()).collect();
    assert!(matches!(
        events[..2],
        [
            AuditEvent::Initialised { .. },
            AuditEvent::ServerStarted { .. }
        ]
    ));
    let committed: Vec<u64> = events
        .iter()
        .filter_map(|e| match e {
            AuditEvent::RoundCommitted { version, .. } => Some(*version),
            _ => None,
        })
        .collect();
    assert_eq!(
        committed,
        [1, 2, 3, 4],
        "each version committed once: {events:?}"
    );
    let started: Vec<u64> = events
        .iter()
        .filter_map(|e| match e {
            AuditEvent::RoundStarted { round, .. } => Some(*round),
            _ => None,
        })
        .collect();
    assert!(
        started.windows(2).all(|w| w[0] < w[1]),
        "each round started once: {started:?}"
    );
    // The root key holds the state sealed: not even the config's hash
    // shows in what JetStream stores.
    let (_, record) = fed.key.read().await.unwrap().unwrap();
    let sha = StateDir::new(&fed.base).config_sha256().unwrap();
    assert!(!record.state.windows(sha.len()).any(|w| w == sha.as_bytes()));
    assert_eq!(
        RootState::open(&fed.at_rest(), &record.state)
            .unwrap()
            .unwrap()
            .config_sha256,
        sha
    );
}

/// Under secure aggregation each leaf unmasks only the sum of its own
/// devices' ring words; the root adds the three sums modulo the ring and
/// decodes once. The released mean is the nine devices' plain mean, up to
/// the quantizer's rounding, exactly as one server releases it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secure_aggregation_runs_per_leaf_and_the_root_decodes_the_merged_words() {
    let mut cfg = config("logreg", 1, 9);
    cfg.secure_aggregation.enabled = true;
    cfg.secure_aggregation.neighbors = 2;
    let fed = Federation::start(cfg, 9, 3, false).await;
    let devices = fed.devices(Duration::ZERO).await;
    for (_, d) in devices {
        let s = tokio::time::timeout(Duration::from_secs(120), d)
            .await
            .expect("devices finish")
            .unwrap();
        assert_eq!(s.final_version, Some(ModelVersion(1)));
    }
    let state = fed
        .until(Duration::from_secs(30), "the run to finish", |s| {
            s.finished.is_some()
        })
        .await;
    assert_eq!(state.last.as_ref().map(|r| r.accepted), Some(9));
    let model = fed.model(&state).await;
    // Masked updates each weigh one: the plain mean of the nine deltas.
    let len = fed.initial.len();
    let mut expected = fed.initial.clone();
    for id in 0..9 {
        for (w, d) in expected.iter_mut().zip(scripted_delta(id, 0, len)) {
            *w += d / 9.0;
        }
    }
    assert_close(&model, &expected, 1e-4);
}

/// Whether the leaf at `addr` lets `bundle` through its TLS handshake and
/// answers its Hello with Welcome.
async fn welcomed(bundle: &IdentityBundle, addr: SocketAddr) -> bool {
    use covey_protocol::{
        PROTOCOL_VERSION,
        frame::FrameLimits,
        io::{read_message, write_message},
        message::{Hello, Message},
    };
    let Ok(conn) = try_connect(bundle, addr).await else {
        return false;
    };
    let Ok((mut send, mut recv)) = conn.open_bi().await else {
        return false;
    };
    let hello = Message::Hello(Hello {
        protocol: PROTOCOL_VERSION,
        software: "test".into(),
    });
    if write_message(&mut send, &hello).await.is_err() {
        return false;
    }
    let _ = send.finish();
    let welcome = read_message(&mut recv, FrameLimits::default()).await;
    conn.close(0u32.into(), b"done");
    matches!(welcome, Ok(Message::Welcome(_)))
}

/// `covey-server revoke --nats` and `enroll --nats` on the provisioning
/// directory reach the registry every leaf follows: the revoked device is
/// refused at the TLS handshake by whichever leaf it tries, one enrolled
/// after the leaves started is admitted by all, and the others train on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enrollments_and_revocations_in_the_registry_reach_every_leaf() {
    let fed = Federation::start(config("logreg", 1, 2), 3, 3, false).await;
    let addrs: Vec<SocketAddr> = fed.leaf_addrs().await.into_values().collect();
    let base = fed.base.display().to_string();
    fed.admin(&["revoke", "--dir", &base, "--name", "device-2"]);
    let revoked = fed.bundles[2].clone();
    for &addr in &addrs {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let trainer = Box::new(ScriptedTrainer {
                id: 2,
                pause: Duration::ZERO,
            });
            let mut opts = options(addr);
            opts.give_up_after = Some(Duration::from_secs(2));
            match covey_client::run(&revoked, trainer, opts).await {
                Err(covey_client::session::SessionError::Refused(_)) => break,
                other => {
                    assert!(
                        Instant::now() < deadline,
                        "leaf at {addr} still serves a revoked device: {other:?}"
                    );
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        }
    }
    // A device enrolled now, on the provisioning directory, is admitted by
    // every leaf: it is not refused, and waits for a task like the others.
    let late = fed.base.with_file_name("late.identity");
    let late_path = late.display().to_string();
    fed.admin(&[
        "enroll",
        "--dir",
        &base,
        "--name",
        "device-late",
        "--out",
        &late_path,
    ]);
    let late = IdentityBundle::load(&late).unwrap();
    for &addr in &addrs {
        let deadline = Instant::now() + Duration::from_secs(20);
        // A handshake and Hello only: checking in would put it in a round.
        while !welcomed(&late, addr).await {
            assert!(
                Instant::now() < deadline,
                "leaf at {addr} refuses a device enrolled in the registry"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    // The others train on, both on the first leaf.
    let devices: Vec<_> = fed.bundles[..2]
        .iter()
        .enumerate()
        .map(|(i, b)| {
            let (b, addr) = (b.clone(), addrs[0]);
            tokio::spawn(async move {
                let trainer = Box::new(ScriptedTrainer {
                    id: i as u32,
                    pause: Duration::ZERO,
                });
                covey_client::run(&b, trainer, options(addr)).await.unwrap()
            })
        })
        .collect();
    for d in devices {
        let s = tokio::time::timeout(Duration::from_secs(60), d)
            .await
            .expect("devices finish")
            .unwrap();
        assert_eq!(s.final_version, Some(ModelVersion(1)));
    }
}

/// Every device enters through the first leaf; each not hashed to it is
/// redirected to its own, and the run trains on all of them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn devices_entering_anywhere_are_redirected_to_their_own_leaf() {
    let fed = Federation::start(config("logreg", 1, 6), 6, 3, true).await;
    let addrs = fed.leaf_addrs().await;
    let ids: Vec<LeafId> = addrs.keys().cloned().collect();
    let entry = addrs[&ids[0]];
    let pseudonyms: BTreeMap<String, covey_privacy::Pseudonym> = StateDir::new(&fed.base)
        .open_store()
        .unwrap()
        .enrollments()
        .unwrap()
        .into_iter()
        .map(|e| (e.name, e.pseudonym))
        .collect();
    // Every leaf must see the others' beats before it routes by them.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let devices: Vec<_> = fed
        .bundles
        .iter()
        .enumerate()
        .map(|(i, b)| {
            let owner =
                covey_server::cluster::route::leaf_for(&pseudonyms[&format!("device-{i}")], &ids)
                    .unwrap()
                    .clone();
            let b = b.clone();
            let task = tokio::spawn(async move {
                let trainer = Box::new(ScriptedTrainer {
                    id: i as u32,
                    pause: Duration::ZERO,
                });
                covey_client::run(&b, trainer, options(entry))
                    .await
                    .unwrap()
            });
            (owner, task)
        })
        .collect();
    for (owner, d) in devices {
        let s = tokio::time::timeout(Duration::from_secs(120), d)
            .await
            .expect("devices finish")
            .unwrap();
        assert_eq!(s.final_version, Some(ModelVersion(1)));
        if owner == ids[0] {
            assert_eq!(s.redirects, 0, "served where it entered");
        } else {
            assert!(s.redirects >= 1, "a device of {owner} was not redirected");
        }
    }
    let state = fed
        .until(Duration::from_secs(30), "the run to finish", |s| {
            s.finished.is_some()
        })
        .await;
    let model = fed.model(&state).await;
    assert_close(
        &model,
        &expected_model(&fed.initial, &[0, 1, 2, 3, 4, 5], 1),
        1e-6,
    );
}

/// Central DP across leaves: the root adds the noise once to the merged
/// sum, keeps the ledger in its committed state, and ends the run when the
/// budget admits no more rounds, exactly where a single server would
/// (three rounds at q = 1, z = 5 spend 1.4456 of 1.5; a fourth would not fit).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_root_spends_and_enforces_the_privacy_budget_across_leaves() {
    let mut cfg = config("logreg", 10, 3);
    cfg.privacy.mode = "central".into();
    cfg.privacy.population = 3;
    cfg.privacy.noise_multiplier = 5.0;
    cfg.privacy.target_epsilon = 1.5;
    let fed = Federation::start(cfg, 3, 3, false).await;
    let devices = fed.devices(Duration::ZERO).await;
    let state = fed
        .until(Duration::from_secs(120), "the budget to run out", |s| {
            s.finished.is_some()
        })
        .await;
    assert_eq!(state.finished, Some(Finished::BudgetExhausted));
    assert_eq!(state.version, ModelVersion(3));
    let ledger = state.ledger.as_ref().expect("the root's ledger");
    assert_eq!(ledger.rounds, 3);
    let spent = state.last.as_ref().and_then(|r| r.epsilon).unwrap();
    assert!(spent > 1.4 && spent <= 1.5, "spent {spent}");
    // Noise was added: the model is not the plain mean.
    let model = fed.model(&state).await;
    let plain = expected_model(&fed.initial, &[0, 1, 2], 3);
    let moved: f32 = model.iter().zip(&plain).map(|(a, b)| (a - b).abs()).sum();
    assert!(moved > 1e-3, "no noise in the released model");
    for (_, d) in devices {
        let s = tokio::time::timeout(Duration::from_secs(60), d)
            .await
            .expect("devices hear the run is over")
            .unwrap();
        assert_eq!(s.final_version, Some(ModelVersion(3)));
    }
}
