//! covey-sim: a real covey-server and K virtual clients talking QUIC with
//! mutual TLS on loopback, training on MNIST, one line per round.
#![forbid(unsafe_code)]

/// Training frees and re-allocates tensors of megabytes every step; glibc
/// hands them back to the kernel and page-faults them in again, mimalloc
/// reuses them (15% more CNN samples/s, BENCHMARKS.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::{
    path::PathBuf,
    sync::{Arc, Condvar, Mutex},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use clap::Parser;
use covey_client::{
    CandleTrainer, ClientOptions, Dropout, TrainOutput, Trainer,
    data::{DataView, Mnist},
    partition::Partition,
    trainer::{TrainError, select_device},
};
use covey_protocol::{
    UpdateEncoding,
    message::{LocalMetrics, Task},
    model::Architecture,
    secagg::session::Phase as SecAggPhase,
};
use covey_server::{Server, ServerConfig, StateDir};

#[derive(Parser, Debug)]
#[command(
    name = "covey-sim",
    about = "Run a real federation of virtual clients on loopback"
)]
struct Args {
    /// cnn, 2nn or logreg.
    #[arg(long, default_value = "2nn")]
    model: Architecture,
    /// Directory with MNIST's train-* and t10k-* IDX files (.gz or raw).
    #[arg(long, default_value = "examples/data/mnist")]
    data: PathBuf,
    /// iid, shards or dirichlet:ALPHA.
    #[arg(long, default_value = "iid")]
    partition: Partition,
    /// Number of virtual clients (K).
    #[arg(long, default_value_t = 10)]
    clients: usize,
    /// Fraction of clients per round (C); at least one client is selected.
    #[arg(long, default_value_t = 1.0)]
    fraction: f64,
    /// Local epochs (E).
    #[arg(long, default_value_t = 5)]
    epochs: u32,
    /// Local batch size (B).
    #[arg(long, default_value_t = 10)]
    batch: u32,
    /// Local learning rate (eta).
    #[arg(long, default_value_t = 0.1)]
    lr: f32,
    /// fedavg, fedavgm, fedadam or fedyogi.
    #[arg(long, default_value = "fedavg")]
    server_opt: String,
    /// mean, norm-bound:C, median, trimmed-mean:FRACTION, krum:F,
    /// multi-krum:F:M or bulyan:F.
    #[arg(long, default_value = "mean")]
    aggregator: String,
    /// Server learning rate.
    #[arg(long, default_value_t = 1.0)]
    server_lr: f32,
    /// sync (rounds) or fedbuff (asynchronous buffered aggregation: an
    /// aggregate every clients x fraction updates, weighted by staleness;
    /// each --rounds step is then one aggregate).
    #[arg(long, default_value = "sync")]
    mode: String,
    /// fedbuff: clients training at once (0 = twice the buffer).
    #[arg(long, default_value_t = 0)]
    concurrency: usize,
    /// fedbuff: updates more versions old than this are refused.
    #[arg(long, default_value_t = 4)]
    max_staleness: u64,
    /// Rounds (R).
    #[arg(long, default_value_t = 5)]
    rounds: u64,
    /// Stop once the global model reaches this test accuracy (0..1).
    #[arg(long)]
    target_accuracy: Option<f32>,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// auto, cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Virtual clients training at once, each on its share of the cores
    /// (default: one per core on the CPU, one on a GPU).
    #[arg(long)]
    parallel: Option<usize>,
    /// f32, f16, bf16 or int8.
    #[arg(long, default_value = "f32")]
    update_encoding: UpdateEncoding,
    /// Where the server keeps its state (a temporary directory by default).
    #[arg(long)]
    state_dir: Option<PathBuf>,
    /// Continue the run kept in --state-dir from its last committed round,
    /// with the same flags (only --rounds may grow).
    #[arg(long, requires = "state_dir")]
    resume: bool,
    /// One JSON object per round on stdout.
    #[arg(long)]
    json: bool,
    /// Differential privacy: off, central (the server noises the sum) or
    /// distributed (clients noise, secure aggregation sums).
    #[arg(long, default_value = "off")]
    dp: String,
    /// L2 clip of each update: a number, or `adaptive` (Andrew et al.,
    /// starting from 1.0 and tracking the median norm).
    #[arg(long, default_value = "1.0")]
    clip: String,
    /// Noise standard deviation in units of the clip (z).
    #[arg(long, default_value_t = 1.0)]
    noise_multiplier: f64,
    /// The run stops before the privacy loss would exceed this.
    #[arg(long, default_value_t = 8.0)]
    target_epsilon: f64,
    #[arg(long, default_value_t = 1e-5)]
    delta: f64,
    /// How rounds become ε under central DP: rdp or pld (tighter).
    #[arg(long, default_value = "rdp", value_parser = ["rdp", "pld"])]
    accountant: String,
    /// Simulated attack by some clients: none, sign-flip, scale:F,
    /// label-flip or noise.
    #[arg(long, default_value = "none")]
    attack: Attack,
    /// Fraction of clients that attack (the first ⌈fraction·K⌉).
    #[arg(long, default_value_t = 0.2)]
    attackers: f64,
    /// Distributed DP: the sum lives modulo 2^bits.
    #[arg(long, default_value_t = 20)]
    bits: u32,
    /// Secure aggregation (SecAgg+): the server learns only the sum of the
    /// masked updates. Needs --dp distributed.
    #[arg(long)]
    secagg: bool,
    /// Shares needed to rebuild a client's secret: a fraction of its
    /// neighbours in (0.5, 1], or a count.
    #[arg(long, default_value_t = 0.6)]
    threshold: f64,
    /// Neighbours each client shares its secrets with (graph degree k).
    #[arg(long, default_value_t = 10)]
    neighbors: u32,
    /// Each selected client drops out of a round with this probability.
    #[arg(long, default_value_t = 0.0)]
    dropout: f64,
    /// The phase dropouts happen at: advertise, share, masked or unmask
    /// (random when not given).
    #[arg(long, value_parser = parse_phase)]
    dropout_phase: Option<SecAggPhase>,
    /// k: no model is released from fewer participants (rounds below k
    /// commit nothing).
    #[arg(long, default_value_t = 2)]
    min_cohort: usize,
}

