//! Text generation: what a fine-tuned model writes after a prompt, greedy
//! or sampled with a temperature among the top-k tokens.

use candle_core::{D, Device, Tensor};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::{LanguageModel, LmError, tokenizer::TextTokenizer};

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Sampling {
    pub max_tokens: usize,
    /// 0 picks the most likely token every time (greedy).
    pub temperature: f32,
    /// Sample among the k most likely tokens; 0 means all of them.
    pub top_k: usize,
    pub seed: u64,
}

impl Default for Sampling {
    fn default() -> Self {
        Self {
            max_tokens: 64,
            temperature: 0.0,
            top_k: 0,
            seed: 0,
        }
    }
}

/// The next token after `ids` under `s`.
fn next_token(
    model: &LanguageModel,
    ids: &[u32],
    s: &Sampling,
    rng: &mut ChaCha8Rng,
    device: &Device,
) -> Result<u32, LmError> {
    let context = model.spec().context as usize;
    let window = &ids[ids.len().saturating_sub(context)..];
    let input = Tensor::from_slice(window, (1, window.len()), device)?;
    let logits = model.forward(&input)?;
    let last = logits.get(window.len() - 1)?;
    if s.temperature <= 0.0 {
        return Ok(last.argmax(D::Minus1)?.to_scalar::<u32>()?);
    }
    let mut scored: Vec<(u32, f32)> = last
        .to_vec1::<f32>()?
        .into_iter()
        .enumerate()
        .map(|(i, l)| (i as u32, l / s.temperature))
        .collect();
    scored.sort_by(|a, b| b.1.total_cmp(&a.1));
    if s.top_k > 0 {
        scored.truncate(s.top_k);
    }
    let max = scored.first().map_or(0.0, |x| x.1);
    let weights: Vec<f32> = scored.iter().map(|(_, l)| (l - max).exp()).collect();
    let total: f32 = weights.iter().sum();
    let mut pick = rng.random_range(0.0..total.max(f32::MIN_POSITIVE));
    for ((id, _), w) in scored.iter().zip(&weights) {
        if pick < *w {
            return Ok(*id);
        }
        pick -= w;
    }
    Ok(scored.last().map_or(0, |x| x.0))
}

/// `prompt` continued by up to `s.max_tokens` tokens (fewer if the model
/// writes the tokenizer's end-of-text token). Returns the continuation.
pub fn generate(
    model: &LanguageModel,
    tokenizer: &TextTokenizer,
    prompt: &str,
    s: &Sampling,
    device: &Device,
) -> Result<String, LmError> {
    let mut ids = tokenizer.encode(prompt)?;
    if ids.is_empty() {
        ids = tokenizer.separator().unwrap_or_default();
    }
    model.check_ids(&ids)?;
    let stop = tokenizer.separator().ok().filter(|s| s.len() == 1);
    let start = ids.len();
    let mut rng = ChaCha8Rng::seed_from_u64(s.seed);
    for _ in 0..s.max_tokens {
        let next = next_token(model, &ids, s, &mut rng, device)?;
        if stop.as_deref() == Some(&[next]) {
            break;
        }
        ids.push(next);
    }
    Ok(tokenizer.decode(&ids[start..]))
}
