//! GPT-2 (Radford et al. 2019): learned positions, pre-LayerNorm blocks,
//! fused q/k/v, tanh-GELU, the LM head tied to the token embedding.
//!
//! Tensor names and shapes are Hugging Face's: Conv1D weights are stored
//! (in, out).

use serde::{Deserialize, Serialize};

use super::{
    ModelError, Projection, TensorSpec, WeightLayout,
    language::{Family, Init, MAX_DIM, MAX_LAYERS, dimension, positive},
};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Gpt2Config {
    pub vocab_size: usize,
    pub n_positions: usize,
    pub n_embd: usize,
    pub n_layer: usize,
    pub n_head: usize,
    /// Width of the MLP's hidden layer (Hugging Face's `n_inner`, 4 × n_embd
    /// when unset).
    pub n_inner: usize,
    pub layer_norm_epsilon: f64,
}

impl Gpt2Config {
    /// The built-in model trained from scratch on raw bytes: 4 layers of
    /// width 256 with 4 heads over 128 positions, about 3.3 M parameters.
    pub fn bytes() -> Self {
        Self {
            vocab_size: 256,
            n_positions: 128,
            n_embd: 256,
            n_layer: 4,
            n_head: 4,
            n_inner: 1024,
            layer_norm_epsilon: 1e-5,
        }
    }

    /// GPT-2 124M's shape (Hugging Face `gpt2`).
    pub fn gpt2_124m() -> Self {
        Self {
            vocab_size: 50_257,
            n_positions: 1024,
            n_embd: 768,
            n_layer: 12,
            n_head: 12,
            n_inner: 3072,
            layer_norm_epsilon: 1e-5,
        }
    }

    pub fn head_dim(&self) -> usize {
        self.n_embd / self.n_head.max(1)
    }
}

impl Family for Gpt2Config {
    fn name(&self) -> &'static str {
        "gpt2"
    }

    fn validate(&self) -> Result<(), ModelError> {
        dimension("vocab_size", self.vocab_size, MAX_DIM)?;
        dimension("n_positions", self.n_positions, MAX_DIM)?;
        dimension("n_embd", self.n_embd, MAX_DIM)?;
        dimension("n_layer", self.n_layer, MAX_LAYERS)?;
        dimension("n_head", self.n_head, self.n_embd)?;
        dimension("n_inner", self.n_inner, MAX_DIM)?;
        if !self.n_embd.is_multiple_of(self.n_head) {
            return Err(ModelError::new(
                "n_head",
                format!("{} heads do not divide n_embd {}", self.n_head, self.n_embd),
            ));
        }
        positive("layer_norm_epsilon", self.layer_norm_epsilon)
    }

    fn vocab_size(&self) -> usize {
        self.vocab_size
    }

    fn max_positions(&self) -> usize {
        self.n_positions
    }

    fn layers(&self) -> usize {
        self.n_layer
    }

    fn width(&self) -> usize {
        self.n_embd
    }

    fn tensors(&self) -> Vec<TensorSpec> {
        let (c, inner) = (self.n_embd, self.n_inner);
        let mut out = vec![
            TensorSpec::new("wte.weight", &[self.vocab_size, c]),
            TensorSpec::new("wpe.weight", &[self.n_positions, c]),
        ];
        for i in 0..self.n_layer {
            let p = |rest: &str| format!("h.{i}.{rest}");
            out.extend([
                TensorSpec::new(p("ln_1.weight"), &[c]),
                TensorSpec::new(p("ln_1.bias"), &[c]),
                TensorSpec::new(p("attn.c_attn.weight"), &[c, 3 * c]),
                TensorSpec::new(p("attn.c_attn.bias"), &[3 * c]),
                TensorSpec::new(p("attn.c_proj.weight"), &[c, c]),
                TensorSpec::new(p("attn.c_proj.bias"), &[c]),
                TensorSpec::new(p("ln_2.weight"), &[c]),
                TensorSpec::new(p("ln_2.bias"), &[c]),
                TensorSpec::new(p("mlp.c_fc.weight"), &[c, inner]),
                TensorSpec::new(p("mlp.c_fc.bias"), &[inner]),
                TensorSpec::new(p("mlp.c_proj.weight"), &[inner, c]),
                TensorSpec::new(p("mlp.c_proj.bias"), &[c]),
            ]);
        }
        out.extend([
            TensorSpec::new("ln_f.weight", &[c]),
            TensorSpec::new("ln_f.bias", &[c]),
        ]);
        out
    }

    fn projections(&self) -> Vec<Projection> {
        let (c, inner) = (self.n_embd, self.n_inner);
        (0..self.n_layer)
            .flat_map(|i| {
                [
                    ("attn.c_attn", c, 3 * c),
                    ("attn.c_proj", c, c),
                    ("mlp.c_fc", c, inner),
                    ("mlp.c_proj", inner, c),
                ]
                .map(|(name, inputs, outputs)| {
                    Projection::new(format!("h.{i}.{name}"), inputs, outputs)
                })
            })
            .collect()
    }

    fn default_lora_targets(&self) -> &'static [&'static str] {
        &["c_attn", "attn.c_proj"]
    }

    fn weight_layout(&self) -> WeightLayout {
        WeightLayout::InOut
    }

    fn init(&self, t: &TensorSpec) -> Init {
        let name = t.name.as_str();
        if name.ends_with(".bias") {
            Init::Zeros
        } else if name.starts_with("ln_") || name.contains(".ln_") {
            Init::Ones
        } else if name.ends_with("c_proj.weight") {
            // GPT-2 scales the residual projections by 1/sqrt(2 · layers).
            Init::Normal {
                std: 0.02 / (2.0 * self.n_layer as f32).sqrt(),
            }
        } else {
            Init::Normal { std: 0.02 }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gpt2_124m_has_its_published_parameter_count() {
        let n: usize = Gpt2Config::gpt2_124m()
            .tensors()
            .iter()
            .map(TensorSpec::len)
            .sum();
        assert_eq!(n, 124_439_808);
    }

    #[test]
    fn initialisation_follows_the_tensor_role() {
        let c = Gpt2Config::bytes();
        let t = |name: &str| TensorSpec::new(name, &[1]);
        assert_eq!(c.init(&t("h.0.ln_1.weight")), Init::Ones);
        assert_eq!(c.init(&t("ln_f.bias")), Init::Zeros);
        assert_eq!(c.init(&t("h.1.attn.c_attn.bias")), Init::Zeros);
        assert_eq!(c.init(&t("wte.weight")), Init::Normal { std: 0.02 });
        let Init::Normal { std } = c.init(&t("h.3.mlp.c_proj.weight")) else {
            panic!("c_proj is drawn from a normal");
        };
        assert!((std - 0.02 / 8f32.sqrt()).abs() < 1e-9);
    }
}
