//! LoRA (Hu et al. 2021): a projection W gains a low-rank update
//! (α / r) · B·A with A of shape [r, in] and B of shape [out, r], and only
//! the factors train.
//!
//! Under federated averaging, the mean of the clients' B·A products is not
//! the product of their means, so averaging both factors is inexact. With
//! FFA-LoRA (Sun et al. 2024), every device draws the same frozen A from a
//! seed the server sends and trains B alone: the update is linear in B, the
//! average of B is the exact average update, and DP noise lands on one
//! linear factor.

use std::fmt;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use super::{ModelError, TensorSpec, language::Family};

/// A linear projection LoRA can adapt, under its module path
/// (`h.0.attn.c_attn`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Projection {
    pub path: String,
    pub inputs: usize,
    pub outputs: usize,
}

impl Projection {
    pub fn new(path: String, inputs: usize, outputs: usize) -> Self {
        Self {
            path,
            inputs,
            outputs,
        }
    }

    /// peft's rule: a target names the module's path or a dotted suffix of it.
    fn matches(&self, target: &str) -> bool {
        self.path == target
            || self
                .path
                .strip_suffix(target)
                .is_some_and(|head| head.ends_with('.'))
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum LoraVariant {
    /// FFA-LoRA: A frozen (drawn from the seed), B trains and travels.
    FrozenA,
    /// A and B both train and travel; inexact under averaging.
    Plain,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LoraSpec {
    pub rank: u32,
    pub alpha: f32,
    /// Module names or dotted suffixes (`c_attn`, `attn.c_proj`, `q_proj`).
    pub targets: Vec<String>,
    pub variant: LoraVariant,
    /// Seed of A: the frozen factor under FFA-LoRA, its start otherwise.
    pub seed: u64,
}

/// Largest rank accepted.
const MAX_RANK: u32 = 4096;

impl LoraSpec {
    /// The factor the product B·A is scaled by.
    pub fn scale(&self) -> f32 {
        self.alpha / self.rank as f32
    }

    pub fn validate(&self) -> Result<(), ModelError> {
        if self.rank == 0 || self.rank > MAX_RANK {
            return Err(ModelError::new(
                "lora.rank",
                format!("{} is out of range 1..={MAX_RANK}", self.rank),
            ));
        }
        if !(self.alpha.is_finite() && self.alpha > 0.0) {
            return Err(ModelError::new(
                "lora.alpha",
                format!("{} must be a positive number", self.alpha),
            ));
        }
        if self.targets.is_empty() {
            return Err(ModelError::new("lora.targets", "names no module"));
        }
        Ok(())
    }

    /// The projections the targets select, in the family's order. A target
    /// that selects nothing is an error naming it.
    pub fn modules(&self, family: &dyn Family) -> Result<Vec<Projection>, ModelError> {
        let all = family.projections();
        for target in &self.targets {
            if !all.iter().any(|p| p.matches(target)) {
                let mut names: Vec<&str> = all
                    .iter()
                    .filter_map(|p| p.path.split_once('.').map(|(_, rest)| rest))
                    .map(|rest| rest.split_once('.').map_or(rest, |(_, r)| r))
                    .collect();
                names.dedup();
                names.truncate(8);
                return Err(ModelError::new(
                    "lora.targets",
                    format!(
                        "'{target}' matches no projection of {} (it has {})",
                        family.name(),
                        names.join(", ")
                    ),
                ));
            }
        }
        let chosen: Vec<Projection> = all
            .into_iter()
            .filter(|p| self.targets.iter().any(|t| p.matches(t)))
            .collect();
        if let Some(p) = chosen
            .iter()
            .find(|p| self.rank as usize > p.inputs.min(p.outputs))
        {
            return Err(ModelError::new(
                "lora.rank",
                format!(
                    "{} is above the {}×{} projection {}",
                    self.rank, p.outputs, p.inputs, p.path
                ),
            ));
        }
        Ok(chosen)
    }

    /// The factors that train, in wire order.
    pub fn tensors(&self, modules: &[Projection]) -> Vec<TensorSpec> {
        let r = self.rank as usize;
        let mut out = Vec::new();
        for m in modules {
            if self.variant == LoraVariant::Plain {
                out.push(TensorSpec::new(
                    format!("{}.lora_A.weight", m.path),
                    &[r, m.inputs],
                ));
            }
            out.push(TensorSpec::new(
                format!("{}.lora_B.weight", m.path),
                &[m.outputs, r],
            ));
        }
        out
    }

    /// A of module `index`, as peft draws it (Kaiming-uniform, bound
    /// 1/√in), from this spec's seed: every device draws the same.
    pub fn a_factor(&self, index: usize, module: &Projection) -> Vec<f32> {
        let mut rng = ChaCha8Rng::seed_from_u64(self.seed);
        rng.set_stream(index as u64);
        let bound = 1.0 / (module.inputs as f32).sqrt();
        (0..self.rank as usize * module.inputs)
            .map(|_| rng.random_range(-bound..bound))
            .collect()
    }

    /// The trainable vector of fresh adapters: B = 0 (the model starts as
    /// its base), and under plain LoRA the seeded A before it.
    pub fn initial(&self, modules: &[Projection]) -> Vec<f32> {
        let r = self.rank as usize;
        let mut out = Vec::new();
        for (i, m) in modules.iter().enumerate() {
            if self.variant == LoraVariant::Plain {
                out.extend(self.a_factor(i, m));
            }
            out.extend(std::iter::repeat_n(0.0, m.outputs * r));
        }
        out
    }
}

impl fmt::Display for LoraSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "LoRA r={} alpha={} on {} ({})",
            self.rank,
            self.alpha,
            self.targets.join(", "),
            match self.variant {
                LoraVariant::FrozenA => "FFA-LoRA: A frozen, B trains",
                LoraVariant::Plain => "A and B train",
            }
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Gpt2Config;

    fn spec(targets: &[&str]) -> LoraSpec {
        LoraSpec {
            rank: 2,
            alpha: 4.0,
            targets: targets.iter().map(|t| t.to_string()).collect(),
            variant: LoraVariant::FrozenA,
            seed: 9,
        }
    }

    #[test]
    fn targets_match_paths_by_dotted_suffix() {
        let family = Gpt2Config::bytes();
        let both = spec(&["c_proj"]).modules(&family).unwrap();
        assert_eq!(both.len(), 8);
        let attn = spec(&["attn.c_proj"]).modules(&family).unwrap();
        assert_eq!(attn.len(), 4);
        assert!(attn.iter().all(|p| p.path.ends_with("attn.c_proj")));
        let one = spec(&["h.2.mlp.c_fc"]).modules(&family).unwrap();
        assert_eq!(one, vec![Projection::new("h.2.mlp.c_fc".into(), 256, 1024)]);
        // "proj" is not a dotted suffix of "c_proj".
        assert!(spec(&["proj"]).modules(&family).is_err());
    }

    #[test]
    fn a_is_the_same_for_every_device_and_differs_per_module() {
        let family = Gpt2Config::bytes();
        let s = spec(&["c_attn"]);
        let modules = s.modules(&family).unwrap();
        let a0 = s.a_factor(0, &modules[0]);
        assert_eq!(a0, s.a_factor(0, &modules[0]));
        assert_ne!(a0, s.a_factor(1, &modules[1]));
        assert!(a0.iter().all(|v| v.abs() <= 1.0 / 16.0));
        assert_eq!(s.scale(), 2.0);
    }

    #[test]
    fn ranks_and_alphas_are_checked() {
        let mut s = spec(&["c_attn"]);
        s.rank = 0;
        assert_eq!(s.validate().unwrap_err().field, "lora.rank");
        s.rank = 300;
        assert_eq!(
            s.modules(&Gpt2Config::bytes()).unwrap_err().field,
            "lora.rank"
        );
        let mut s = spec(&["c_attn"]);
        s.alpha = f32::NAN;
        assert_eq!(s.validate().unwrap_err().field, "lora.alpha");
    }
}
