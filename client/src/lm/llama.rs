//! The LLaMA family's forward pass over [`Weights`] named as Hugging Face
//! names them.

use std::sync::Arc;

use candle_core::Tensor;
use covey_protocol::model::LlamaConfig;

use super::{
    LmError,
    ops::{Rotary, causal_attention, rms_norm, rope, swiglu},
    weights::{Orientation::OutIn, Weights},
};

/// Logits [B·T, V] for token ids [B, T].
pub fn forward(
    c: &LlamaConfig,
    w: &Weights,
    rotary: &Arc<Rotary>,
    ids: &Tensor,
) -> Result<Tensor, LmError> {
    let (_, t) = ids.dims2()?;
    let (heads, kv_heads) = (c.num_attention_heads, c.num_key_value_heads);
    let eps = c.rms_norm_eps;
    let mut x = w.embed("model.embed_tokens.weight", ids)?;
    let norm = |x: &Tensor, name: &str| -> Result<Tensor, LmError> {
        Ok(rms_norm(x, &w.get(&format!("{name}.weight"))?, eps)?)
    };
    for i in 0..c.num_hidden_layers {
        let p = format!("model.layers.{i}");
        let h = norm(&x, &format!("{p}.input_layernorm"))?;
        let project = |name: &str| w.linear(&h, &format!("{p}.self_attn.{name}"), OutIn);
        let q = rope(&project("q_proj")?, rotary, heads, t)?;
        let k = rope(&project("k_proj")?, rotary, kv_heads, t)?;
        let v = project("v_proj")?;
        let attended = causal_attention(&q, &k, &v, heads, kv_heads, t)?;
        x = (x + w.linear(&attended, &format!("{p}.self_attn.o_proj"), OutIn)?)?;
        let h = norm(&x, &format!("{p}.post_attention_layernorm"))?;
        let gate = w.linear(&h, &format!("{p}.mlp.gate_proj"), OutIn)?;
        let up = w.linear(&h, &format!("{p}.mlp.up_proj"), OutIn)?;
        x = (x + w.linear(&swiglu(&gate, &up)?, &format!("{p}.mlp.down_proj"), OutIn)?)?;
    }
    let h = norm(&x, "model.norm")?;
    let head = if c.tie_word_embeddings {
        "model.embed_tokens.weight"
    } else {
        "lm_head.weight"
    };
    w.head_named(&h, head)
}
