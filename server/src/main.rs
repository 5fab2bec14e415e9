//! The `covey-server` command line.
#![forbid(unsafe_code)]

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use covey_protocol::ModelVersion;
use covey_server::{
    Server, ServerConfig, StateDir,
    dir::DirError,
    operator::admin::Role,
    operator::control::ControlRequest,
    operator::status::{self, Report},
    state::model::{LoraChoice, ModelChoice},
};

#[derive(Parser)]
#[command(
    name = "covey-server",
    version,
    about = "Covey federated learning server"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// Language-model settings of `init`.
#[derive(clap::Args, Debug)]
struct LanguageArgs {
    /// LoRA rank; 0 fine-tunes every parameter.
    #[arg(long, default_value_t = 0)]
    lora_rank: u32,
    /// LoRA's alpha (the update is scaled by alpha / rank); default 2 × rank.
    #[arg(long)]
    lora_alpha: Option<f32>,
    /// Projections LoRA adapts, by name or dotted suffix (c_attn,
    /// attn.c_proj, q_proj, ...); default: the attention projections.
    #[arg(long, value_delimiter = ',')]
    lora_targets: Vec<String>,
    /// Train both LoRA factors (inexact under averaging) instead of
    /// FFA-LoRA, which freezes A and trains B alone.
    #[arg(long)]
    lora_plain: bool,
    /// Tokens per training and evaluation sequence (default 128).
    #[arg(long)]
    context: Option<u32>,
    /// bytes, gpt2 (GPT-2's BPE) or the path of a tokenizer.json; default:
    /// the built-in model's, or the checkpoint's tokenizer.json.
    #[arg(long)]
    tokenizer: Option<String>,
}