fn parse_phase(s: &str) -> Result<SecAggPhase, String> {
    Ok(match s {
        "advertise" => SecAggPhase::Advertise,
        "share" => SecAggPhase::Share,
        "masked" => SecAggPhase::MaskedInput,
        "unmask" => SecAggPhase::Unmask,
        other => {
            return Err(format!(
                "unknown phase '{other}': use advertise, share, masked or unmask"
            ));
        }
    })
}

/// The server's `[secure_aggregation]` section from the flags.
fn secagg_config(args: &Args) -> covey_server::config::SecureAggregation {
    let defaults = covey_server::config::SecureAggregation::default();
    covey_server::config::SecureAggregation {
        enabled: args.secagg,
        neighbors: args.neighbors,
        threshold: args.threshold,
        // Without DP the masked updates are clipped to --clip.
        clip: args.clip.parse().unwrap_or(defaults.clip),
        bits: args.bits,
        ..defaults
    }
}

/// Updates a round needs to commit: all of them, unless clients drop out
/// or DP's Poisson cohorts vary.
fn quorum(args: &Args) -> usize {
    let wanted = if args.dp == "off" && args.dropout == 0.0 {
        per_round(args)
    } else {
        per_round(args).div_ceil(2)
    };
    wanted.max(args.min_cohort)
}

/// What a malicious virtual client does to its update.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Attack {
    None,
    /// Sends −Δ.
    SignFlip,
    /// Sends F·Δ.
    Scale(f32),
    /// Trains on labels mapped l → 9 − l.
    LabelFlip,
    /// Sends Gaussian noise with Δ's norm.
    Noise,
}

impl std::str::FromStr for Attack {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(match s {
            "none" => Self::None,
            "sign-flip" => Self::SignFlip,
            "label-flip" => Self::LabelFlip,
            "noise" => Self::Noise,
            _ => match s.strip_prefix("scale:").map(str::parse::<f32>) {
                Some(Ok(f)) if f.is_finite() => Self::Scale(f),
                _ => {
                    return Err(format!(
                        "unknown attack '{s}': expected none, sign-flip, scale:F, label-flip or noise"
                    ));
                }
            },
        })
    }
}

