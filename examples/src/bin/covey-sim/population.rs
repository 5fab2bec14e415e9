//! The simulated population: each virtual client's own data and trainer,
//! and the held-out set the server evaluates every version on.
//!
//! MNIST is split across clients by `--partition` (iid, shards or
//! dirichlet:ALPHA). Shakespeare is partitioned naturally: one client per
//! (play, speaking role), as in McMahan et al. 2017 and LEAF, with each
//! role's last 20% of lines held out.

use std::{path::PathBuf, sync::Arc};

use anyhow::{Context, Result, bail};
use covey_client::{
    CandleTrainer, Device, TextTrainer, TrainOutput, Trainer,
    assets::AssetCache,
    data::{DataView, Mnist, shakespeare},
    partition::Partition,
    trainer::TrainError,
};
use covey_protocol::{
    message::{LocalMetrics, Task},
    model::ModelSpec,
};
use rand::{SeedableRng, seq::SliceRandom};

use crate::{Args, attack::Attack, slots::Slots};

/// Where the clients' data comes from.
#[derive(Clone, Debug, PartialEq)]
pub enum SimData {
    /// MNIST's IDX files.
    Mnist(PathBuf),
    /// The plays' plain texts, one client per speaking role.
    Shakespeare(PathBuf),
}

impl std::str::FromStr for SimData {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(match s.strip_prefix("shakespeare:") {
            Some(dir) => Self::Shakespeare(dir.into()),
            None => Self::Mnist(s.into()),
        })
    }
}

impl SimData {
    /// The data a model trains on when --data is not given.
    pub fn default_for(language: bool) -> Self {
        if language {
            Self::Shakespeare("examples/data/shakespeare".into())
        } else {
            Self::Mnist("examples/data/mnist".into())
        }
    }
}

/// A virtual client: trains in one of the shared [`Slots`], and attacks
/// if told to.
pub struct Virtual {
    inner: Box<dyn Trainer>,
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
        spec: ModelSpec,
        weights: &[f32],
    ) -> Result<Option<(LocalMetrics, u64)>, TrainError> {
        let inner = &mut self.inner;
        self.slots.run(|| inner.evaluate(spec, weights))?
    }
}

/// Every client's trainer, and the server's test set.
pub struct Population {
    pub trainers: Vec<Virtual>,
    /// `[evaluation] test_data` for the server.
    pub test_data: PathBuf,
    /// One line on who the clients are.
    pub describe: String,
}

