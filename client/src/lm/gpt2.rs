//! GPT-2's forward pass over [`Weights`] named as Hugging Face names them.

use candle_core::Tensor;
use covey_protocol::model::Gpt2Config;

use super::{
    LmError,
    ops::{causal_attention_packed, layer_norm},
    weights::{Orientation::InOut, Weights},
};

/// Logits [B·T, V] for token ids [B, T].
pub fn forward(c: &Gpt2Config, w: &Weights, ids: &Tensor) -> Result<Tensor, LmError> {
    let (b, t) = ids.dims2()?;
    let width = c.n_embd;
    let eps = c.layer_norm_epsilon;
    let tokens = w.embed("wte.weight", ids)?;
    let positions = w.get("wpe.weight")?.narrow(0, 0, t)?;
    let mut x = tokens
        .reshape((b, t, width))?
        .broadcast_add(&positions)?
        .reshape((b * t, width))?;
    let norm = |x: &Tensor, name: &str| -> Result<Tensor, LmError> {
        Ok(layer_norm(
            x,
            &w.get(&format!("{name}.weight"))?,
            &w.get(&format!("{name}.bias"))?,
            eps,
        )?)
    };
    for i in 0..c.n_layer {
        // On the CPU the whole block is one node (see `block`).
        if let Some(y) = w.block(i, &x, t) {
            x = y?;
            continue;
        }
        let h = norm(&x, &format!("h.{i}.ln_1"))?;
        let qkv = w.linear(&h, &format!("h.{i}.attn.c_attn"), InOut)?;
        let attended = causal_attention_packed(&qkv, c.n_head, t)?;
        x = (x + w.linear(&attended, &format!("h.{i}.attn.c_proj"), InOut)?)?;
        let h = norm(&x, &format!("h.{i}.ln_2"))?;
        let inner = w.linear_gelu(&h, &format!("h.{i}.mlp.c_fc"), InOut)?;
        x = (x + w.linear(&inner, &format!("h.{i}.mlp.c_proj"), InOut)?)?;
    }
    let h = norm(&x, "ln_f")?;
    // The LM head is the token embedding.
    w.head_named(&h, "wte.weight")
}
