//! covey-sim: a real covey-server and K virtual clients talking QUIC with
//! mutual TLS on loopback, training an MNIST classifier or a language model
//! on Shakespeare's speaking roles, one line per round.
#![forbid(unsafe_code)]

mod attack;
mod population;
mod resume;
mod slots;

/// Training frees and re-allocates tensors of megabytes every step; glibc
/// hands them back to the kernel and page-faults them in again, mimalloc
/// reuses them (15% more CNN samples/s, BENCHMARKS.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::{
    path::PathBuf,
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use clap::Parser;
use covey_client::{
    ClientOptions, Device, Dropout, TextTrainer,
    assets::AssetCache,
    lm::{
        LanguageModel,
        generate::{Sampling, generate},
        train::load_base,
    },
    trainer::select_device,
};
use covey_protocol::{
    ModelSpec, UpdateEncoding, model::Tuning, secagg::session::Phase as SecAggPhase,
};
use covey_server::{
    Server, ServerConfig, StateDir,
    rounds::central::TestSet,
    state::model::{LoraChoice, ModelChoice},
};

use attack::Attack;
use population::{Population, SimData};
use resume::resume;
use slots::{Slots, slot_plan};

#[derive(Parser, Debug)]
#[command(
    name = "covey-sim",
    about = "Run a real federation of virtual clients on loopback"
)]
struct Args {
    /// cnn, 2nn or logreg (MNIST); gpt2-bytes or gpt2-124m (language models
    /// trained from scratch); or hf:DIR, a Hugging Face checkpoint.
    #[arg(long, default_value = "2nn")]
    model: String,
    /// A directory of MNIST's train-* and t10k-* IDX files (.gz or raw), or
    /// shakespeare:DIR, the plays' plain texts. Default: the shipped subset
    /// of either (examples/data/mnist, examples/data/shakespeare).
    #[arg(long)]
    data: Option<SimData>,
    /// MNIST: iid, shards or dirichlet:ALPHA. Shakespeare: natural (one
    /// client per speaking role), the only one.
    #[arg(long)]
    partition: Option<String>,
    #[command(flatten)]
    language: LanguageArgs,
    /// Number of virtual clients (K).
    #[arg(long, default_value_t = 10)]
    clients: usize,
    /// Fraction of clients per round (C); at least one client is selected.
    #[arg(long, default_value_t = 1.0)]
    fraction: f64,
    /// Local epochs (E); default 5 for a classifier, 3 for a language model.
    #[arg(long)]
    epochs: Option<u32>,
    /// Local batch size (B); default 10 images or 8 sequences.
    #[arg(long)]
    batch: Option<u32>,
    /// The devices' optimizer: sgd, adam, or adamw:DECAY; default sgd for a
    /// classifier (McMahan et al.), adam for a language model.
    #[arg(long)]
    local_optimizer: Option<String>,
    /// Local learning rate (eta); default 0.1 with SGD, 0.002 with Adam,
    /// 0.0005 with Adam for a language model.
    #[arg(long)]
    lr: Option<f32>,
    /// How the local learning rate falls as versions grow: none,
    /// step:EVERY:FACTOR or cosine:FLOOR (over --rounds).
    #[arg(long, default_value = "none")]
    lr_decay: String,
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
    /// Serve the live web dashboard at this address while the run lasts
    /// (e.g. 127.0.0.1:7480; port 0 picks one). Its URL goes to stderr.
    #[arg(long)]
    dashboard: Option<std::net::SocketAddr>,
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

/// Local training settings: the flags, or the defaults of the model's kind.
struct Local {
    epochs: u32,
    batch: u32,
    lr: f32,
    optimizer: String,
}

impl Local {
    fn for_args(args: &Args) -> Self {
        // Classifiers default to McMahan et al.'s FedAvg; transformers train
        // poorly with plain SGD, and default to Adam.
        let language = args
            .model
            .parse::<covey_protocol::model::Architecture>()
            .is_err();
        let optimizer = args
            .local_optimizer
            .clone()
            .unwrap_or_else(|| if language { "adam" } else { "sgd" }.to_owned());
        let adam = optimizer.starts_with("adam");
        Self {
            epochs: args.epochs.unwrap_or(if language { 3 } else { 5 }),
            batch: args.batch.unwrap_or(if language { 8 } else { 10 }),
            lr: args.lr.unwrap_or(match (adam, language) {
                (true, true) => covey_server::state::model::LANGUAGE_LEARNING_RATE,
                (true, false) => 0.002,
                (false, _) => 0.1,
            }),
            optimizer,
        }
    }
}

/// Language-model flags, as `covey-server init` takes them.
#[derive(clap::Args, Debug)]
struct LanguageArgs {
    /// LoRA rank; 0 fine-tunes every parameter.
    #[arg(long, default_value_t = 0)]
    lora_rank: u32,
    /// LoRA's alpha; default 2 × rank.
    #[arg(long)]
    lora_alpha: Option<f32>,
    /// Projections LoRA adapts (default: the attention projections).
    #[arg(long, value_delimiter = ',')]
    lora_targets: Vec<String>,
    /// Train both LoRA factors instead of FFA-LoRA (B alone).
    #[arg(long)]
    lora_plain: bool,
    /// Tokens per sequence (default 128).
    #[arg(long)]
    context: Option<u32>,
    /// bytes, gpt2 or a tokenizer.json.
    #[arg(long)]
    tokenizer: Option<String>,
    /// What the model continues before and after training.
    #[arg(long, default_value = "To be, or not to be")]
    prompt: String,
    /// The devices hold a LoRA run's frozen base as f32, bf16 or f16.
    #[arg(long, default_value = "f32", value_parser = ["f32", "bf16", "f16"])]
    base_dtype: String,
}

impl LanguageArgs {
    fn choice(&self, model: &str, seed: u64) -> ModelChoice {
        ModelChoice {
            model: model.to_owned(),
            lora: (self.lora_rank > 0).then(|| LoraChoice {
                rank: self.lora_rank,
                alpha: self.lora_alpha,
                targets: self.lora_targets.clone(),
                plain: self.lora_plain,
                seed,
            }),
            context: self.context,
            tokenizer: self.tokenizer.clone(),
            model_file: None,
        }
    }
}

fn main() -> Result<()> {
    let args = Args::parse();
    // As covey-client does: a narrow base lets freed memory go.
    covey_client::memory::for_base(args.language.base_dtype != "f32");
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
    let local = Local::for_args(&args);
    check.training.local_optimizer = local.optimizer.clone();
    check.training.learning_rate_decay = args.lr_decay.clone();
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

/// Enrolls virtual device `name`. A resumed run's devices kept their keys
/// only in the memory of the process that stopped, so their certificates
/// are revoked and new ones issued.
fn enroll(
    state: &StateDir,
    store: &covey_server::state::store::Store,
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
    let temp = tempfile::tempdir().context("creating a temporary state directory")?;
    let state_path = args
        .state_dir
        .clone()
        .unwrap_or_else(|| temp.path().join("state"));
    let state = StateDir::new(&state_path);
    // Version 0: a classifier, a built-in language model or a checkpoint.
    // A fresh run writes a LoRA base straight into the asset store.
    let scratch = if args.resume {
        temp.path().join("scratch")
    } else {
        state.assets_dir()
    };
    let prepared = args
        .language
        .choice(&args.model, args.seed)
        .prepare(args.seed, &scratch)?;
    let language = prepared.spec.as_language().is_some();
    let data = args
        .data
        .clone()
        .unwrap_or_else(|| SimData::default_for(language));
    if let (SimData::Shakespeare(_), Some(p)) = (&data, args.partition.as_deref())
        && p != "natural"
    {
        bail!("--partition {p}: Shakespeare is partitioned by speaking role (natural)");
    }
    let per_round = per_round(&args);
    let mut config = ServerConfig::default();
    config.server.listen = "127.0.0.1:0".parse()?;
    config.dashboard.enabled = args.dashboard.is_some();
    if let Some(addr) = args.dashboard {
        config.dashboard.listen = addr;
    }
    config.server.public_addr = "127.0.0.1:0".into();
    config.model.init_seed = args.seed;
    prepared.configure(&mut config)?;
    config.rounds.rounds = args.rounds;
    config.rounds.clients_per_round = per_round;
    config.rounds.min_clients = per_round;
    config.rounds.quorum = quorum(&args);
    config.rounds.selection_seed = args.seed;
    config.rounds.round_timeout_secs = 3600.0;
    let local = Local::for_args(&args);
    config.training.epochs = local.epochs;
    config.training.batch_size = local.batch;
    config.training.learning_rate = local.lr;
    config.training.local_optimizer = local.optimizer.clone();
    config.training.learning_rate_decay = args.lr_decay.clone();
    config.training.update_encoding = args.update_encoding.to_string();
    config.aggregation.optimizer = args.server_opt.clone();
    config.aggregation.aggregator = args.aggregator.clone();
    config.aggregation.server_learning_rate = args.server_lr;
    config.privacy = privacy_config(&args)?;
    config.secure_aggregation = secagg_config(&args);
    config.compliance.min_cohort = args.min_cohort;
    set_mode(&mut config, &args);
    if args.dp != "off" {
        // Poisson sampling: the cohort varies, so commit with half of it.
        config.rounds.min_clients = args.clients;
    }
    let (slot_count, threads_each) = slot_plan(args.parallel, device.is_cpu())?;
    let slots = Arc::new(Slots::new(slot_count, threads_each)?);
    // The virtual devices share one asset cache, filled from the server's
    // store below, so a base is not fetched K times on one machine.
    let client_assets = AssetCache::new(temp.path().join("client-assets"))?;
    // A text test set lives in the state directory, so that --resume finds
    // the same one.
    std::fs::create_dir_all(&state_path)
        .with_context(|| format!("creating {}", state_path.display()))?;
    let population = Population::build(
        &args,
        &data,
        &prepared.spec,
        &device,
        &slots,
        &client_assets,
        &state_path.join("sim-test"),
    )?;
    // The server evaluates every version on the held-out set as it commits.
    config.evaluation.test_data = std::fs::canonicalize(&population.test_data)?
        .display()
        .to_string();
    let resumed_at = if args.resume {
        Some(resume(&state, &config)?)
    } else {
        state.init_with(&config, prepared.weights, &prepared.assets)?;
        None
    };
    for asset in prepared.spec.assets() {
        if let Some(path) = state.assets()?.verified(&asset)? {
            client_assets.insert(&path)?;
        }
    }
    let identities = {
        let store = state.open_store()?;
        (0..args.clients)
            .map(|i| enroll(&state, &store, &format!("sim-{i}")))
            .collect::<Result<Vec<_>, _>>()?
    };
    if !args.json {
        if let Some(round) = resumed_at {
            println!(
                "covey-sim: resuming the run in {} after round {round}",
                state_path.display()
            );
        }
        println!(
            "covey-sim: {} clients ({} per round), {}, E={} B={} lr={} {} {}, {} rounds",
            args.clients,
            per_round,
            population.describe,
            local.epochs,
            local.batch,
            local.lr,
            args.server_opt,
            args.update_encoding,
            args.rounds
        );
        println!("model: {}", prepared.spec);
        if language {
            let (version, line) = sample(
                &state,
                &population.test_data,
                &args.language.prompt,
                &device,
            )?;
            println!("version {version}: {line}");
        }
    }

    let server = Server::open(&state)?;
    let addr = server.local_addr()?;
    if let Some(url) = server.dashboard_url() {
        eprintln!("dashboard: {url}");
    }
    let mut commits = server.subscribe();
    let stopper = server.stopper();
    let server = tokio::spawn(server.run());

    let mut clients = Vec::new();
    for (identity, trainer) in identities.into_iter().zip(population.trainers) {
        let options = ClientOptions {
            server_addr: Some(addr),
            give_up_after: Some(Duration::from_secs(600)),
            require_secure_aggregation: args.secagg,
            dropout: (args.dropout > 0.0).then_some(Dropout {
                probability: args.dropout,
                phase: args.dropout_phase,
            }),
            assets: Some(client_assets.clone()),
            ..ClientOptions::default()
        };
        clients.push(tokio::spawn(async move {
            covey_client::run(&identity, Box::new(trainer), options).await
        }));
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
        let perplexity = f64::from(loss).exp();
        if args.json {
            println!(
                "{}",
                serde_json::json!({
                    "round": notice.version.0,
                    "accuracy": accuracy,
                    "loss": loss,
                    "perplexity": language.then_some(perplexity),
                    "participants": r.accepted,
                    "bytes_up": r.bytes_up,
                    "bytes_down": r.bytes_down,
                    "seconds": seconds,
                    "epsilon": r.epsilon,
                })
            );
        } else {
            let quality = if language {
                format!("next-token accuracy {accuracy:.4}  perplexity {perplexity:.3}")
            } else {
                format!("accuracy {accuracy:.4}  loss {loss:.4}")
            };
            println!(
                "round {:>4}  {quality}  participants {:>3}  up {:>8.2} MB  down {:>8.2} MB  {:.1}s{}",
                notice.version.0,
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
        if language {
            let (version, line) = sample(
                &state,
                &population.test_data,
                &args.language.prompt,
                &device,
            )?;
            println!("version {version}: {line}");
        }
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

/// The current version's test perplexity and its continuation of
/// `prompt`, greedy, read from the state directory (the server must not
/// hold it).
fn sample(
    state: &StateDir,
    test: &std::path::Path,
    prompt: &str,
    device: &Device,
) -> Result<(u64, String)> {
    let store = state.open_store()?;
    let version = store.current_version()?;
    let weights = store.model(version)?.weights;
    drop(store);
    let spec = state.config()?.settings()?.spec;
    let ModelSpec::Language(l) = &spec else {
        bail!("{spec} writes no text");
    };
    let assets = state.assets()?;
    let test = TestSet::load(test, &spec, &assets)?;
    let metrics = test.evaluate(&spec, &weights)?;
    let base = match l.tuning {
        Tuning::Full => None,
        Tuning::Lora { .. } => Some(Arc::new(load_base(
            l,
            Some(&assets),
            device,
            candle_core::DType::F32,
        )?)),
    };
    let tokenizer = TextTrainer::tokenizer(&l.tokenizer, Some(&assets))?;
    let model = LanguageModel::new(l, &weights, base, device)?;
    let sampling = Sampling {
        max_tokens: 60,
        ..Sampling::default()
    };
    let text = rayon::scope(|_| generate(&model, &tokenizer, prompt, &sampling, device))?;
    Ok((
        version.0,
        format!(
            "test perplexity {:.3}, next-token accuracy {:.4}; {prompt:?} continues {:?}",
            f64::from(metrics.loss).exp(),
            metrics.accuracy,
            text
        ),
    ))
}
