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
    data::text::{Document, TextData},
    lm,
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
    /// Hold the frozen LoRA base as bf16.
    #[arg(long)]
    bf16_base: bool,
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
}

/// Peak resident memory of this process (Linux), in bytes.
fn peak_rss() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

fn main() -> Result<()> {
    covey_client::memory::keep_freed_memory();
    let args = Args::parse();
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
    let spec = LanguageSpec {
        arch,
        tokenizer,
        context: args.context,
        tuning,
    };
    spec.validate()?;
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
    let mut trainer = TextTrainer::new(data, &device).with_base_dtype(if args.bf16_base {
        DType::BF16
    } else {
        DType::F32
    });
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
    };
    // Untimed: tokenizing, the base, first-touch allocations.
    let first = trainer.train(&task, &global)?;
    let tokens = first.num_examples as f64;
    let mut times = Vec::new();
    for _ in 0..args.trials {
        let start = Instant::now();
        trainer.train(&task, &global)?;
        times.push(start.elapsed().as_secs_f64());
    }
    times.sort_by(f64::total_cmp);
    let median = times[times.len() / 2];
    let tokens_per_sec = tokens / median;
    let peak = peak_rss().unwrap_or(0);
    if args.json {
        println!(
            "{}",
            serde_json::json!({
                "model": args.model, "lora_rank": args.lora_rank, "bf16_base": args.bf16_base,
                "batch": args.batch, "context": args.context, "tokens": tokens,
                "seconds": median, "tokens_per_sec": tokens_per_sec,
                "trainable": spec.param_count(), "peak_rss_bytes": peak,
            })
        );
    } else {
        println!(
            "{} lora r={} batch {} context {}: {tokens_per_sec:.0} tokens/s ({tokens} tokens in {median:.2} s), {} trainable, peak RSS {:.0} MiB",
            args.model,
            args.lora_rank,
            args.batch,
            args.context,
            spec.param_count(),
            peak as f64 / (1 << 20) as f64
        );
    }
    Ok(())
}
