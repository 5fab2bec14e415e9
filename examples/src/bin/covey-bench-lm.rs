//! Language-model training throughput on the client's own code path: local
//! SGD epochs over random text, tokens per second and peak memory.
//!
//! `target/release/covey-bench-lm --model gpt2-bytes --batch 16 --context 128`
//! `target/release/covey-bench-lm --model gpt2-124m --lora-rank 8 --batch 2 --context 128`

use std::time::Instant;

use anyhow::{Context, Result};
use candle_core::DType;
use clap::Parser;
use covey_client::{
    TextTrainer, Trainer,
    assets::AssetCache,
    data::text::{Document, TextData},
    lm::{self, checkpoint},
    trainer::select_device,
};
use covey_protocol::{
    ModelVersion, RoundId, UpdateEncoding,
    message::{Hyperparameters, Task, UpdatePrivacy},
    model::{BaseWeights, LanguageSpec, LoraSpec, LoraVariant, ModelSpec, Tuning},
};
use rand::{Rng, SeedableRng};

/// As in covey-client, so that the figures are the device's.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
struct Args {
    /// A built-in model: gpt2-bytes or gpt2-124m.
    #[arg(long, default_value = "gpt2-bytes")]
    model: String,
    /// LoRA rank on the attention projections; 0 trains every parameter.
    #[arg(long, default_value_t = 0)]
    lora_rank: u32,
    /// The dtype the frozen LoRA base is held in: f32, bf16 or f16.
    #[arg(long, default_value = "f32", value_parser = ["f32", "bf16", "f16"])]
    base_dtype: String,
    #[arg(long, default_value_t = 16)]
    batch: u32,
    #[arg(long, default_value_t = 128)]
    context: u32,
    /// Sequences per timed epoch.
    #[arg(long, default_value_t = 64)]
    sequences: usize,
    /// Timed epochs; the median is reported.
    #[arg(long, default_value_t = 3)]
    trials: usize,
    #[arg(long, default_value = "cpu")]
    device: String,
    #[arg(long)]
    json: bool,
    /// Internal: draw the seeded LoRA base, write it here and exit.
    #[arg(long, hide = true)]
    write_base: Option<std::path::PathBuf>,
}

/// A LoRA base as a device holds it: a safetensors file in its asset
/// cache. A child process draws the seeded base and writes the file, so
/// that the f32 draw (kept by the allocator once freed) never counts in
/// this process's memory: a device receives the file, it never draws it.
fn device_base(file: &std::path::Path, cache: &AssetCache) -> Result<BaseWeights> {
    let exe = std::env::current_exe().context("finding this binary")?;
    let status = std::process::Command::new(exe)
        .args(std::env::args_os().skip(1))
        .arg("--write-base")
        .arg(file)
        .status()
        .context("drawing the base in a child process")?;
    if !status.success() {
        anyhow::bail!("drawing the base failed: {status}");
    }
    Ok(BaseWeights::Asset(cache.adopt(file)?))
}

/// A line of this process's `/proc/self/status` (Linux), in bytes:
/// `VmHWM` is the peak resident memory, `VmRSS` the present one.
fn status_bytes(field: &str) -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with(field))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// Starts a new peak: Linux resets `VmHWM` to the present RSS when "5" is
/// written to `clear_refs`, so the peak of the timed epochs is the
/// training's own, not that of drawing or narrowing the base.
fn reset_peak_rss() -> bool {
    std::fs::write("/proc/self/clear_refs", "5").is_ok()
}

