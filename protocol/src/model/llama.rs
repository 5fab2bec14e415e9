//! The LLaMA family, the shape of today's small on-device models
//! (SmolLM2, TinyLlama, Llama 3.2, Qwen2): RMSNorm, rotary position
//! embeddings, a SwiGLU MLP and grouped-query attention.
//!
//! Tensor names and shapes are Hugging Face's; linear weights are stored
//! (out, in).

use serde::{Deserialize, Serialize};

use super::{
    ModelError, Projection, TensorSpec, WeightLayout,
    language::{Family, Init, MAX_DIM, MAX_LAYERS, dimension, positive},
};

/// Which attention projections carry a bias.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum AttentionBias {
    None,
    /// q, k and v, not o (Qwen2).
    Qkv,
    /// q, k, v and o (LLaMA's `attention_bias = true`).
    All,
}

/// Llama 3's frequency-dependent stretch of the rotary wavelengths.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Llama3Scaling {
    pub factor: f64,
    pub low_freq_factor: f64,
    pub high_freq_factor: f64,
    pub original_max_position_embeddings: usize,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LlamaConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub max_position_embeddings: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub rope_scaling: Option<Llama3Scaling>,
    pub tie_word_embeddings: bool,
    pub attention_bias: AttentionBias,
}

impl LlamaConfig {
    /// Inverse frequencies of the rotary embedding, one per pair of a
    /// head's dimensions, with Llama 3's scaling when configured.
    pub fn inverse_frequencies(&self) -> Vec<f64> {
        let d = self.head_dim;
        (0..d / 2)
            .map(|i| {
                let f = 1.0 / self.rope_theta.powf((2 * i) as f64 / d as f64);
                match self.rope_scaling {
                    None => f,
                    Some(s) => {
                        let wavelength = 2.0 * std::f64::consts::PI / f;
                        let original = s.original_max_position_embeddings as f64;
                        let low = original / s.low_freq_factor;
                        let high = original / s.high_freq_factor;
                        if wavelength < high {
                            f
                        } else if wavelength > low {
                            f / s.factor
                        } else {
                            let smooth = (original / wavelength - s.low_freq_factor)
                                / (s.high_freq_factor - s.low_freq_factor);
                            (1.0 - smooth) * f / s.factor + smooth * f
                        }
                    }
                }
            })
            .collect()
    }

    fn q_width(&self) -> usize {
        self.num_attention_heads * self.head_dim
    }

    fn kv_width(&self) -> usize {
        self.num_key_value_heads * self.head_dim
    }
}