impl Attack {
    /// Rewrites an honest update the way this attacker would.
    fn apply(self, delta: &mut [f32], rng: &mut impl rand::Rng) {
        match self {
            Self::None | Self::LabelFlip => {}
            Self::SignFlip => delta.iter_mut().for_each(|v| *v = -*v),
            Self::Scale(f) => delta.iter_mut().for_each(|v| *v *= f),
            Self::Noise => {
                let norm = covey_privacy::l2_norm(delta);
                let normal = rand_distr::StandardNormal;
                delta
                    .iter_mut()
                    .for_each(|v| *v = rand_distr::Distribution::<f32>::sample(&normal, rng));
                let scale = norm / covey_privacy::l2_norm(delta).max(f64::MIN_POSITIVE);
                delta
                    .iter_mut()
                    .for_each(|v| *v = (f64::from(*v) * scale) as f32);
            }
        }
    }
}

/// The places virtual clients train in, so that K of them share the
/// machine: each slot is a rayon pool with its share of the cores, and a
/// client trains only while it holds one. On the CPU, one step of these
/// small models runs on two cores at only 1.2–1.6× its speed on one, so a
/// client per core finishes rounds sooner (BENCHMARKS.md).
struct Slots {
    free: Mutex<Vec<Arc<rayon::ThreadPool>>>,
    returned: Condvar,
}

/// A slot taken from [`Slots`]; it goes back when dropped, even by a panic.
struct Held<'a> {
    slots: &'a Slots,
    pool: Arc<rayon::ThreadPool>,
}

impl Drop for Held<'_> {
    fn drop(&mut self) {
        if let Ok(mut free) = self.slots.free.lock() {
            free.push(self.pool.clone());
            self.slots.returned.notify_one();
        }
    }
}

impl Slots {
    fn new(count: usize, threads_each: usize) -> Result<Self> {
        let free = (0..count)
            .map(|i| {
                rayon::ThreadPoolBuilder::new()
                    .num_threads(threads_each)
                    .thread_name(move |t| format!("covey-sim-slot-{i}-{t}"))
                    .build()
                    .map(Arc::new)
                    .context("starting a training thread pool")
            })
            .collect::<Result<_>>()?;
        Ok(Self {
            free: Mutex::new(free),
            returned: Condvar::new(),
        })
    }

    /// Runs `work` on the first free slot's pool.
    fn run<R: Send>(&self, work: impl FnOnce() -> R + Send) -> Result<R, TrainError> {
        let poisoned = |_| TrainError::Panicked("a training slot's lock was poisoned".into());
        let mut free = self.free.lock().map_err(poisoned)?;
        let pool = loop {
            if let Some(pool) = free.pop() {
                break pool;
            }
            free = self.returned.wait(free).map_err(poisoned)?;
        };
        drop(free);
        let held = Held { slots: self, pool };
        Ok(held.pool.install(work))
    }
}

/// A virtual client: trains in one of the shared [`Slots`].
struct Virtual {
    inner: CandleTrainer,
    slots: Arc<Slots>,
    attack: Attack,
    rng: rand_chacha::ChaCha8Rng,
}

impl Trainer for Virtual {
    fn train(&mut self, task: &Task, global: &[f32]) -> Result<TrainOutput, TrainError> {
        let inner = &mut self.inner;
        let mut out = self.slots.run(|| inner.train(task, global))??;
        self.attack.apply(&mut out.delta, &mut self.rng);
        Ok(out)
    }

    fn evaluate(
        &mut self,
        spec: covey_protocol::model::ModelSpec,
        weights: &[f32],
    ) -> Result<Option<(LocalMetrics, u64)>, TrainError> {
        let inner = &mut self.inner;
        self.slots.run(|| inner.evaluate(spec, weights))?
    }
}