impl Population {
    /// The clients for `data`; a language model's clients fetch assets
    /// into `assets`, and its test set is written under `scratch`.
    pub fn build(
        args: &Args,
        data: &SimData,
        spec: &ModelSpec,
        device: &Device,
        slots: &Arc<Slots>,
        assets: &AssetCache,
        scratch: &std::path::Path,
    ) -> Result<Self> {
        let virtual_client = |i: usize, inner: Box<dyn Trainer>, attack: Attack| Virtual {
            inner,
            slots: slots.clone(),
            attack,
            rng: rand::SeedableRng::seed_from_u64(args.seed ^ i as u64),
        };
        match (data, spec) {
            (SimData::Mnist(dir), ModelSpec::Classifier(_)) => {
                images(args, dir, device, virtual_client)
            }
            (SimData::Shakespeare(dir), ModelSpec::Language(_)) => {
                if args.attack == Attack::LabelFlip {
                    bail!("--attack label-flip needs labels; text has none");
                }
                let roles = shakespeare::load(dir)
                    .with_context(|| format!("loading plays from {}", dir.display()))?;
                if roles.len() < args.clients {
                    bail!(
                        "--clients {}: {} holds only {} speaking roles",
                        args.clients,
                        dir.display(),
                        roles.len()
                    );
                }
                let mut order: Vec<usize> = (0..roles.len()).collect();
                order.shuffle(&mut rand_chacha::ChaCha8Rng::seed_from_u64(args.seed));
                let mut chosen: Vec<&shakespeare::Role> =
                    order[..args.clients].iter().map(|&i| &roles[i]).collect();
                chosen.sort_by(|a, b| (&a.play, &a.name).cmp(&(&b.play, &b.name)));
                let test_data = scratch.join("test");
                std::fs::create_dir_all(&test_data)?;
                let attackers = attackers(args);
                let mut trainers = Vec::new();
                for (i, role) in chosen.iter().enumerate() {
                    std::fs::write(test_data.join(format!("{i}.txt")), role.test.join("\n"))?;
                    let trainer = TextTrainer::new(role.text_data(), device)
                        .with_assets(assets.clone())
                        .with_base_dtype(match args.language.base_dtype.as_str() {
                            "bf16" => candle_core::DType::BF16,
                            "f16" => candle_core::DType::F16,
                            _ => candle_core::DType::F32,
                        });
                    let attack = if i < attackers {
                        args.attack
                    } else {
                        Attack::None
                    };
                    trainers.push(virtual_client(i, Box::new(trainer), attack));
                }
                let lines: usize = chosen.iter().map(|r| r.train.len()).sum();
                let plays = {
                    let mut p: Vec<&str> = chosen.iter().map(|r| r.play.as_str()).collect();
                    p.dedup();
                    p.len()
                };
                Ok(Self {
                    trainers,
                    test_data,
                    describe: format!(
                        "{} speaking roles of {plays} plays ({} roles in {}), {lines} training lines",
                        chosen.len(),
                        roles.len(),
                        dir.display()
                    ),
                })
            }
            (SimData::Mnist(_), ModelSpec::Language(_)) => bail!(
                "a language model trains on text: pass --data shakespeare:DIR (the shipped subset is examples/data/shakespeare)"
            ),
            (SimData::Shakespeare(_), ModelSpec::Classifier(_)) => {
                bail!("{spec} classifies MNIST images: pass --data with MNIST's IDX files")
            }
            (_, ModelSpec::External(_)) => bail!(
                "covey-sim trains the models Covey builds; an external model trains in devices' own code (the Python package)"
            ),
        }
    }
}

/// How many of the clients attack (the first ⌈fraction·K⌉).
fn attackers(args: &Args) -> usize {
    if args.attack == Attack::None {
        0
    } else {
        (args.attackers * args.clients as f64).ceil() as usize
    }
}

fn images(
    args: &Args,
    dir: &std::path::Path,
    device: &Device,
    virtual_client: impl Fn(usize, Box<dyn Trainer>, Attack) -> Virtual,
) -> Result<Population> {
    let partition: Partition = args
        .partition
        .as_deref()
        .unwrap_or("iid")
        .parse()
        .map_err(|e: String| anyhow::anyhow!("--partition: {e}"))?;
    let train = Arc::new(
        Mnist::load(dir, "train")
            .with_context(|| format!("loading training data from {}", dir.display()))?,
    );
    let data_dir =
        std::fs::canonicalize(dir).with_context(|| format!("data directory {}", dir.display()))?;
    let parts = partition.split(&train.labels, args.clients, args.seed);
    // Each virtual client also holds a share of the test set, for
    // `covey-server evaluate` against a live --state-dir.
    let test = Arc::new(Mnist::load(&data_dir, "t10k")?);
    let holdouts = Partition::Iid.split(&test.labels, args.clients, args.seed);
    let attackers = attackers(args);
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
    let mut trainers = Vec::new();
    for (i, (indices, holdout)) in parts.into_iter().zip(holdouts).enumerate() {
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
        let inner = CandleTrainer::new(&view, device)?.with_holdout(&holdout)?;
        trainers.push(virtual_client(i, Box::new(inner), attack));
    }
    Ok(Population {
        trainers,
        test_data: data_dir,
        describe: format!("{partition:?} partition"),
    })
}