fn main() -> Result<()> {
    let args = Args::parse();
    // As covey-client does: a narrow base lets freed memory go.
    covey_client::memory::for_base(args.base_dtype != "f32");
    let device = select_device(&args.device).context("--device")?;
    let (arch, tokenizer) = lm::builtin(&args.model)
        .with_context(|| format!("--model: '{}' is not a built-in model", args.model))?;
    let family = arch.family();
    let tuning = if args.lora_rank == 0 {
        Tuning::Full
    } else {
        Tuning::Lora {
            lora: LoraSpec {
                rank: args.lora_rank,
                alpha: 2.0 * args.lora_rank as f32,
                targets: family
                    .default_lora_targets()
                    .iter()
                    .map(|t| t.to_string())
                    .collect(),
                variant: LoraVariant::FrozenA,
                seed: 1,
            },
            base: BaseWeights::Seeded(0),
        }
    };
    let mut spec = LanguageSpec {
        arch,
        tokenizer,
        context: args.context,
        tuning,
    };
    spec.validate()?;
    if let Some(out) = &args.write_base {
        // The child of `device_base`: draws the base and writes it out.
        let flat = spec.initial_base(0);
        let tensors = spec.arch.family().tensors();
        checkpoint::write_safetensors(out, &tensors, &flat, "", Default::default())?;
        return Ok(());
    }
    let scratch = tempfile::tempdir().context("creating a scratch directory")?;
    let cache = AssetCache::new(scratch.path().join("assets"))?;
    if let Tuning::Lora { base, .. } = &mut spec.tuning {
        *base = device_base(&scratch.path().join("base.safetensors"), &cache)?;
    }
    let spec = ModelSpec::Language(Box::new(spec));
    // Random words: about one BPE token per 4 bytes, one byte token per byte.
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
    let bytes_per_token = if args.model == "gpt2-bytes" { 1 } else { 5 };
    let want = args.sequences * args.context as usize * bytes_per_token + 64;
    let mut text = String::with_capacity(want);
    while text.len() < want {
        let len = rng.random_range(1..9);
        for _ in 0..len {
            text.push(rng.random_range(b'a'..=b'z') as char);
        }
        text.push(' ');
    }
    let data = TextData {
        train: vec![Document {
            source: "random".into(),
            text,
        }],
        heldout: Vec::new(),
    };
    let base_dtype = match args.base_dtype.as_str() {
        "bf16" => DType::BF16,
        "f16" => DType::F16,
        _ => DType::F32,
    };
    let mut trainer = TextTrainer::new(data, &device)
        .with_base_dtype(base_dtype)
        .with_assets(cache);
    let global = spec.initial_weights(0);
    let task = Task {
        round: RoundId(1),
        base_version: ModelVersion(0),
        spec: spec.clone(),
        hyper: Hyperparameters {
            epochs: 1,
            batch_size: args.batch,
            learning_rate: 1e-4,
            proximal_mu: 0.0,
            optimizer: Default::default(),
        },
        update_encoding: UpdateEncoding::F32,
        chunk_len: 1 << 18,
        deadline_ms: 3_600_000,
        seed: 1,
        privacy: UpdatePrivacy::Plain,
        secure_aggregation: None,
        config: Default::default(),
    };
    // Untimed: tokenizing, loading the base, first-touch allocations.
    reset_peak_rss();
    let first = trainer.train(&task, &global)?;
    let tokens = first.num_examples as f64;
    let load_peak = status_bytes("VmHWM:").unwrap_or(0);
    let train_peak_known = reset_peak_rss();
    let mut times = Vec::new();
    for _ in 0..args.trials {
        let start = Instant::now();
        trainer.train(&task, &global)?;
        times.push(start.elapsed().as_secs_f64());
    }
    times.sort_by(f64::total_cmp);
    let median = times[times.len() / 2];
    let tokens_per_sec = tokens / median;
    let train_peak = if train_peak_known {
        status_bytes("VmHWM:")
    } else {
        None
    };
    let mib = |b: u64| b as f64 / (1 << 20) as f64;
    if args.json {
        println!(
            "{}",
            serde_json::json!({
                "model": args.model, "lora_rank": args.lora_rank, "base_dtype": args.base_dtype,
                "batch": args.batch, "context": args.context, "tokens": tokens,
                "seconds": median, "tokens_per_sec": tokens_per_sec,
                "trainable": spec.param_count(), "peak_rss_bytes": load_peak,
                "train_peak_rss_bytes": train_peak,
            })
        );
    } else {
        println!(
            "{} lora r={} {} base, batch {} context {}: {tokens_per_sec:.0} tokens/s ({tokens} tokens in {median:.2} s), {} trainable, peak RSS {:.0} MiB to the first epoch, {} while training",
            args.model,
            args.lora_rank,
            args.base_dtype,
            args.batch,
            args.context,
            spec.param_count(),
            mib(load_peak),
            train_peak.map_or("unknown".to_owned(), |b| format!("{:.0} MiB", mib(b)))
        );
    }
    Ok(())
}