/// How many clients train at once, and on how many threads each.
fn slot_plan(parallel: Option<usize>, on_cpu: bool) -> Result<(usize, usize)> {
    let cores = std::thread::available_parallelism().map_or(1, usize::from);
    match (parallel, on_cpu) {
        (Some(0), _) => bail!("--parallel must be at least 1"),
        (Some(n), false) if n > 1 => {
            bail!("--parallel {n}: clients on a GPU train one at a time; leave --parallel out")
        }
        (_, false) => Ok((1, cores)),
        (Some(n), true) => Ok((n, (cores / n).max(1))),
        (None, true) => Ok((cores, 1)),
    }
}

fn main() -> Result<()> {
    let args = Args::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_env("COVEY_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    if args.clients == 0 {
        bail!("--clients must be at least 1");
    }
    if !(args.fraction > 0.0 && args.fraction <= 1.0) {
        bail!("--fraction must be in (0, 1], got {}", args.fraction);
    }
    if !(0.0..=1.0).contains(&args.attackers) {
        bail!(
            "--attackers is a fraction in [0, 1], got {}",
            args.attackers
        );
    }
    if let Some(t) = args.target_accuracy
        && !(0.0..=1.0).contains(&t)
    {
        bail!("--target-accuracy is a fraction in [0, 1], got {t}");
    }
    if args.min_cohort == 0 || args.min_cohort > per_round(&args) {
        bail!(
            "--min-cohort must be between 1 and the {} clients per round (--clients x --fraction), got {}",
            per_round(&args),
            args.min_cohort
        );
    }
    // Refuse bad privacy flags before loading any data.
    let mut check = ServerConfig::default();
    check.rounds.clients_per_round = per_round(&args);
    check.rounds.min_clients = args.clients;
    check.rounds.quorum = quorum(&args);
    check.privacy = privacy_config(&args)?;
    check.secure_aggregation = secagg_config(&args);
    check.compliance.min_cohort = args.min_cohort;
    check.aggregation.aggregator = args.aggregator.clone();
    set_mode(&mut check, &args);
    check.settings()?;
    if !(0.0..1.0).contains(&args.dropout) {
        bail!("--dropout is a probability in [0, 1), got {}", args.dropout);
    }
    if args.parallel == Some(0) {
        bail!("--parallel must be at least 1");
    }
    let runtime = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    runtime.block_on(simulate(args))
}

/// Checks that `state` holds an unfinished run made with `wanted`'s
/// settings, and lets it run to `wanted`'s round count. Returns the round
/// it stopped at.
fn resume(state: &StateDir, wanted: &ServerConfig) -> Result<u64> {
    let root = state.root().display();
    let stored = state
        .config()
        .with_context(|| format!("--resume: no run to resume in {root}"))?;
    let mut same_length = wanted.clone();
    same_length.rounds.rounds = stored.rounds.rounds;
    if let Some((kept, asked)) = first_difference(&stored, &same_length) {
        bail!(
            "--resume: the run in {root} was made with other settings: it has `{kept}`, these flags give `{asked}`"
        );
    }
    let version = state.open_store()?.current_version()?.0;
    if version >= wanted.rounds.rounds {
        bail!(
            "--resume: the run in {root} is already at round {version}; pass a --rounds above it to go on"
        );
    }
    if stored.rounds.rounds != wanted.rounds.rounds {
        state
            .replace_config(wanted)
            .context("--resume: updating the round count")?;
    }
    Ok(version)
}

/// The first setting, as `[section] key = value`, where two configs differ
/// as written to config.toml (what the server reads).
fn first_difference(a: &ServerConfig, b: &ServerConfig) -> Option<(String, String)> {
    let (a, b) = (a.to_documented_toml(), b.to_documented_toml());
    let (mut a, mut b) = (a.lines(), b.lines());
    let mut section = "";
    loop {
        match (a.next(), b.next()) {
            (None, None) => return None,
            (Some(x), Some(y)) if x == y => {
                if x.starts_with('[') {
                    section = x;
                }
            }
            (x, y) => {
                let show = |l: Option<&str>| format!("{section} {}", l.unwrap_or("(nothing)"));
                return Some((show(x), show(y)));
            }
        }
    }
}