impl LanguageArgs {
    fn choice(&self, model: String, seed: u64) -> ModelChoice {
        ModelChoice {
            model,
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

/// Where a cluster's JetStream is.
#[derive(clap::Args, Clone)]
struct NatsArgs {
    /// NATS server URL; repeat for each node of the cluster.
    #[arg(long = "nats", required = true)]
    urls: Vec<String>,
    /// The JetStream bucket prefix this federation's state lives under.
    #[arg(long, default_value = "covey")]
    bucket: String,
    /// NATS nodes holding each value: 3 tolerates one down.
    #[arg(long, default_value_t = 3)]
    replicas: usize,
    /// How long one JetStream request may take, in milliseconds.
    #[arg(long, default_value_t = 2000)]
    request_timeout_ms: u64,
}

impl NatsArgs {
    fn config(&self) -> covey_server::cluster::jetstream::ClusterConfig {
        covey_server::cluster::jetstream::ClusterConfig {
            urls: self.urls.clone(),
            bucket: self.bucket.clone(),
            replicas: self.replicas,
            request_timeout: Duration::from_millis(self.request_timeout_ms),
        }
    }
}

/// `enroll --days`, checked.
fn certificate_lifetime(days: u64) -> Result<Duration> {
    if days == 0 {
        bail!("--days must be at least 1");
    }
    Ok(Duration::from_secs(days.saturating_mul(86_400)))
}

/// The cluster at `urls`, as the provisioning directory whose `store` is
/// open sees it, with the runtime its calls run on (for the operator's
/// commands: enroll, revoke, audit export).
fn cluster_of(
    store: &covey_server::state::store::Store,
    urls: Vec<String>,
    bucket: String,
) -> Result<(
    tokio::runtime::Runtime,
    covey_server::cluster::jetstream::Cluster,
)> {
    let config = NatsArgs {
        urls,
        bucket,
        replicas: 3,
        request_timeout_ms: 2000,
    }
    .config();
    let runtime = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    let cluster = runtime.block_on(covey_server::cluster::jetstream::Cluster::connect(
        &config,
        store.data_key(),
    ))?;
    Ok((runtime, cluster))
}

/// The cluster registry (for enroll and revoke).
fn cluster_registry(
    store: &covey_server::state::store::Store,
    urls: Vec<String>,
    bucket: String,
) -> Result<(
    tokio::runtime::Runtime,
    covey_server::cluster::registry::Registry,
)> {
    let (runtime, cluster) = cluster_of(store, urls, bucket)?;
    let registry = runtime.block_on(cluster.patiently(|c| async move { c.registry().await }))?;
    Ok((runtime, registry))
}

#[derive(Subcommand)]
enum Command {
    /// Create a state directory: CA, server certificate, database, config.toml.
    Init {
        #[arg(long)]
        dir: PathBuf,
        /// UDP address to listen on.
        #[arg(long, default_value = "127.0.0.1:7443")]
        listen: SocketAddr,
        /// Address devices dial (written into enrollment bundles); defaults to --listen.
        #[arg(long)]
        public_addr: Option<String>,
        /// The model: logreg, 2nn or cnn (MNIST classifiers); gpt2-bytes or
        /// gpt2-124m (language models trained from scratch); or hf:DIR, a
        /// Hugging Face checkpoint (config.json, model.safetensors and
        /// optionally tokenizer.json) of the gpt2, llama or qwen2 family.
        #[arg(long, default_value = "2nn")]
        model: String,
        /// An external model instead: a safetensors file of named float
        /// tensors (covey.write_initial_model writes one from a Python
        /// client's get_parameters) that devices train in their own code.
        #[arg(long, conflicts_with = "model")]
        model_file: Option<PathBuf>,
        #[command(flatten)]
        language: LanguageArgs,
        /// Rounds in the run.
        #[arg(long, default_value_t = 10)]
        rounds: u64,
        /// Updates wanted per round (also the minimum pool and the quorum).
        #[arg(long, default_value_t = 2)]
        clients_per_round: usize,
        /// Held-out test set every new version is evaluated on: MNIST t10k IDX
        /// files, or for a language model a folder of *.txt / *.jsonl text.
        #[arg(long)]
        test_data: Option<PathBuf>,
        /// Key-encryption key for the database: file:PATH (created if
        /// missing; relative to --dir) or env:VARIABLE (64 hex digits).
        #[arg(long, default_value = "file:kek.key")]
        kek: String,
    },
    /// Re-wrap the database's data key under a new key-encryption key and
    /// point config.toml at it; no data is rewritten. Stop the server first.
    RotateKey {
        #[arg(long)]
        dir: PathBuf,
        /// The new key: file:PATH (created if missing) or env:VARIABLE.
        #[arg(long)]
        to: String,
    },
    /// Issue a client identity bundle (key, certificate, CA, server address).
    Enroll {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long)]
        name: String,
        #[arg(long)]
        out: PathBuf,
        /// Certificate lifetime in days.
        #[arg(long, default_value_t = 30)]
        days: u64,
        /// device (trains), or auditor, operator or admin (the operator API).
        #[arg(long, default_value = "device")]
        role: Role,
        /// A cluster's NATS: the enrollment also goes to its registry,
        /// which every leaf applies within a second.
        #[arg(long = "nats")]
        nats: Vec<String>,
        #[arg(long, default_value = "covey")]
        bucket: String,
    },
    /// Revoke a client; it is refused at the TLS handshake from then on.
    Revoke {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long)]
        name: String,
        /// A cluster's NATS: the revocation also goes to its registry,
        /// which every leaf applies within a second.
        #[arg(long = "nats")]
        nats: Vec<String>,
        #[arg(long, default_value = "covey")]
        bucket: String,
    },
    /// Right to erasure: delete a client's enrollment (the only link from
    /// its name to its pseudonym) and refuse it from then on.
    Forget {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long)]
        name: String,
    },
    /// Apply the retention policy ([compliance] keep_rounds_days,
    /// keep_versions) now; a running server applies it after every commit.
    Purge {
        #[arg(long)]
        dir: PathBuf,
    },
    /// Serve rounds over QUIC until the configured number has committed.
    Run {
        #[arg(long)]
        dir: PathBuf,
        /// Print the run summary as JSON on exit.
        #[arg(long)]
        json: bool,
    },
    /// A root coordinator replica of a cluster: plans rounds across leaves,
    /// merges their sums and commits, while it holds the lease in JetStream.
    Coordinator {
        #[arg(long)]
        dir: PathBuf,
        #[command(flatten)]
        nats: NatsArgs,
        /// This replica's name, for logs.
        #[arg(long, default_value = "root")]
        name: String,
        /// How long the lease lasts; a standby takes over this long after
        /// the holder stops renewing.
        #[arg(long, default_value_t = 3000)]
        lease_ms: u64,
    },
    /// A leaf aggregator of a cluster: meets devices over QUIC, runs the
    /// rounds its root plans and forwards only the sum of their updates.
    Aggregator {
        #[arg(long)]
        dir: PathBuf,
        #[command(flatten)]
        nats: NatsArgs,
        /// This leaf's stable name (letters, digits, '-', '_').
        #[arg(long)]
        leaf: String,
        /// Past this many devices waiting for a task here, newcomers are
        /// told to come back later (pace steering).
        #[arg(long, default_value_t = 10_000)]
        max_waiting: u64,
        /// About how long (jittered ±50%) a paced device stays away, in
        /// seconds.
        #[arg(long, default_value_t = 60)]
        pace_secs: u64,
        /// Serve every device that connects here instead of sending each
        /// to the leaf its pseudonym hashes to (leaves behind a load
        /// balancer that already spreads devices).
        #[arg(long)]
        no_redirect: bool,
        /// Where devices reach this leaf (`host:port`), which it advertises
        /// for redirects; default: config.toml's server.public_addr.
        #[arg(long)]
        public_addr: Option<String>,
        /// Print the run summary as JSON on exit.
        #[arg(long)]
        json: bool,
    },
    /// Write global model version V: safetensors (the trainable tensors, one
    /// file), hf (a Hugging Face checkpoint directory for transformers'
    /// from_pretrained, LoRA merged, with tokenizer.json) or lora (the peft
    /// adapter directory).
    Export {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long)]
        version: u64,
        #[arg(long)]
        out: PathBuf,
        #[arg(long, default_value = "safetensors")]
        format: covey_server::operator::export::Format,
    },
    /// Federated evaluation on a live run: idle clients evaluate the given
    /// versions on their own held-out data; prints example-weighted metrics.
    Evaluate {
        #[arg(long)]
        dir: PathBuf,
        /// One or two versions (comma-separated) to compare, e.g. 7,8.
        #[arg(long, value_delimiter = ',', required = true)]
        versions: Vec<u64>,
        /// Seconds to wait for the clients' reports.
        #[arg(long, default_value_t = 60)]
        timeout: u64,
        #[arg(long)]
        json: bool,
    },
    /// Privacy accounting for DP-FedAvg (Poisson-subsampled Gaussian, RDP
    /// accountant, improved conversion).
    Privacy {
        #[command(subcommand)]
        command: PrivacyCommand,
    },
    /// The tamper-evident audit trail: export it, publish its key, verify it.
    Audit {
        #[command(subcommand)]
        command: AuditCommand,
    },
    /// Write the compliance report (report.json and report.html with plots)
    /// into a directory; works while the server runs.
    Report {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long)]
        out: PathBuf,
    },
    /// Use a running server's operator API from any machine, with an
    /// auditor, operator or admin identity (`enroll --role`).
    Remote {
        /// The identity bundle `enroll --role ...` wrote.
        #[arg(long)]
        identity: PathBuf,
        #[command(subcommand)]
        command: RemoteCommand,
    },
    /// Show rounds, the current version and the enrolled clients.
    Status {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum RemoteCommand {
    Status {
        #[arg(long)]
        json: bool,
    },
    /// report.json and report.html into a directory.
    Report {
        #[arg(long)]
        out: PathBuf,
    },
    AuditExport {
        #[arg(long)]
        out: PathBuf,
    },
    AuditPublicKey {
        #[arg(long)]
        out: PathBuf,
    },
    Enroll {
        #[arg(long)]
        name: String,
        #[arg(long, default_value_t = 30)]
        days: u64,
        #[arg(long, default_value = "device")]
        role: Role,
        #[arg(long)]
        out: PathBuf,
    },
    Revoke {
        #[arg(long)]
        name: String,
    },
    Forget {
        #[arg(long)]
        name: String,
    },
    /// A login for the web dashboard in this identity's role; the token is
    /// printed once. Paste it at the dashboard's /login page.
    DashboardLogin {
        #[arg(long, default_value_t = 12)]
        hours: u64,
    },
    /// End every dashboard login this identity was issued.
    DashboardLogout,
}

fn remote(identity: &std::path::Path, command: RemoteCommand) -> Result<()> {
    use covey_server::operator::admin::{AdminReply, AdminRequest, call};
    let bundle = covey_protocol::identity::IdentityBundle::load(identity)
        .with_context(|| format!("reading the identity {}", identity.display()))?;
    let request = match &command {
        RemoteCommand::Status { .. } => AdminRequest::Status,
        RemoteCommand::Report { .. } => AdminRequest::Report,
        RemoteCommand::AuditExport { .. } => AdminRequest::AuditExport,
        RemoteCommand::AuditPublicKey { .. } => AdminRequest::AuditPublicKey,
        RemoteCommand::Enroll {
            name, days, role, ..
        } => AdminRequest::Enroll {
            name: name.clone(),
            days: *days,
            role: *role,
        },
        RemoteCommand::Revoke { name } => AdminRequest::Revoke { name: name.clone() },
        RemoteCommand::Forget { name } => AdminRequest::Forget { name: name.clone() },
        RemoteCommand::DashboardLogin { hours } => AdminRequest::DashboardLogin { hours: *hours },
        RemoteCommand::DashboardLogout => AdminRequest::DashboardLogout,
    };
    let runtime = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    let reply = runtime.block_on(call(&bundle, &request))?;
    let write = |path: &std::path::Path, text: &str| {
        std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))
    };
    match (command, reply) {
        (RemoteCommand::Status { json }, AdminReply::Status(report)) => {
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                print!("{}", report.render_text());
            }
        }
        (RemoteCommand::Report { out }, AdminReply::Report { json, html }) => {
            std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
            write(&out.join("report.json"), &json)?;
            write(&out.join("report.html"), &html)?;
            println!("wrote the report to {}", out.display());
        }
        (RemoteCommand::AuditExport { out }, AdminReply::AuditExport { jsonl }) => {
            write(&out, &jsonl)?;
            println!(
                "wrote {} audit entries to {}",
                jsonl.lines().count(),
                out.display()
            );
        }
        (RemoteCommand::AuditPublicKey { out }, AdminReply::AuditPublicKey { text }) => {
            write(&out, &text)?;
            println!("wrote the audit public key to {}", out.display());
        }
        (RemoteCommand::Enroll { name, out, .. }, AdminReply::Enrolled { identity }) => {
            write_secret(&out, identity.as_bytes())?;
            println!("enrolled '{name}': identity written to {}", out.display());
        }
        (_, AdminReply::Revoked { certificates }) => {
            println!("revoked {certificates} certificate(s)")
        }
        (_, AdminReply::Forgotten { enrollments }) => {
            println!("forgot {enrollments} enrollment(s)")
        }
        (
            RemoteCommand::DashboardLogin { .. },
            AdminReply::DashboardLogin {
                token,
                expires_unix,
            },
        ) => {
            let expires = covey_server::operator::report::utc(expires_unix);
            eprintln!(
                "a dashboard login valid until {expires}; paste it at the dashboard's /login page (it is shown only now):"
            );
            println!("{token}");
        }
        (_, AdminReply::DashboardLoggedOut { logins }) => {
            println!("ended {logins} dashboard login(s)")
        }
        // Never printed: an answer may hold an identity's private key.
        (_, _) => bail!("the server answered a different request"),
    }
    Ok(())
}

