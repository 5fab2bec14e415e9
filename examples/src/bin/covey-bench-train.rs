//! Client training throughput: the McMahan CNN (or 2NN) trained by the
//! client's own code path, one epoch of local SGD over random MNIST-shaped
//! data, at each batch size asked for. Prints samples/s per batch size.
//!
//! `target/release/covey-bench-train --device cpu --batches 10,50`

use std::{sync::Arc, time::Instant};

use anyhow::{Context, Result};
use clap::Parser;
use covey_client::{
    CandleTrainer, Trainer,
    data::{DataView, Mnist},
    trainer::select_device,
};
use covey_protocol::{
    ModelVersion, RoundId, UpdateEncoding,
    message::{Hyperparameters, Task, UpdatePrivacy},
    model::{Architecture, ModelSpec},
};
use rand::{Rng, SeedableRng};

/// As in covey-client, so that the figures are the device's.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
struct Args {
    /// auto, cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// cnn or 2nn.
    #[arg(long, default_value = "cnn")]
    model: String,
    /// Batch sizes, comma-separated.
    #[arg(long, default_value = "10,50", value_delimiter = ',')]
    batches: Vec<u32>,
    /// Examples per timed epoch.
    #[arg(long, default_value_t = 2000)]
    examples: usize,
    /// Untimed epochs first (kernel loading, caches).
    #[arg(long, default_value_t = 1)]
    warmup: u32,
    /// One JSON object per batch size.
    #[arg(long)]
    json: bool,
}

fn main() -> Result<()> {
    covey_client::memory::keep_freed_memory();
    let args = Args::parse();
    let arch = match args.model.as_str() {
        "cnn" => Architecture::Cnn,
        "2nn" => Architecture::Mlp2nn,
        other => anyhow::bail!("--model must be cnn or 2nn, got {other}"),
    };
    let device = select_device(&args.device).context("--device")?;
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
    let pixels: Vec<u8> = (0..args.examples * 784).map(|_| rng.random()).collect();
    let labels: Vec<u8> = (0..args.examples)
        .map(|_| rng.random_range(0..10))
        .collect();
    let view = DataView::all(Arc::new(Mnist {
        rows: 28,
        cols: 28,
        pixels,
        labels,
    }));
    let spec = ModelSpec::mnist(arch);
    let global = spec.initial_weights(0);
    let mut trainer = CandleTrainer::new(&view, &device)?;
    for &batch in &args.batches {
        let task = Task {
            round: RoundId(1),
            base_version: ModelVersion(0),
            spec: spec.clone(),
            hyper: Hyperparameters {
                epochs: 1,
                batch_size: batch,
                learning_rate: 0.01,
                proximal_mu: 0.0,
                optimizer: Default::default(),
            },
            update_encoding: UpdateEncoding::F32,
            chunk_len: 1024,
            deadline_ms: 3_600_000,
            seed: 1,
            privacy: UpdatePrivacy::Plain,
            secure_aggregation: None,
            config: Default::default(),
        };
        for _ in 0..args.warmup {
            trainer.train(&task, &global)?;
        }
        let start = Instant::now();
        trainer.train(&task, &global)?;
        let seconds = start.elapsed().as_secs_f64();
        let rate = args.examples as f64 / seconds;
        if args.json {
            println!(
                "{}",
                serde_json::json!({
                    "model": args.model, "device": args.device, "batch": batch,
                    "examples": args.examples, "seconds": seconds, "samples_per_sec": rate,
                })
            );
        } else {
            println!(
                "{} on {}, batch {batch}: {rate:.0} samples/s ({} examples in {seconds:.2} s)",
                args.model, args.device, args.examples
            );
        }
    }
    Ok(())
}