impl Family for LlamaConfig {
    fn name(&self) -> &'static str {
        "llama"
    }

    fn validate(&self) -> Result<(), ModelError> {
        dimension("vocab_size", self.vocab_size, MAX_DIM)?;
        dimension("hidden_size", self.hidden_size, MAX_DIM)?;
        dimension("intermediate_size", self.intermediate_size, MAX_DIM)?;
        dimension("num_hidden_layers", self.num_hidden_layers, MAX_LAYERS)?;
        dimension("num_attention_heads", self.num_attention_heads, MAX_DIM)?;
        dimension(
            "num_key_value_heads",
            self.num_key_value_heads,
            self.num_attention_heads,
        )?;
        dimension("head_dim", self.head_dim, MAX_DIM)?;
        dimension(
            "max_position_embeddings",
            self.max_position_embeddings,
            MAX_DIM,
        )?;
        if !self
            .num_attention_heads
            .is_multiple_of(self.num_key_value_heads)
        {
            return Err(ModelError::new(
                "num_key_value_heads",
                format!(
                    "{} key/value heads do not divide {} attention heads",
                    self.num_key_value_heads, self.num_attention_heads
                ),
            ));
        }
        if !self.head_dim.is_multiple_of(2) {
            return Err(ModelError::new(
                "head_dim",
                format!(
                    "{}: rotary embeddings need an even head size",
                    self.head_dim
                ),
            ));
        }
        if self.q_width() > MAX_DIM {
            return Err(ModelError::new(
                "num_attention_heads",
                "heads × head_dim is too large",
            ));
        }
        positive("rms_norm_eps", self.rms_norm_eps)?;
        positive("rope_theta", self.rope_theta)?;
        if let Some(s) = self.rope_scaling {
            positive("rope_scaling.factor", s.factor)?;
            positive("rope_scaling.low_freq_factor", s.low_freq_factor)?;
            positive("rope_scaling.high_freq_factor", s.high_freq_factor)?;
            dimension(
                "rope_scaling.original_max_position_embeddings",
                s.original_max_position_embeddings,
                MAX_DIM,
            )?;
            if s.high_freq_factor <= s.low_freq_factor {
                return Err(ModelError::new(
                    "rope_scaling.high_freq_factor",
                    "must be above low_freq_factor",
                ));
            }
        }
        Ok(())
    }

    fn vocab_size(&self) -> usize {
        self.vocab_size
    }

    fn max_positions(&self) -> usize {
        self.max_position_embeddings
    }

    fn layers(&self) -> usize {
        self.num_hidden_layers
    }

    fn width(&self) -> usize {
        self.hidden_size
    }

    fn tensors(&self) -> Vec<TensorSpec> {
        let (c, inner) = (self.hidden_size, self.intermediate_size);
        let (q, kv) = (self.q_width(), self.kv_width());
        let mut out = vec![TensorSpec::new(
            "model.embed_tokens.weight",
            &[self.vocab_size, c],
        )];
        let qkv_bias = self.attention_bias != AttentionBias::None;
        for i in 0..self.num_hidden_layers {
            let p = |rest: &str| format!("model.layers.{i}.{rest}");
            out.push(TensorSpec::new(p("input_layernorm.weight"), &[c]));
            for (name, rows) in [("q_proj", q), ("k_proj", kv), ("v_proj", kv)] {
                out.push(TensorSpec::new(
                    p(&format!("self_attn.{name}.weight")),
                    &[rows, c],
                ));
                if qkv_bias {
                    out.push(TensorSpec::new(
                        p(&format!("self_attn.{name}.bias")),
                        &[rows],
                    ));
                }
            }
            out.push(TensorSpec::new(p("self_attn.o_proj.weight"), &[c, q]));
            if self.attention_bias == AttentionBias::All {
                out.push(TensorSpec::new(p("self_attn.o_proj.bias"), &[c]));
            }
            out.extend([
                TensorSpec::new(p("post_attention_layernorm.weight"), &[c]),
                TensorSpec::new(p("mlp.gate_proj.weight"), &[inner, c]),
                TensorSpec::new(p("mlp.up_proj.weight"), &[inner, c]),
                TensorSpec::new(p("mlp.down_proj.weight"), &[c, inner]),
            ]);
        }
        out.push(TensorSpec::new("model.norm.weight", &[c]));
        if !self.tie_word_embeddings {
            out.push(TensorSpec::new("lm_head.weight", &[self.vocab_size, c]));
        }
        out
    }

    fn projections(&self) -> Vec<Projection> {
        let (c, inner) = (self.hidden_size, self.intermediate_size);
        let (q, kv) = (self.q_width(), self.kv_width());
        (0..self.num_hidden_layers)
            .flat_map(|i| {
                [
                    ("self_attn.q_proj", c, q),
                    ("self_attn.k_proj", c, kv),
                    ("self_attn.v_proj", c, kv),
                    ("self_attn.o_proj", q, c),
                    ("mlp.gate_proj", c, inner),
                    ("mlp.up_proj", c, inner),
                    ("mlp.down_proj", inner, c),
                ]
                .map(|(name, inputs, outputs)| {
                    Projection::new(format!("model.layers.{i}.{name}"), inputs, outputs)
                })
            })
            .collect()
    }

    fn default_lora_targets(&self) -> &'static [&'static str] {
        &["q_proj", "k_proj", "v_proj", "o_proj"]
    }

    fn weight_layout(&self) -> WeightLayout {
        WeightLayout::OutIn
    }

    fn init(&self, t: &TensorSpec) -> Init {
        if t.name.ends_with("norm.weight") {
            Init::Ones
        } else if t.name.ends_with(".bias") {
            Init::Zeros
        } else {
            Init::Normal { std: 0.02 }
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn tiny(kv_heads: usize, bias: AttentionBias, tied: bool) -> LlamaConfig {
        LlamaConfig {
            vocab_size: 300,
            hidden_size: 64,
            intermediate_size: 96,
            num_hidden_layers: 2,
            num_attention_heads: 4,
            num_key_value_heads: kv_heads,
            head_dim: 16,
            max_position_embeddings: 64,
            rms_norm_eps: 1e-6,
            rope_theta: 10_000.0,
            rope_scaling: None,
            tie_word_embeddings: tied,
            attention_bias: bias,
        }
    }

    #[test]
    fn grouped_query_attention_shrinks_k_and_v() {
        let c = tiny(2, AttentionBias::Qkv, false);
        c.validate().unwrap();
        let t = c.tensors();
        let shape = |name: &str| t.iter().find(|t| t.name == name).map(|t| t.shape.clone());
        assert_eq!(
            shape("model.layers.0.self_attn.q_proj.weight"),
            Some(vec![64, 64])
        );
        assert_eq!(
            shape("model.layers.0.self_attn.k_proj.weight"),
            Some(vec![32, 64])
        );
        assert_eq!(
            shape("model.layers.1.self_attn.v_proj.bias"),
            Some(vec![32])
        );
        assert_eq!(shape("model.layers.1.self_attn.o_proj.bias"), None);
        assert_eq!(shape("lm_head.weight"), Some(vec![300, 64]));
        let tied = tiny(2, AttentionBias::None, true);
        assert!(tied.tensors().iter().all(|t| t.name != "lm_head.weight"));
    }

    #[test]
    fn bad_head_counts_are_named() {
        assert_eq!(
            tiny(3, AttentionBias::None, true)
                .validate()
                .unwrap_err()
                .field,
            "num_key_value_heads"
        );
        let mut c = tiny(2, AttentionBias::None, true);
        c.head_dim = 15;
        assert_eq!(c.validate().unwrap_err().field, "head_dim");
    }

    #[test]
    fn llama3_scaling_stretches_only_long_wavelengths() {
        let mut c = tiny(4, AttentionBias::None, true);
        c.head_dim = 64;
        c.rope_theta = 500_000.0;
        let plain = c.inverse_frequencies();
        c.rope_scaling = Some(Llama3Scaling {
            factor: 32.0,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_max_position_embeddings: 8192,
        });
        let scaled = c.inverse_frequencies();
        assert_eq!(plain[0], scaled[0]);
        let last = plain.len() - 1;
        assert!((plain[last] / scaled[last] - 32.0).abs() < 1e-9);
    }
}
