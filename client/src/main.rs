//! The `covey-client` command line.
#![forbid(unsafe_code)]

/// Training frees and re-allocates tensors of megabytes every step; glibc
/// hands them back to the kernel and page-faults them in again, mimalloc
/// reuses them (15% more CNN samples/s, BENCHMARKS.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::{net::SocketAddr, path::PathBuf, sync::Arc, time::Duration};

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use covey_client::{
    CandleTrainer, ClientOptions, TextTrainer, Trainer,
    assets::AssetCache,
    data::{
        DataView, Mnist,
        text::{TextData, pack, read_documents},
    },
    lm::{
        generate::{Sampling, generate},
        local,
        train::{evaluate_sequences, metrics},
    },
    trainer::select_device,
};
use covey_protocol::identity::IdentityBundle;

#[derive(Parser)]
#[command(
    name = "covey-client",
    version,
    about = "Covey federated learning client"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Join the federation: check in, train on local data, send updates, repeat.
    Run {
        /// Identity bundle from `covey-server enroll`.
        #[arg(long)]
        identity: PathBuf,
        /// This device's data: MNIST's train-images-idx3-ubyte[.gz] and
        /// train-labels-idx1-ubyte[.gz] (optionally t10k-* held out), or text
        /// for a language model: *.txt files and *.jsonl files with a "text"
        /// field, optionally a heldout/ folder of the same for federated
        /// evaluation.
        #[arg(long)]
        data: PathBuf,
        /// Where files a task names by hash (a LoRA base, a tokenizer.json)
        /// are kept; default: beside the identity, as NAME.assets.
        #[arg(long)]
        cache: Option<PathBuf>,
        /// Hold a frozen LoRA base as f32, bf16 or f16 (half the memory).
        #[arg(long, default_value = "f32")]
        base_dtype: String,
        /// auto, cpu, cuda or cuda:N.
        #[arg(long, default_value = "auto")]
        device: String,
        /// Dial this address instead of the one in the bundle.
        #[arg(long)]
        server: Option<SocketAddr>,
        /// Give up after this many seconds without reaching the server.
        #[arg(long)]
        give_up_after: Option<u64>,
        /// Refuse to download a global model larger than this (bytes of f32 weights).
        #[arg(long, default_value_t = 1 << 30)]
        max_model_bytes: u64,
    },
    /// Evaluate a language model offline on local text: loss, perplexity and
    /// next-token accuracy.
    Evaluate {
        #[command(flatten)]
        model: ModelArgs,
        /// A folder of *.txt and *.jsonl files.
        #[arg(long)]
        data: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Continue a prompt with a language model.
    Generate {
        #[command(flatten)]
        model: ModelArgs,
        #[arg(long)]
        prompt: String,
        #[arg(long, default_value_t = 64)]
        max_tokens: usize,
        /// 0 is greedy; above 0 samples.
        #[arg(long, default_value_t = 0.0)]
        temperature: f32,
        /// Sample among the k most likely tokens (0: all).
        #[arg(long, default_value_t = 0)]
        top_k: usize,
        #[arg(long, default_value_t = 0)]
        seed: u64,
    },
}

/// A language model on local disk.
#[derive(clap::Args)]
struct ModelArgs {
    /// A Hugging Face checkpoint directory (config.json, model.safetensors,
    /// optionally tokenizer.json), such as `covey-server export --format hf`
    /// writes.
    #[arg(long)]
    model: PathBuf,
    /// A peft LoRA adapter directory to apply on top (`export --format lora`).
    #[arg(long)]
    adapter: Option<PathBuf>,
    /// bytes, gpt2 or the path of a tokenizer.json (default: the
    /// checkpoint's).
    #[arg(long)]
    tokenizer: Option<String>,
    /// Tokens per sequence (default: the model's positions, at most 256).
    #[arg(long)]
    context: Option<u32>,
    /// auto, cpu, cuda or cuda:N.
    #[arg(long, default_value = "auto")]
    device: String,
}

impl ModelArgs {
    fn open(&self) -> Result<(local::LocalModel, covey_client::Device)> {
        let device = select_device(&self.device)?;
        let m = local::open(
            &self.model,
            self.adapter.as_deref(),
            self.tokenizer.as_deref(),
            self.context,
            &device,
        )
        .with_context(|| format!("loading the model in {}", self.model.display()))?;
        Ok((m, device))
    }
}

fn base_dtype(name: &str) -> Result<candle_core::DType> {
    Ok(match name {
        "f32" => candle_core::DType::F32,
        "bf16" => candle_core::DType::BF16,
        "f16" => candle_core::DType::F16,
        other => anyhow::bail!("--base-dtype: expected f32, bf16 or f16, got {other}"),
    })
}