/// Enrolls virtual device `name`. A resumed run's devices kept their keys
/// only in the memory of the process that stopped, so their certificates
/// are revoked and new ones issued.
fn enroll(
    state: &StateDir,
    store: &covey_server::store::Store,
    name: &str,
) -> Result<covey_protocol::identity::IdentityBundle> {
    let lifetime = Duration::from_secs(86_400);
    match state.enroll(store, name, lifetime, None) {
        Err(covey_server::dir::DirError::AlreadyEnrolled(_)) => {
            state.revoke(store, name)?;
            Ok(state.enroll(store, name, lifetime, None)?)
        }
        other => Ok(other?),
    }
}

/// The scheduling flags: sync rounds or FedBuff's buffer.
fn set_mode(config: &mut ServerConfig, args: &Args) {
    config.rounds.mode = args.mode.clone();
    config.rounds.concurrency = args.concurrency;
    config.rounds.max_staleness = args.max_staleness;
}

fn per_round(args: &Args) -> usize {
    ((args.fraction * args.clients as f64).round() as usize).clamp(1, args.clients)
}

/// The server's `[privacy]` section from the DP flags.
fn privacy_config(args: &Args) -> Result<covey_server::config::Privacy> {
    let mut p = covey_server::config::Privacy {
        mode: args.dp.clone(),
        ..Default::default()
    };
    if args.dp == "off" {
        return Ok(p);
    }
    match args.clip.as_str() {
        "adaptive" => p.adaptive_clip = true,
        c => {
            p.clip = c
                .parse()
                .with_context(|| format!("--clip must be a number or `adaptive`, got {c}"))?
        }
    }
    p.noise_multiplier = args.noise_multiplier;
    p.target_epsilon = args.target_epsilon;
    p.delta = args.delta;
    p.accountant = args.accountant.clone();
    p.bits = args.bits;
    p.population = args.clients as u64;
    Ok(p)
}