#[derive(Subcommand)]
enum AuditCommand {
    /// Write the whole trail as JSON lines, ending with the record of this
    /// export (works while the server runs). With --nats, a cluster's
    /// trail, which its leading coordinator closes; --dir is then the
    /// provisioning directory.
    Export {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long)]
        out: PathBuf,
        /// NATS server URL of the cluster; repeat for each node.
        #[arg(long)]
        nats: Vec<String>,
        /// The JetStream bucket prefix of the cluster's state.
        #[arg(long, default_value = "covey")]
        bucket: String,
    },
    /// Write the public key that verifies exports.
    PublicKey {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long)]
        out: PathBuf,
    },
    /// Check an exported trail's chain, signatures and completeness; needs
    /// no state directory. Exits non-zero naming the first bad entry.
    Verify {
        /// The exported trail (audit.jsonl).
        file: PathBuf,
        #[arg(long)]
        public_key: PathBuf,
        /// A head hash printed by an earlier verify; the trail must still
        /// contain it. Repeatable.
        #[arg(long)]
        checkpoint: Vec<String>,
        #[arg(long)]
        json: bool,
    },
}

fn audit(command: AuditCommand) -> Result<()> {
    use covey_server::state::audit::{self, EntryHash};
    match command {
        AuditCommand::Export {
            dir,
            out,
            nats,
            bucket,
        } if !nats.is_empty() => {
            let store = StateDir::new(&dir).open_store()?;
            let (runtime, cluster) = cluster_of(&store, nats, bucket)?;
            let entries = runtime.block_on(async {
                let trail = cluster
                    .patiently(|c| async move { c.trail().await })
                    .await?;
                let mut file = std::io::BufWriter::new(
                    std::fs::File::create(&out)
                        .with_context(|| format!("creating {}", out.display()))?,
                );
                let entries = covey_server::cluster::trail::export(
                    &trail,
                    &mut file,
                    Duration::from_secs(30),
                )
                .await?;
                anyhow::Ok(entries)
            })?;
            println!(
                "wrote {entries} audit entries of the cluster's trail to {}",
                out.display()
            );
        }
        AuditCommand::Export { dir, out, .. } => {
            let state = StateDir::new(&dir);
            let entries = match state.open_store() {
                Ok(store) => state.export_audit(&store, &out)?,
                Err(e) if holds_lock(&e) => {
                    let id: u64 = rand::random();
                    live_answer(&state, &ControlRequest::ExportAudit { id }, "the export")?;
                    state.take_audit_export(id, &out)?;
                    count_lines(&out)?
                }
                Err(e) => return Err(e.into()),
            };
            println!("wrote {entries} audit entries to {}", out.display());
        }
        AuditCommand::PublicKey { dir, out } => {
            let state = StateDir::new(&dir);
            let text = match state.open_store() {
                Ok(store) => store.audit_public_key()?,
                // The running server published it when it started.
                Err(e) if holds_lock(&e) => {
                    let path = state.audit_public_key_path();
                    std::fs::read_to_string(&path)
                        .with_context(|| format!("reading {}", path.display()))?
                }
                Err(e) => return Err(e.into()),
            };
            std::fs::write(&out, &text).with_context(|| format!("writing {}", out.display()))?;
            println!("wrote the audit public key to {}", out.display());
        }
        AuditCommand::Verify {
            file,
            public_key,
            checkpoint,
            json,
        } => {
            let key_text = std::fs::read_to_string(&public_key)
                .with_context(|| format!("reading {}", public_key.display()))?;
            let key = audit::parse_public_key(&key_text)
                .with_context(|| format!("{}", public_key.display()))?;
            let checkpoints = checkpoint
                .iter()
                .map(|c| {
                    EntryHash::parse(c)
                        .with_context(|| format!("--checkpoint {c:?} is not a 64-digit hex hash"))
                })
                .collect::<Result<Vec<_>>>()?;
            let reader = std::io::BufReader::new(
                std::fs::File::open(&file)
                    .with_context(|| format!("opening {}", file.display()))?,
            );
            let verified = audit::verify_export(reader, &key, &checkpoints)
                .with_context(|| format!("{} is not a valid audit trail", file.display()))?;
            let mut kinds = std::collections::BTreeMap::<String, u64>::new();
            for entry in &verified.events {
                let value = serde_json::to_value(&entry.event)?;
                if let Some(kind) = value["event"].as_str() {
                    *kinds.entry(kind.to_owned()).or_default() += 1;
                }
            }
            if json {
                println!(
                    "{}",
                    serde_json::json!({
                        "valid": true,
                        "entries": verified.entries,
                        "head": verified.head.to_string(),
                        "events": kinds,
                    })
                );
            } else {
                println!(
                    "valid: {} entries, chain and signatures intact\nhead: {}",
                    verified.entries, verified.head
                );
                for (kind, n) in kinds {
                    println!("  {kind:<16} {n}");
                }
            }
        }
    }
    Ok(())
}

