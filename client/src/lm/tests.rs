//! The language models end to end: gradients reach every trainable tensor
//! and agree with finite differences, and logits, loss and gradients match
//! Hugging Face transformers (and peft for LoRA) on the checkpoints
//! `client/reference/hf_lm.py` wrote.

use std::{path::PathBuf, sync::Arc};

use candle_core::{DType, Device, Tensor};
use covey_protocol::model::{
    BaseWeights, Gpt2Config, LanguageSpec, LlamaConfig, LmArch, LoraSpec, LoraVariant,
    TokenizerSpec, Tuning, llama::AttentionBias,
};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::{
    BaseTensors, LanguageModel,
    checkpoint::{self, CheckpointError},
    ops::{IGNORE, cross_entropy},
    tokenizer::TextTokenizer,
};

fn tiny_gpt2() -> LmArch {
    LmArch::Gpt2(Gpt2Config {
        vocab_size: 260,
        n_positions: 16,
        n_embd: 16,
        n_layer: 2,
        n_head: 2,
        n_inner: 32,
        layer_norm_epsilon: 1e-5,
    })
}

fn tiny_llama() -> LmArch {
    LmArch::Llama(LlamaConfig {
        vocab_size: 260,
        hidden_size: 16,
        intermediate_size: 24,
        num_hidden_layers: 2,
        num_attention_heads: 4,
        num_key_value_heads: 2,
        head_dim: 4,
        max_position_embeddings: 16,
        rms_norm_eps: 1e-6,
        rope_theta: 10_000.0,
        rope_scaling: None,
        tie_word_embeddings: false,
        attention_bias: AttentionBias::Qkv,
    })
}

fn spec(arch: LmArch, tuning: Tuning) -> LanguageSpec {
    LanguageSpec {
        arch,
        tokenizer: TokenizerSpec::Bytes,
        context: 8,
        tuning,
    }
}

fn lora(variant: LoraVariant, targets: &[&str]) -> Tuning {
    Tuning::Lora {
        lora: LoraSpec {
            rank: 2,
            alpha: 4.0,
            targets: targets.iter().map(|t| t.to_string()).collect(),
            variant,
            seed: 3,
        },
        base: BaseWeights::Seeded(5),
    }
}

fn jitter(values: &mut [f32], seed: u64, scale: f32) {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    for v in values {
        *v += rng.random_range(-scale..scale);
    }
}

/// A model with random (not initial) trainable values, its base, and a
/// batch of ids with next-token targets.
fn setup(s: &LanguageSpec) -> (Vec<f32>, Option<Arc<BaseTensors>>, Tensor, Tensor) {
    let mut trainable = s.initial_trainable(1);
    jitter(&mut trainable, 2, 0.3);
    let base = match s.tuning {
        Tuning::Full => None,
        Tuning::Lora { .. } => {
            let mut flat = s.initial_base(5);
            jitter(&mut flat, 4, 0.1);
            Some(Arc::new(
                BaseTensors::from_flat(s, flat, &Device::Cpu, DType::F32).unwrap(),
            ))
        }
    };
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    let ids: Vec<u32> = (0..16).map(|_| rng.random_range(0..40)).collect();
    let mut targets: Vec<u32> = ids[1..].to_vec();
    targets.push(IGNORE);
    targets[7] = IGNORE;
    let ids = Tensor::from_vec(ids, (2, 8), &Device::Cpu).unwrap();
    let targets = Tensor::from_vec(targets, 16, &Device::Cpu).unwrap();
    (trainable, base, ids, targets)
}

fn loss(
    s: &LanguageSpec,
    trainable: &[f32],
    base: &Option<Arc<BaseTensors>>,
    ids: &Tensor,
    targets: &Tensor,
) -> (LanguageModel, Tensor) {
    let model = LanguageModel::new(s, trainable, base.clone(), &Device::Cpu).unwrap();
    let logits = model.forward(ids).unwrap();
    let loss = cross_entropy(&logits, targets).unwrap();
    (model, loss)
}

fn every_tuning() -> Vec<(String, LanguageSpec)> {
    let mut out = Vec::new();
    for (family, arch, all) in [
        ("gpt2", tiny_gpt2(), vec!["c_attn", "c_proj", "c_fc"]),
        (
            "llama",
            tiny_llama(),
            vec![
                "q_proj",
                "k_proj",
                "v_proj",
                "o_proj",
                "gate_proj",
                "up_proj",
                "down_proj",
            ],
        ),
    ] {
        out.push((format!("{family} full"), spec(arch.clone(), Tuning::Full)));
        out.push((
            format!("{family} ffa-lora"),
            spec(arch.clone(), lora(LoraVariant::FrozenA, &all)),
        ));
        out.push((
            format!("{family} lora"),
            spec(arch, lora(LoraVariant::Plain, &all)),
        ));
    }
    out
}