async fn simulate(args: Args) -> Result<()> {
    let device = select_device(&args.device)?;
    let train = Arc::new(
        Mnist::load(&args.data, "train")
            .with_context(|| format!("loading training data from {}", args.data.display()))?,
    );
    let data_dir = std::fs::canonicalize(&args.data)
        .with_context(|| format!("data directory {}", args.data.display()))?;

    let temp = tempfile::tempdir().context("creating a temporary state directory")?;
    let state_path = args
        .state_dir
        .clone()
        .unwrap_or_else(|| temp.path().join("state"));
    let per_round = per_round(&args);
    let mut config = ServerConfig::default();
    config.server.listen = "127.0.0.1:0".parse()?;
    config.server.public_addr = "127.0.0.1:0".into();
    config.model.architecture = args.model.to_string();
    config.model.init_seed = args.seed;
    config.rounds.rounds = args.rounds;
    config.rounds.clients_per_round = per_round;
    config.rounds.min_clients = per_round;
    config.rounds.quorum = quorum(&args);
    config.rounds.selection_seed = args.seed;
    config.rounds.round_timeout_secs = 3600.0;
    config.training.epochs = args.epochs;
    config.training.batch_size = args.batch;
    config.training.learning_rate = args.lr;
    config.training.update_encoding = args.update_encoding.to_string();
    config.aggregation.optimizer = args.server_opt.clone();
    config.aggregation.aggregator = args.aggregator.clone();
    config.aggregation.server_learning_rate = args.server_lr;
    // The server evaluates every version on the held-out set as it commits.
    config.evaluation.test_data = data_dir.display().to_string();
    config.privacy = privacy_config(&args)?;
    config.secure_aggregation = secagg_config(&args);
    config.compliance.min_cohort = args.min_cohort;
    set_mode(&mut config, &args);
    if args.dp != "off" {
        // Poisson sampling: the cohort varies, so commit with half of it.
        config.rounds.min_clients = args.clients;
    }
    let state = StateDir::new(&state_path);
    let resumed_at = if args.resume {
        Some(resume(&state, &config)?)
    } else {
        state.init(&config)?;
        None
    };
    let identities = {
        let store = state.open_store()?;
        (0..args.clients)
            .map(|i| enroll(&state, &store, &format!("sim-{i}")))
            .collect::<Result<Vec<_>, _>>()?
    };

    let server = Server::open(&state)?;
    let addr = server.local_addr()?;
    let mut commits = server.subscribe();
    let stopper = server.stopper();
    let server = tokio::spawn(server.run());

    let parts = args.partition.split(&train.labels, args.clients, args.seed);
    // Each virtual client also holds a share of the test set, for
    // `covey-server evaluate` against a live --state-dir.
    let test = Arc::new(Mnist::load(&data_dir, "t10k")?);
    let holdouts = Partition::Iid.split(&test.labels, args.clients, args.seed);
    let (slot_count, threads_each) = slot_plan(args.parallel, device.is_cpu())?;
    let slots = Arc::new(Slots::new(slot_count, threads_each)?);
    let attackers = if args.attack == Attack::None {
        0
    } else {
        (args.attackers * args.clients as f64).ceil() as usize
    };
    // Only label-flip attackers need the relabelled copy of the training set.
    let flipped = (args.attack == Attack::LabelFlip).then(|| {
        Arc::new(Mnist {
            labels: train
                .labels
                .iter()
                .map(|l| 9u8.saturating_sub(*l))
                .collect(),
            ..(*train).clone()
        })
    });
    let mut clients = Vec::new();
    for (i, ((identity, indices), holdout)) in
        identities.into_iter().zip(parts).zip(holdouts).enumerate()
    {
        let attack = if i < attackers {
            args.attack
        } else {
            Attack::None
        };
        let view = DataView {
            data: match (&flipped, attack) {
                (Some(flipped), Attack::LabelFlip) => flipped.clone(),
                _ => train.clone(),
            },
            indices,
        };
        let holdout = DataView {
            data: test.clone(),
            indices: holdout,
        };
        let trainer = Virtual {
            inner: CandleTrainer::new(&view, &device)?.with_holdout(&holdout)?,
            slots: slots.clone(),
            attack,
            rng: rand::SeedableRng::seed_from_u64(args.seed ^ i as u64),
        };
        let options = ClientOptions {
            server_addr: Some(addr),
            give_up_after: Some(Duration::from_secs(600)),
            require_secure_aggregation: args.secagg,
            dropout: (args.dropout > 0.0).then_some(Dropout {
                probability: args.dropout,
                phase: args.dropout_phase,
            }),
            ..ClientOptions::default()
        };
        clients.push(tokio::spawn(async move {
            covey_client::run(&identity, Box::new(trainer), options).await
        }));
    }

    if !args.json {
        if let Some(round) = resumed_at {
            println!(
                "covey-sim: resuming the run in {} after round {round}",
                state_path.display()
            );
        }
        println!(
            "covey-sim: {} {} clients ({} per round), {:?} partition, E={} B={} lr={} {} {}, {} rounds",
            args.clients,
            args.model,
            per_round,
            args.partition,
            args.epochs,
            args.batch,
            args.lr,
            args.server_opt,
            args.update_encoding,
            args.rounds
        );
    }
    let started = Instant::now();
    let mut last = Instant::now();
    let mut reached = None;
    while let Ok(notice) = commits.recv().await {
        let r = &notice.record;
        let (accuracy, loss) = (
            r.test_accuracy.unwrap_or(f32::NAN),
            r.test_loss.unwrap_or(f32::NAN),
        );
        let seconds = last.elapsed().as_secs_f64();
        last = Instant::now();
        if args.json {
            println!(
                "{}",
                serde_json::json!({
                    "round": notice.version.0,
                    "accuracy": accuracy,
                    "loss": loss,
                    "participants": r.accepted,
                    "bytes_up": r.bytes_up,
                    "bytes_down": r.bytes_down,
                    "seconds": seconds,
                    "epsilon": r.epsilon,
                })
            );
        } else {
            println!(
                "round {:>4}  accuracy {:.4}  loss {:.4}  participants {:>3}  up {:>8.2} MB  down {:>8.2} MB  {:.1}s{}",
                notice.version.0,
                accuracy,
                loss,
                r.accepted,
                r.bytes_up as f64 / 1e6,
                r.bytes_down as f64 / 1e6,
                seconds,
                r.epsilon
                    .map(|e| format!("  epsilon {e:.3}"))
                    .unwrap_or_default()
            );
        }
        if let Some(target) = args.target_accuracy
            && accuracy >= target
        {
            reached = Some(notice.version.0);
            stopper.stop().await;
            break;
        }
        if notice.version.0 >= args.rounds {
            break;
        }
    }
    let summary = server.await.context("server task")??;
    // A client offline when the run ended (a simulated dropout) would retry
    // a closed server until it gives up; the others have heard by now.
    let grace = tokio::time::Instant::now() + Duration::from_secs(5);
    for c in clients {
        if let Ok(joined) = tokio::time::timeout_at(grace, c).await {
            joined.context("client task")??;
        }
    }
    if !args.json {
        match (args.target_accuracy, reached) {
            (Some(t), Some(r)) => println!("reached accuracy {t} after {r} rounds"),
            (Some(t), None) => println!("did not reach accuracy {t} in {} rounds", args.rounds),
            _ => {}
        }
        if let Some(eps) = summary.epsilon {
            println!(
                "privacy: epsilon {eps:.4} at delta {} spent ({})",
                args.delta,
                summary.finish_reason.as_deref().unwrap_or("finished")
            );
        }
        println!(
            "finished at version {} in {:.1}s; state in {}",
            summary.final_version,
            started.elapsed().as_secs_f64(),
            if args.state_dir.is_some() {
                state_path.display().to_string()
            } else {
                "a temporary directory (pass --state-dir to keep it)".into()
            }
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[test]
    fn slots_follow_the_device_and_the_flag() {
        let cores = std::thread::available_parallelism().map_or(1, usize::from);
        assert_eq!(slot_plan(None, true).unwrap(), (cores, 1));
        assert_eq!(slot_plan(None, false).unwrap(), (1, cores));
        assert_eq!(slot_plan(Some(1), true).unwrap(), (1, cores));
        assert_eq!(slot_plan(Some(4 * cores), true).unwrap(), (4 * cores, 1));
        assert!(slot_plan(Some(0), true).is_err());
        let gpu = slot_plan(Some(2), false).unwrap_err().to_string();
        assert!(gpu.contains("one at a time"), "{gpu}");
    }

    #[test]
    fn the_first_different_setting_is_named_with_its_section() {
        let a = ServerConfig::default();
        assert_eq!(first_difference(&a, &a.clone()), None);
        let mut b = a.clone();
        b.training.learning_rate = 0.3;
        let (kept, asked) = first_difference(&a, &b).unwrap();
        assert!(kept.starts_with("[training] learning_rate"), "{kept}");
        assert!(
            asked.starts_with("[training] learning_rate = 0.3"),
            "{asked}"
        );
    }

    #[test]
    fn no_more_clients_train_at_once_than_there_are_slots() {
        let slots = Arc::new(Slots::new(2, 1).unwrap());
        let (active, most) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let workers: Vec<_> = (0..6)
            .map(|_| {
                let (slots, active, most) = (slots.clone(), active.clone(), most.clone());
                std::thread::spawn(move || {
                    slots
                        .run(|| {
                            let now = active.fetch_add(1, Ordering::SeqCst) + 1;
                            most.fetch_max(now, Ordering::SeqCst);
                            std::thread::sleep(Duration::from_millis(20));
                            active.fetch_sub(1, Ordering::SeqCst);
                            std::thread::current().name().map(str::to_owned)
                        })
                        .unwrap()
                })
            })
            .collect();
        for w in workers {
            let thread = w.join().unwrap().unwrap_or_default();
            assert!(thread.starts_with("covey-sim-slot-"), "ran on {thread}");
        }
        assert!((1..=2).contains(&most.load(Ordering::SeqCst)));
        assert_eq!(slots.free.lock().unwrap().len(), 2);
    }

    #[test]
    fn a_panicking_client_gives_its_slot_back() {
        let slots = Slots::new(1, 1).unwrap();
        let crashed = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            slots.run(|| panic!("training blew up"))
        }));
        assert!(crashed.is_err());
        assert_eq!(slots.run(|| 7).unwrap(), 7);
        assert_eq!(slots.free.lock().unwrap().len(), 1);
    }
}