/// The trainer for what `data` holds: MNIST images or text.
fn local_trainer(
    data: &std::path::Path,
    device: &covey_client::Device,
    cache: &AssetCache,
    dtype: candle_core::DType,
) -> Result<Box<dyn Trainer>> {
    match Mnist::load(data, "train") {
        Ok(dataset) => {
            tracing::info!(examples = dataset.len(), ?device, "local images loaded");
            let mut trainer =
                CandleTrainer::new(&DataView::all(Arc::new(dataset)), device)?.with_progress(true);
            // Held-out data, if the device has some, serves federated evaluation.
            match Mnist::load(data, "t10k") {
                Ok(holdout) => {
                    tracing::info!(examples = holdout.len(), "held-out data loaded");
                    trainer = trainer.with_holdout(&DataView::all(Arc::new(holdout)))?;
                }
                Err(covey_client::data::DataError::Missing { .. }) => {}
                Err(e) => return Err(e).context("loading held-out data"),
            }
            Ok(Box::new(trainer))
        }
        Err(covey_client::data::DataError::Missing { .. }) if TextData::present(data) => {
            let text = TextData::load(data)
                .with_context(|| format!("loading local text from {}", data.display()))?;
            tracing::info!(
                documents = text.train.len(),
                held_out = text.heldout.len(),
                ?device,
                "local text loaded"
            );
            Ok(Box::new(
                TextTrainer::new(text, device)
                    .with_assets(cache.clone())
                    .with_base_dtype(dtype)
                    .with_progress(true),
            ))
        }
        Err(e) => Err(e).with_context(|| {
            format!(
                "loading local data from {} (MNIST IDX files, or *.txt / *.jsonl text)",
                data.display()
            )
        }),
    }
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    // A narrow base is asked for to save memory, which kept freed pages
    // would give back (see `memory`).
    covey_client::memory::for_base(matches!(
        &cli.command,
        Command::Run { base_dtype, .. } if base_dtype != "f32"
    ));
    let filter = tracing_subscriber::EnvFilter::try_from_env("COVEY_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,quinn=warn,quinn_proto=warn"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    match cli.command {
        Command::Run {
            identity,
            data,
            cache,
            base_dtype: dtype,
            device,
            server,
            give_up_after,
            max_model_bytes,
        } => {
            let identity_path = identity;
            let identity = IdentityBundle::load(&identity_path)?;
            let device = select_device(&device)?;
            let dtype = base_dtype(&dtype)?;
            let cache = cache.unwrap_or_else(|| identity_path.with_extension("assets"));
            let cache = AssetCache::new(&cache)
                .with_context(|| format!("asset cache {}", cache.display()))?;
            let trainer = local_trainer(&data, &device, &cache, dtype)?;
            let options = ClientOptions {
                server_addr: server,
                give_up_after: give_up_after.map(Duration::from_secs),
                identity_path: Some(identity_path.clone()),
                max_model_bytes,
                assets: Some(cache),
                ..ClientOptions::default()
            };
            let runtime = tokio::runtime::Runtime::new().context("starting the async runtime")?;
            let summary = runtime.block_on(covey_client::run(&identity, trainer, options))?;
            println!(
                "done: trained {} rounds, {} updates accepted, final global version {}; {:.3} s in rounds, {:.3} s of it training",
                summary.rounds_trained,
                summary.updates_accepted,
                summary
                    .final_version
                    .map(|v| v.0.to_string())
                    .unwrap_or_else(|| "unknown".into()),
                summary.round_time.as_secs_f64(),
                summary.train_time.as_secs_f64(),
            );
        }
        Command::Evaluate { model, data, json } => {
            let (m, device) = model.open()?;
            let docs = read_documents(&data)
                .with_context(|| format!("loading text from {}", data.display()))?;
            let ids = docs
                .iter()
                .map(|d| m.tokenizer.encode(&d.text))
                .collect::<Result<Vec<_>, _>>()?;
            let context = m.model.spec().context as usize;
            let seqs = pack(&ids, &m.tokenizer.separator()?, context);
            if seqs.is_empty() {
                anyhow::bail!("{}: no token to predict", data.display());
            }
            let t = rayon::scope(|_| evaluate_sequences(&m.model, &seqs, &device))?;
            let r = metrics(t);
            let perplexity = f64::from(r.loss).exp();
            if json {
                println!(
                    "{}",
                    serde_json::json!({
                        "tokens": t.tokens, "loss": r.loss, "perplexity": perplexity,
                        "accuracy": r.accuracy, "context": context,
                    })
                );
            } else {
                println!(
                    "{} tokens: loss {:.4}, perplexity {perplexity:.2}, next-token accuracy {:.2}%",
                    t.tokens,
                    r.loss,
                    100.0 * r.accuracy
                );
            }
        }
        Command::Generate {
            model,
            prompt,
            max_tokens,
            temperature,
            top_k,
            seed,
        } => {
            let (m, device) = model.open()?;
            let sampling = Sampling {
                max_tokens,
                temperature,
                top_k,
                seed,
            };
            let text =
                rayon::scope(|_| generate(&m.model, &m.tokenizer, &prompt, &sampling, &device))?;
            println!("{prompt}{text}");
        }
    }
    Ok(())
}