#[test]
fn every_trainable_tensor_gets_a_gradient() {
    for (name, s) in every_tuning() {
        let (trainable, base, ids, targets) = setup(&s);
        let (model, loss) = loss(&s, &trainable, &base, &ids, &targets);
        let grads = loss.backward().unwrap();
        for var in model.weights().vars() {
            assert!(
                grads.get(var).is_some(),
                "{name}: a variable gets no gradient"
            );
        }
        let flat = model.weights().gradient(&grads).unwrap();
        let mut at = 0;
        for t in s.trainable_tensors() {
            let g = &flat[at..at + t.len()];
            at += t.len();
            assert!(
                g.iter().any(|&v| v != 0.0),
                "{name}: {}'s gradient is all zero",
                t.name
            );
        }
        assert_eq!(at, flat.len());
    }
}

#[test]
fn gradients_agree_with_finite_differences() {
    for (name, s) in every_tuning() {
        let (trainable, base, ids, targets) = setup(&s);
        let (model, l) = loss(&s, &trainable, &base, &ids, &targets);
        let grads = l.backward().unwrap();
        let flat = model.weights().gradient(&grads).unwrap();
        let mut rng = ChaCha8Rng::seed_from_u64(11);
        let mut at = 0;
        for t in s.trainable_tensors() {
            let g = &flat[at..at + t.len()];
            for _ in 0..3 {
                let i = rng.random_range(0..t.len());
                let h = 5e-3f32;
                let mut plus = trainable.clone();
                plus[at + i] += h;
                let mut minus = trainable.clone();
                minus[at + i] -= h;
                let f = |w: &[f32]| {
                    loss(&s, w, &base, &ids, &targets)
                        .1
                        .to_scalar::<f32>()
                        .unwrap()
                };
                let fd = (f(&plus) - f(&minus)) / (2.0 * h);
                assert!(
                    (fd - g[i]).abs() <= 2e-3 + 2e-2 * g[i].abs(),
                    "{name}: {}[{i}]: autograd {} against finite differences {fd}",
                    t.name,
                    g[i]
                );
            }
            at += t.len();
        }
    }
}

// --- Parity with Hugging Face transformers -------------------------------

fn reference_dir(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data/lm")
        .join(name)
}

#[derive(serde::Deserialize)]
struct Reference {
    ids: Vec<Vec<u32>>,
    logits: Vec<Vec<Vec<f32>>>,
    loss: f32,
    lora_logits: Vec<Vec<Vec<f32>>>,
}