fn count_lines(path: &std::path::Path) -> Result<u64> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    Ok(text.lines().count() as u64)
}

#[derive(Subcommand)]
enum PrivacyCommand {
    /// ε after T rounds at noise multiplier Z and sampling rate Q.
    Epsilon {
        #[arg(long)]
        noise_multiplier: f64,
        #[arg(long)]
        sampling_rate: f64,
        #[arg(long)]
        rounds: u64,
        #[arg(long)]
        delta: f64,
        /// rdp (Rényi DP, improved conversion) or pld (privacy loss
        /// distributions, tighter).
        #[arg(long, default_value = "rdp", value_parser = ["rdp", "pld"])]
        accountant: String,
        #[arg(long)]
        json: bool,
    },
    /// The smallest noise multiplier that keeps T rounds within (ε, δ).
    Noise {
        #[arg(long)]
        epsilon: f64,
        #[arg(long)]
        delta: f64,
        #[arg(long)]
        sampling_rate: f64,
        #[arg(long)]
        rounds: u64,
        /// The accountant whose ε must meet the target: rdp or pld.
        #[arg(long, default_value = "rdp", value_parser = ["rdp", "pld"])]
        accountant: String,
        #[arg(long)]
        json: bool,
    },
}

/// ε after `rounds` by the named accountant; +∞ where PLD proves no finite ε.
fn accounted_epsilon(
    accountant: &str,
    q: covey_privacy::accountant::SamplingRate,
    z: covey_privacy::accountant::NoiseMultiplier,
    rounds: u64,
    delta: covey_privacy::accountant::Delta,
) -> f64 {
    match accountant {
        "pld" => {
            covey_privacy::pld::pld_epsilon(q, z, rounds, delta).map_or(f64::INFINITY, |e| e.get())
        }
        _ => covey_privacy::accountant::dp_fedavg_epsilon(q, z, rounds, delta).get(),
    }
}

