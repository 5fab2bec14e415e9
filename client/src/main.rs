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
    CandleTrainer, ClientOptions,
    data::{DataView, Mnist},
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
        /// Directory with this device's train-images-idx3-ubyte[.gz] and train-labels-idx1-ubyte[.gz],
        /// and optionally held-out t10k-* files for federated evaluation.
        #[arg(long)]
        data: PathBuf,
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
}

fn main() -> Result<()> {
    let cli = Cli::parse();
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
            device,
            server,
            give_up_after,
            max_model_bytes,
        } => {
            let identity_path = identity;
            let identity = IdentityBundle::load(&identity_path)?;
            let device = select_device(&device)?;
            let dataset = Mnist::load(&data, "train")
                .with_context(|| format!("loading local data from {}", data.display()))?;
            tracing::info!(examples = dataset.len(), ?device, "local data loaded");
            let mut trainer =
                CandleTrainer::new(&DataView::all(Arc::new(dataset)), &device)?.with_progress(true);
            // Held-out data, if the device has some, serves federated evaluation.
            match Mnist::load(&data, "t10k") {
                Ok(holdout) => {
                    tracing::info!(examples = holdout.len(), "held-out data loaded");
                    trainer = trainer.with_holdout(&DataView::all(Arc::new(holdout)))?;
                }
                Err(covey_client::data::DataError::Missing { .. }) => {}
                Err(e) => return Err(e).context("loading held-out data"),
            }
            let options = ClientOptions {
                server_addr: server,
                give_up_after: give_up_after.map(Duration::from_secs),
                identity_path: Some(identity_path.clone()),
                max_model_bytes,
                ..ClientOptions::default()
            };
            let runtime = tokio::runtime::Runtime::new().context("starting the async runtime")?;
            let summary =
                runtime.block_on(covey_client::run(&identity, Box::new(trainer), options))?;
            println!(
                "done: trained {} rounds, {} updates accepted, final global version {}",
                summary.rounds_trained,
                summary.updates_accepted,
                summary
                    .final_version
                    .map(|v| v.0.to_string())
                    .unwrap_or_else(|| "unknown".into())
            );
        }
    }
    Ok(())
}