fn reference(name: &str) -> Reference {
    let text = std::fs::read_to_string(reference_dir(name).join("reference.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn largest_gap(ours: &Tensor, theirs: &[Vec<Vec<f32>>]) -> f32 {
    let flat: Vec<f32> = theirs.iter().flatten().flatten().copied().collect();
    let ours = ours.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    assert_eq!(ours.len(), flat.len());
    ours.iter()
        .zip(&flat)
        .fold(0f32, |m, (a, b)| m.max((a - b).abs()))
}

fn hf_spec(arch: LmArch, tuning: Tuning) -> LanguageSpec {
    LanguageSpec {
        arch,
        tokenizer: TokenizerSpec::Bytes,
        context: 12,
        tuning,
    }
}

#[test]
fn logits_loss_and_gradients_match_transformers() {
    for name in ["gpt2", "llama", "qwen2"] {
        let dir = reference_dir(name);
        let r = reference(name);
        let (arch, flat) = checkpoint::read_checkpoint(&dir).unwrap();
        let s = hf_spec(arch, Tuning::Full);
        s.validate().unwrap();
        let model = LanguageModel::new(&s, &flat, None, &Device::Cpu).unwrap();
        let ids: Vec<u32> = r.ids.iter().flatten().copied().collect();
        let (b, t) = (r.ids.len(), r.ids[0].len());
        let logits = model
            .forward(&Tensor::from_vec(ids.clone(), (b, t), &Device::Cpu).unwrap())
            .unwrap();
        let gap = largest_gap(&logits, &r.logits);
        assert!(gap < 1e-4, "{name}: logits differ by {gap}");
        // transformers' loss: every position predicts the next, per sequence.
        let targets: Vec<u32> = r
            .ids
            .iter()
            .flat_map(|row| row[1..].iter().copied().chain([IGNORE]))
            .collect();
        let loss = cross_entropy(
            &logits,
            &Tensor::new(targets.as_slice(), &Device::Cpu).unwrap(),
        )
        .unwrap();
        let ours = loss.to_scalar::<f32>().unwrap();
        assert!(
            (ours - r.loss).abs() < 1e-5,
            "{name}: loss {ours} against {}",
            r.loss
        );
        // Gradients against torch's, tensor by tensor.
        let grads = loss.backward().unwrap();
        let flat = model.weights().gradient(&grads).unwrap();
        let bytes = std::fs::read(dir.join("grads.safetensors")).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        let prefix = checkpoint::hf_prefix(&s.arch);
        let mut at = 0;
        for t in s.trainable_tensors() {
            let hf_name = if st.tensor(&format!("{prefix}{}", t.name)).is_ok() {
                format!("{prefix}{}", t.name)
            } else {
                t.name.clone()
            };
            let view = st
                .tensor(&hf_name)
                .unwrap_or_else(|_| panic!("{name}: no torch gradient for {hf_name}"));
            let theirs: Vec<f32> = view
                .data()
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect();
            let ours = &flat[at..at + t.len()];
            at += t.len();
            let scale = theirs.iter().fold(1e-3f32, |m, v| m.max(v.abs()));
            let gap = ours
                .iter()
                .zip(&theirs)
                .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
            assert!(
                gap <= 1e-4 * scale.max(1.0),
                "{name}: {} gradient differs by {gap} (scale {scale})",
                t.name
            );
        }
    }
}

#[test]
fn lora_logits_match_peft() {
    for (name, targets) in [
        ("gpt2", vec!["c_attn", "attn.c_proj"]),
        ("llama", vec!["q_proj", "k_proj", "v_proj", "o_proj"]),
        ("qwen2", vec!["q_proj", "v_proj"]),
    ] {
        let dir = reference_dir(name);
        let r = reference(name);
        let (arch, flat) = checkpoint::read_checkpoint(&dir).unwrap();
        let tuning = Tuning::Lora {
            lora: LoraSpec {
                rank: 4,
                alpha: 8.0,
                targets: targets.iter().map(|t| t.to_string()).collect(),
                variant: LoraVariant::Plain,
                seed: 0,
            },
            base: BaseWeights::Seeded(0),
        };
        let s = hf_spec(arch, tuning);
        let base = Arc::new(BaseTensors::from_flat(&s, flat, &Device::Cpu, DType::F32).unwrap());
        let adapter = checkpoint::read_adapter(&dir.join("adapter"), &s).unwrap();
        let model = LanguageModel::new(&s, &adapter, Some(base), &Device::Cpu).unwrap();
        let ids: Vec<u32> = r.ids.iter().flatten().copied().collect();
        let logits = model
            .forward(&Tensor::from_vec(ids, (r.ids.len(), r.ids[0].len()), &Device::Cpu).unwrap())
            .unwrap();
        let gap = largest_gap(&logits, &r.lora_logits);
        assert!(
            gap < 1e-4,
            "{name}: LoRA logits differ from peft's by {gap}"
        );
        // Written back as peft writes it, the adapter reads the same.
        let out = tempfile::tempdir().unwrap();
        checkpoint::write_adapter(out.path(), &s, &adapter).unwrap();
        assert_eq!(checkpoint::read_adapter(out.path(), &s).unwrap(), adapter);
    }
}

#[test]
fn a_bf16_base_halves_memory_and_barely_moves_the_logits() {
    for (name, targets) in [
        ("llama", ["q_proj", "v_proj"]),
        ("gpt2", ["c_attn", "c_fc"]),
    ] {
        let (arch, flat) = checkpoint::read_checkpoint(&reference_dir(name)).unwrap();
        let s = hf_spec(arch, lora(LoraVariant::FrozenA, &targets));
        let mut adapter = s.initial_trainable(0);
        jitter(&mut adapter, 1, 0.2);
        let ids = Tensor::new(&[[1u32, 5, 9, 200, 3, 7]], &Device::Cpu).unwrap();
        let targets = Tensor::new(&[5u32, 9, 200, 3, 7, IGNORE], &Device::Cpu).unwrap();
        let run = |dtype| {
            let base =
                Arc::new(BaseTensors::from_flat(&s, flat.clone(), &Device::Cpu, dtype).unwrap());
            let bytes = base.bytes();
            let model = LanguageModel::new(&s, &adapter, Some(base), &Device::Cpu).unwrap();
            let logits = model.forward(&ids).unwrap();
            let grads = cross_entropy(&logits, &targets)
                .unwrap()
                .backward()
                .unwrap();
            (bytes, logits, model.weights().gradient(&grads).unwrap())
        };
        let (full, a, ga) = run(DType::F32);
        let (half, b, gb) = run(DType::BF16);
        assert_eq!(half * 2, full);
        let gap = (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(
            gap > 0.0 && gap < 0.1,
            "{name}: bf16 moved the logits by {gap}"
        );
        // The adapters still learn the same direction.
        let dot: f32 = ga.iter().zip(&gb).map(|(x, y)| x * y).sum();
        let norms = ga.iter().map(|x| x * x).sum::<f32>().sqrt()
            * gb.iter().map(|x| x * x).sum::<f32>().sqrt();
        assert!(dot / norms > 0.99, "{name}: gradients diverge under bf16");
    }
}

#[test]
fn the_tokenizer_json_matches_the_tokenizers_library() {
    let dir = reference_dir("tokenizer");
    let tok = TextTokenizer::from_file(&dir.join("tokenizer.json")).unwrap();
    let text = std::fs::read_to_string(dir.join("encodings.json")).unwrap();
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(tok.vocab_size() as u64, v["vocab_size"].as_u64().unwrap());
    for sample in v["samples"].as_array().unwrap() {
        let text = sample["text"].as_str().unwrap();
        let ids: Vec<u32> = sample["ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|i| i.as_u64().unwrap() as u32)
            .collect();
        assert_eq!(tok.encode(text).unwrap(), ids, "{text}");
        assert_eq!(tok.decode(&ids), text);
    }
    // <|endoftext|> separates documents.
    assert_eq!(tok.separator().unwrap().len(), 1);
}

// --- Bad checkpoints ------------------------------------------------------

fn copy_checkpoint(name: &str) -> tempfile::TempDir {
    let out = tempfile::tempdir().unwrap();
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(reference_dir(name).join(f), out.path().join(f)).unwrap();
    }
    out
}

fn edit_config(dir: &std::path::Path, edit: impl FnOnce(&mut serde_json::Value)) {
    let path = dir.join("config.json");
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    edit(&mut v);
    std::fs::write(&path, v.to_string()).unwrap();
}

#[test]
fn bad_configs_are_refused_with_the_field_named() {
    type Edit = Box<dyn Fn(&mut serde_json::Value)>;
    let cases: Vec<(&str, Edit, &str)> = vec![
        (
            "gpt2",
            Box::new(|v| v["model_type"] = "bert".into()),
            "model_type 'bert'",
        ),
        (
            "gpt2",
            Box::new(|v| v["frobnicate"] = 3.into()),
            "frobnicate: unknown field",
        ),
        (
            "gpt2",
            Box::new(|v| v["activation_function"] = "relu".into()),
            "activation_function",
        ),
        ("gpt2", Box::new(|v| v["n_head"] = 5.into()), "n_head"),
        ("gpt2", Box::new(|v| v["n_embd"] = "wide".into()), "n_embd"),
        (
            "llama",
            Box::new(|v| v["hidden_act"] = "gelu".into()),
            "hidden_act",
        ),
        (
            "llama",
            Box::new(|v| v["rope_parameters"]["rope_type"] = "yarn".into()),
            "rope_parameters.rope_type",
        ),
        (
            "llama",
            Box::new(|v| v["mlp_bias"] = true.into()),
            "mlp_bias",
        ),
        (
            "qwen2",
            Box::new(|v| v["use_sliding_window"] = true.into()),
            "use_sliding_window",
        ),
    ];
    for (name, edit, wanted) in cases {
        let dir = copy_checkpoint(name);
        edit_config(dir.path(), edit);
        let err = checkpoint::read_checkpoint(dir.path())
            .unwrap_err()
            .to_string();
        assert!(
            err.contains(wanted),
            "{name}: expected {wanted:?} in: {err}"
        );
        assert!(err.contains("config.json"), "{err}");
    }
}

#[test]
fn missing_misshaped_and_foreign_tensors_are_named() {
    type Named = Vec<(String, Vec<usize>, Vec<f32>)>;
    let rewrite = |name: &str, change: &dyn Fn(&mut Named)| {
        let dir = copy_checkpoint(name);
        let path = dir.path().join("model.safetensors");
        let bytes = std::fs::read(&path).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        let mut tensors: Named = st
            .tensors()
            .into_iter()
            .map(|(n, v)| {
                let values = v
                    .data()
                    .chunks_exact(4)
                    .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                    .collect();
                (n, v.shape().to_vec(), values)
            })
            .collect();
        change(&mut tensors);
        let specs: Vec<_> = tensors
            .iter()
            .map(|(n, s, _)| covey_protocol::model::TensorSpec::new(n.clone(), s))
            .collect();
        let flat: Vec<f32> = tensors.iter().flat_map(|(_, _, v)| v.clone()).collect();
        checkpoint::write_safetensors(&path, &specs, &flat, "", Default::default()).unwrap();
        checkpoint::read_checkpoint(dir.path()).unwrap_err()
    };
    let err = rewrite("gpt2", &|t| {
        t.retain(|(n, _, _)| n != "transformer.h.1.ln_2.bias")
    });
    assert!(
        matches!(&err, CheckpointError::Missing { name, .. } if name == "h.1.ln_2.bias"),
        "{err}"
    );
    let err = rewrite("llama", &|t| {
        let w = t
            .iter_mut()
            .find(|(n, _, _)| n == "model.norm.weight")
            .unwrap();
        w.1 = vec![16, 2];
    });
    assert!(
        err.to_string()
            .contains("model.norm.weight has shape [16, 2]"),
        "{err}"
    );
    let err = rewrite("qwen2", &|t| {
        t.push(("vision.proj".into(), vec![2], vec![0.0, 1.0]))
    });
    assert!(
        err.to_string()
            .contains("vision.proj is not part of a llama model"),
        "{err}"
    );
    // Buffers transformers writes are no tensors of the model.
    let dir = copy_checkpoint("gpt2");
    assert!(checkpoint::read_checkpoint(dir.path()).is_ok());
}

#[test]
fn exported_checkpoints_read_back_the_same() {
    for name in ["gpt2", "llama", "qwen2"] {
        let (arch, flat) = checkpoint::read_checkpoint(&reference_dir(name)).unwrap();
        let out = tempfile::tempdir().unwrap();
        checkpoint::write_checkpoint(out.path(), &arch, &flat).unwrap();
        let (arch2, flat2) = checkpoint::read_checkpoint(out.path()).unwrap();
        assert_eq!(arch, arch2, "{name}");
        assert_eq!(flat, flat2, "{name}");
    }
}

#[test]
fn merged_weights_compute_what_base_and_adapters_compute() {
    for (name, s) in every_tuning() {
        let Tuning::Lora { .. } = s.tuning else {
            continue;
        };
        let (trainable, base, ids, _) = setup(&s);
        let adapted = LanguageModel::new(&s, &trainable, base, &Device::Cpu).unwrap();
        let mut flat = s.initial_base(5);
        jitter(&mut flat, 4, 0.1);
        let merged = super::weights::merge_lora(&s, flat, &trainable).unwrap();
        let full = LanguageSpec {
            tuning: Tuning::Full,
            ..s.clone()
        };
        let merged = LanguageModel::new(&full, &merged, None, &Device::Cpu).unwrap();
        let gap = (adapted.forward(&ids).unwrap() - merged.forward(&ids).unwrap())
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(gap < 1e-4, "{name}: merged logits differ by {gap}");
    }
}

/// The built-in byte-level GPT-2 at its own size (width 256, 4 heads,
/// 128 positions, fused CPU blocks): a position's logits depend on every
/// earlier token and on no later one. A model that only saw its own token
/// would train to a bigram model and stop there.
#[test]
fn the_builtin_model_reads_every_earlier_token_and_no_later_one() {
    let (arch, tokenizer) = super::builtin("gpt2-bytes").unwrap();
    let s = LanguageSpec {
        arch,
        tokenizer,
        context: 128,
        tuning: Tuning::Full,
    };
    let mut trainable = s.initial_trainable(1);
    jitter(&mut trainable, 2, 0.05);
    let model = LanguageModel::new(&s, &trainable, None, &Device::Cpu).unwrap();
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    let ids: Vec<u32> = (0..128).map(|_| rng.random_range(0..256)).collect();
    let logits = |ids: &[u32]| -> Vec<Vec<f32>> {
        let t = Tensor::from_vec(ids.to_vec(), (1, 128), &Device::Cpu).unwrap();
        model.forward(&t).unwrap().to_vec2().unwrap()
    };
    let gap = |a: &[f32], b: &[f32]| {
        a.iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f32::max)
    };
    let before = logits(&ids);
    for changed in [0usize, 1, 63, 126] {
        let mut other = ids.clone();
        other[changed] = (other[changed] + 1) % 256;
        let after = logits(&other);
        for pos in [changed + 1, 127] {
            assert!(
                gap(&before[pos], &after[pos]) > 1e-4,
                "position {pos} does not see token {changed}"
            );
        }
        for pos in 0..changed {
            assert_eq!(
                before[pos], after[pos],
                "position {pos} sees later token {changed}"
            );
        }
    }
}