fn accountant_name(accountant: &str) -> &'static str {
    match accountant {
        "pld" => "PLD accountant, connect-the-dots",
        _ => "RDP accountant, improved conversion",
    }
}

fn privacy(command: PrivacyCommand) -> Result<()> {
    use covey_privacy::accountant::{
        Delta, Epsilon, NoiseMultiplier, SamplingRate, smallest_noise,
    };
    match command {
        PrivacyCommand::Epsilon {
            noise_multiplier,
            sampling_rate,
            rounds,
            delta,
            accountant,
            json,
        } => {
            let eps = accounted_epsilon(
                &accountant,
                SamplingRate::new(sampling_rate)?,
                NoiseMultiplier::new(noise_multiplier)?,
                rounds,
                Delta::new(delta)?,
            );
            if !eps.is_finite() {
                bail!(
                    "no finite epsilon holds at delta = {delta}: more than delta of the privacy loss is unbounded at this noise"
                );
            }
            if json {
                println!(
                    "{}",
                    serde_json::json!({ "epsilon": eps, "delta": delta, "accountant": accountant })
                );
            } else {
                println!(
                    "epsilon = {eps:.4} at delta = {delta} ({})",
                    accountant_name(&accountant)
                );
            }
        }
        PrivacyCommand::Noise {
            epsilon,
            delta,
            sampling_rate,
            rounds,
            accountant,
            json,
        } => {
            let (target, q, d) = (
                Epsilon::new(epsilon)?,
                SamplingRate::new(sampling_rate)?,
                Delta::new(delta)?,
            );
            let z = smallest_noise(target, |z| accounted_epsilon(&accountant, q, z, rounds, d))
                .with_context(|| {
                    format!(
                        "no noise multiplier up to 1000 keeps {rounds} rounds within epsilon {epsilon}"
                    )
                })?;
            if json {
                println!(
                    "{}",
                    serde_json::json!({ "noise_multiplier": z.get(), "accountant": accountant })
                );
            } else {
                println!(
                    "noise multiplier = {:.4} ({})",
                    z.get(),
                    accountant_name(&accountant)
                );
            }
        }
    }
    Ok(())
}

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("COVEY_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,quinn=warn,quinn_proto=warn"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    init_logging();
    match cli.command {
        Command::Privacy { command } => privacy(command)?,
        Command::Audit { command } => audit(command)?,
        Command::Remote { identity, command } => remote(&identity, command)?,
        Command::Init {
            dir,
            listen,
            public_addr,
            model,
            model_file,
            language,
            rounds,
            clients_per_round,
            test_data,
            kek,
        } => {
            let mut config = ServerConfig::default();
            config.storage.kek = kek;
            config.server.listen = listen;
            config.server.public_addr = public_addr.unwrap_or_else(|| listen.to_string());
            let state = StateDir::new(&dir);
            state.check_new()?;
            let mut choice = language.choice(model, config.model.init_seed);
            choice.model_file = model_file;
            let prepared = choice.prepare(config.model.init_seed, &state.assets_dir())?;
            prepared
                .configure(&mut config)
                .context("writing the model spec")?;
            prepared.training_defaults(&mut config);
            config.rounds.rounds = rounds;
            config.rounds.clients_per_round = clients_per_round;
            config.rounds.min_clients = clients_per_round;
            config.rounds.quorum = clients_per_round;
            if let Some(path) = test_data {
                let absolute = std::fs::canonicalize(&path)
                    .with_context(|| format!("test data directory {}", path.display()))?;
                config.evaluation.test_data = absolute.display().to_string();
            }
            state.init_with(&config, prepared.weights, &prepared.assets)?;
            println!("model: {}", prepared.spec);
            println!(
                "initialised {}: edit {} to change settings, then `covey-server enroll`",
                dir.display(),
                state.config_path().display()
            );
        }
        Command::Enroll {
            dir,
            name,
            out,
            days,
            role,
            nats,
            bucket,
        } if !nats.is_empty() => {
            // A cluster's provisioning directory: no server holds it open.
            let state = StateDir::new(&dir);
            let store = state.open_store()?;
            let lifetime = certificate_lifetime(days)?;
            let (bundle, pseudonym) = state.enroll_as(&store, &name, lifetime, None, role)?;
            cluster_registry(&store, nats, bucket)
                .and_then(|(runtime, registry)| {
                    Ok(runtime.block_on(registry.admit(&pseudonym, role))?)
                })
                .with_context(|| {
                format!("'{name}' is enrolled here but not yet in the cluster's registry; revoke it and enroll again")
            })?;
            write_secret(&out, bundle.to_toml().as_bytes())?;
            println!(
                "enrolled '{name}' as {role} here and in the cluster's registry: identity written to {}",
                out.display()
            );
        }
        Command::Enroll {
            dir,
            name,
            out,
            days,
            role,
            ..
        } => {
            let state = StateDir::new(&dir);
            let lifetime = certificate_lifetime(days)?;
            let bundle = match state.open_store() {
                Ok(store) => state.enroll_as(&store, &name, lifetime, None, role)?.0,
                Err(e) if holds_lock(&e) => {
                    let (bundle, not_after_unix) = state.issue_identity(&name, lifetime, None)?;
                    let request = state.queue(&ControlRequest::Enroll {
                        name: name.clone(),
                        cert_pem: bundle.cert_pem.clone(),
                        not_after_unix,
                        role,
                    })?;
                    match state.await_request(&request, LIVE_WAIT) {
                        Some(Ok(())) => bundle,
                        Some(Err(reason)) => {
                            bail!("the running server refused the enrollment: {reason}")
                        }
                        None if state.withdraw(&request) => {
                            bail!(
                                "the database is locked but no server took the request; try again"
                            )
                        }
                        None => bundle,
                    }
                }
                Err(e) => return Err(e.into()),
            };
            write_secret(&out, bundle.to_toml().as_bytes())?;
            println!(
                "enrolled '{name}' as {role}: identity written to {}",
                out.display()
            );
        }
        Command::RotateKey { dir, to } => {
            let state = StateDir::new(&dir);
            let store = match state.open_store() {
                Err(e) if holds_lock(&e) => {
                    bail!("the server is running: stop it, then rotate the key")
                }
                other => other?,
            };
            let old = state.config()?.storage.kek;
            state.rotate_kek(&store, &to)?;
            println!(
                "the data key is now wrapped by {to} and config.toml points at it; the old key ({old}) no longer opens this database"
            );
        }
        Command::Revoke {
            dir,
            name,
            nats,
            bucket,
        } if !nats.is_empty() => {
            // A cluster's provisioning directory: no server holds it open.
            // The registry first, so a failure there can be retried: every
            // certificate of the name, revoked before or not.
            let state = StateDir::new(&dir);
            let store = state.open_store()?;
            let pseudonyms: Vec<_> = store
                .enrollments()?
                .into_iter()
                .filter(|e| e.name == name)
                .map(|e| e.pseudonym)
                .collect();
            if pseudonyms.is_empty() {
                bail!("no device named '{name}' is enrolled in {}", dir.display());
            }
            let (runtime, registry) = cluster_registry(&store, nats, bucket)?;
            let now = time::OffsetDateTime::now_utc().unix_timestamp();
            runtime.block_on(async {
                for pseudonym in &pseudonyms {
                    registry.revoke(pseudonym, now).await?;
                }
                Ok::<_, covey_server::cluster::jetstream::ClusterError>(())
            })?;
            let revoked = state.revoke(&store, &name).map(|r| r.len()).unwrap_or(0);
            println!(
                "revoked {} certificate(s) of '{name}' in the cluster's registry ({revoked} newly here)",
                pseudonyms.len()
            );
        }
        Command::Revoke { dir, name, .. } => offline_or_live(
            &StateDir::new(&dir),
            |state, store| {
                let n = state.revoke(store, &name)?.len();
                Ok(format!("revoked {n} certificate(s) of '{name}'"))
            },
            ControlRequest::Revoke { name: name.clone() },
            &format!("the revocation of '{name}'"),
        )?,
        Command::Forget { dir, name } => offline_or_live(
            &StateDir::new(&dir),
            |state, store| {
                let n = state.forget(store, &name)?.len();
                Ok(format!(
                    "forgot '{name}': {n} enrollment(s) erased and refused; the audit trail keeps only their pseudonyms"
                ))
            },
            ControlRequest::Forget { name: name.clone() },
            &format!("forgetting '{name}'"),
        )?,
        Command::Report { dir, out } => {
            let state = StateDir::new(&dir);
            let valid = match state.open_store() {
                Ok(store) => {
                    covey_server::operator::report::write(&state, &store, &out)?
                        .audit
                        .valid
                }
                Err(e) if holds_lock(&e) => {
                    let id: u64 = rand::random();
                    live_answer(&state, &ControlRequest::Report { id }, "the report")?;
                    state.take_report(id, &out)?;
                    let json = std::fs::read_to_string(out.join("report.json"))?;
                    serde_json::from_str::<serde_json::Value>(&json)?["audit"]["valid"]
                        .as_bool()
                        .unwrap_or(false)
                }
                Err(e) => return Err(e.into()),
            };
            println!(
                "wrote {} and {}",
                out.join("report.json").display(),
                out.join("report.html").display()
            );
            if !valid {
                bail!("the audit trail did not verify: see the report");
            }
        }
        Command::Purge { dir } => {
            let state = StateDir::new(&dir);
            let retention = state.config()?.settings()?.retention;
            if retention.is_forever() {
                println!("nothing to purge: [compliance] keeps everything");
                return Ok(());
            }
            let store = match state.open_store() {
                Err(e) if holds_lock(&e) => {
                    bail!(
                        "the running server purges after every commit; run this while it is stopped"
                    )
                }
                other => other?,
            };
            let purged = store.purge(retention, covey_server::state::store::unix_ms_now())?;
            println!(
                "purged {} round record(s) and {} model version(s)",
                purged.rounds.len(),
                purged.versions.len()
            );
        }
        Command::Run { dir, json } => {
            let runtime = tokio::runtime::Runtime::new().context("starting the async runtime")?;
            let summary = runtime.block_on(async {
                let server = Server::open(&StateDir::new(&dir))?;
                let addr = server.local_addr()?;
                // Only the port: logs never carry IP addresses.
                tracing::info!(port = addr.port(), "listening");
                tokio::select! {
                    s = server.run() => Ok::<_, anyhow::Error>(Some(s?)),
                    _ = tokio::signal::ctrl_c() => Ok(None),
                }
            })?;
            match summary {
                Some(s) if json => println!("{}", serde_json::to_string(&s)?),
                Some(s) => println!(
                    "run finished at version {}: {} rounds committed, {} aborted, {} bytes up, {} bytes down",
                    s.final_version, s.rounds_committed, s.rounds_aborted, s.bytes_up, s.bytes_down
                ),
                None => println!("interrupted; state is saved, `covey-server run` resumes"),
            }
        }
        Command::Coordinator {
            dir,
            nats,
            name,
            lease_ms,
        } => {
            let runtime = tokio::runtime::Runtime::new().context("starting the async runtime")?;
            runtime.block_on(async {
                let (stop, stopped) = tokio::sync::watch::channel(false);
                tokio::spawn(async move {
                    if tokio::signal::ctrl_c().await.is_ok() {
                        let _ = stop.send(true);
                    }
                });
                covey_server::cluster::process::coordinator(
                    &StateDir::new(&dir),
                    &nats.config(),
                    &name,
                    Duration::from_millis(lease_ms),
                    stopped,
                )
                .await
            })?;
        }
        Command::Aggregator {
            dir,
            nats,
            leaf,
            max_waiting,
            pace_secs,
            no_redirect,
            public_addr,
            json,
        } => {
            let routing = if no_redirect {
                covey_server::cluster::route::Routing::Any
            } else {
                covey_server::cluster::route::Routing::Hashed
            };
            let pace = covey_server::cluster::route::Pace {
                max_waiting,
                every: Duration::from_secs(pace_secs),
            };
            let leaf = covey_server::cluster::route::LeafId::parse(&leaf)?;
            let runtime = tokio::runtime::Runtime::new().context("starting the async runtime")?;
            let (state, cluster) = (StateDir::new(&dir), nats.config());
            let summary = runtime.block_on(async {
                tokio::select! {
                    s = covey_server::cluster::process::aggregator(&state, &cluster, leaf, pace, routing, public_addr) => Ok::<_, anyhow::Error>(Some(s?)),
                    _ = tokio::signal::ctrl_c() => Ok(None),
                }
            })?;
            match summary {
                Some(s) if json => println!("{}", serde_json::to_string(&s)?),
                Some(s) => println!(
                    "run finished at version {}: {} rounds forwarded and committed, {} not, {} bytes up, {} bytes down",
                    s.final_version, s.rounds_committed, s.rounds_aborted, s.bytes_up, s.bytes_down
                ),
                None => println!("interrupted; this leaf holds nothing the cluster needs"),
            }
        }
        Command::Export {
            dir,
            version,
            out,
            format,
        } => {
            let state = StateDir::new(&dir);
            let store = state.open_store()?;
            let model = store.model(ModelVersion(version))?;
            covey_server::operator::export::export(&model, format, &state.assets()?, &out)?;
            // Plaintext leaves the store only on request, and on the record.
            store.audit([covey_server::state::audit::AuditEvent::ModelExported { version }])?;
            println!("wrote version {version} to {}", out.display());
        }
        Command::Evaluate {
            dir,
            versions,
            timeout,
            json,
        } => {
            if versions.is_empty() || versions.len() > 2 {
                bail!("--versions takes one or two versions, e.g. --versions 7,8");
            }
            let state = StateDir::new(&dir);
            match state.open_store() {
                Ok(_) => bail!(
                    "evaluate needs a running server: clients evaluate on their own data while connected"
                ),
                Err(e) if holds_lock(&e) => {}
                Err(e) => return Err(e.into()),
            }
            let id: u64 = rand::random();
            let request = state.queue(&ControlRequest::Evaluate {
                id,
                versions,
                timeout_secs: timeout,
            })?;
            match state.await_request(&request, LIVE_WAIT) {
                Some(Ok(())) => {}
                Some(Err(reason)) => bail!("the running server refused the evaluation: {reason}"),
                None if state.withdraw(&request) => bail!("no running server took the request"),
                None => {}
            }
            let deadline = std::time::Instant::now() + Duration::from_secs(timeout) + LIVE_WAIT;
            let outcome = loop {
                if let Some(outcome) = state.take_eval_outcome(id) {
                    break outcome;
                }
                if std::time::Instant::now() > deadline {
                    bail!("the server did not report the evaluation in time");
                }
                std::thread::sleep(Duration::from_millis(100));
            };
            if json {
                println!("{}", serde_json::to_string_pretty(&outcome)?);
            } else if let Some(error) = &outcome.error {
                bail!("evaluation failed: {error}");
            } else {
                println!(
                    "{} of {} idle clients answered; {} with held-out data, {} examples",
                    outcome.answered, outcome.asked, outcome.clients_with_data, outcome.examples
                );
                for v in &outcome.versions {
                    println!(
                        "  version {:>4}  accuracy {:.4}  loss {:.4}",
                        v.version, v.accuracy, v.loss
                    );
                }
            }
        }
        Command::Status { dir, json } => {
            let state = StateDir::new(&dir);
            let report = match state.open_store() {
                Ok(store) => Report::from_store(&store, true)?,
                Err(open_err) if holds_lock(&open_err) => {
                    // A running server holds the database: fall back to its snapshot.
                    let snapshot =
                        status::read_snapshot(&state.status_path()).map_err(|_| open_err)?;
                    eprintln!("(the server is running: showing its latest snapshot)");
                    snapshot
                }
                Err(e) => return Err(e.into()),
            };
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                print!("{}", report.render_text());
            }
        }
    }
    Ok(())
}

/// How long enroll and revoke wait for a running server to take a request.
const LIVE_WAIT: Duration = Duration::from_secs(5);

/// Applies a change to the database, or hands it to the running server
/// that holds it (which applies it and closes affected connections).
fn offline_or_live(
    state: &StateDir,
    offline: impl FnOnce(&StateDir, &covey_server::state::store::Store) -> Result<String>,
    request: ControlRequest,
    what: &str,
) -> Result<()> {
    match state.open_store() {
        Ok(store) => println!("{}", offline(state, &store)?),
        Err(e) if holds_lock(&e) => {
            let queued = state.queue(&request)?;
            match state.await_request(&queued, LIVE_WAIT) {
                Some(Ok(())) => println!("the running server applied {what}"),
                Some(Err(reason)) => bail!("the running server refused {what}: {reason}"),
                None => println!("queued {what}; the server applies it when it runs"),
            }
        }
        Err(e) => return Err(e.into()),
    }
    Ok(())
}

/// Hands a request whose answer is a file to the running server and waits
/// until it has written it.
fn live_answer(state: &StateDir, request: &ControlRequest, what: &str) -> Result<()> {
    let queued = state.queue(request)?;
    match state.await_request(&queued, LIVE_WAIT) {
        Some(Ok(())) => Ok(()),
        Some(Err(reason)) => bail!("the running server refused {what}: {reason}"),
        None if state.withdraw(&queued) => {
            bail!("the database is locked but no server took the request")
        }
        None => bail!("the server took the request but did not answer in time"),
    }
}

/// Whether opening the store failed because a running server holds it.
fn holds_lock(e: &DirError) -> bool {
    matches!(
        e,
        DirError::Store(covey_server::state::store::StoreError::Open { .. })
    )
}

fn write_secret(path: &std::path::Path, contents: &[u8]) -> Result<()> {
    std::fs::write(path, contents).with_context(|| format!("writing {}", path.display()))?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
            .with_context(|| format!("restricting {}", path.display()))?;
    }
    Ok(())
}
