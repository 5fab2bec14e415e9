//! Hugging Face checkpoints on local disk: `config.json` to a family's
//! configuration, `model.safetensors` (or its sharded index) to the flat
//! vector in the family's tensor order, and back again for export.
//!
//! Anything Covey would compute differently from `transformers` is refused
//! with the field or tensor named: an unknown family, an unknown
//! config field, an activation or rope variant it does not implement, a
//! missing, misshaped or unexpected tensor.

use std::{
    collections::{BTreeMap, HashMap},
    path::{Path, PathBuf},
};

use covey_protocol::model::{
    Gpt2Config, LanguageSpec, LlamaConfig, LmArch, LoraVariant, TensorSpec, Tuning,
    llama::{AttentionBias, Llama3Scaling},
};
use safetensors::{
    SafeTensors,
    tensor::{Dtype, TensorView},
};
use serde_json::{Map, Value, json};

#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error("{path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}: not valid JSON: {source}")]
    Json {
        path: String,
        source: serde_json::Error,
    },
    #[error("{path}: {field}: {problem}")]
    Field {
        path: String,
        field: String,
        problem: String,
    },
    #[error("{path}: model_type '{family}' is not a family Covey trains (gpt2, llama, qwen2)")]
    UnknownFamily { path: String, family: String },
    #[error("{path}: {problem}")]
    Format { path: String, problem: String },
    #[error("{path}: tensor {name} is missing")]
    Missing { path: String, name: String },
    #[error("{path}: tensor {name} has shape {got:?}, the config needs {expected:?}")]
    Shape {
        path: String,
        name: String,
        got: Vec<usize>,
        expected: Vec<usize>,
    },
    #[error("{path}: tensor {name} is {dtype}, not f32, f16 or bf16")]
    DType {
        path: String,
        name: String,
        dtype: String,
    },
    #[error("{path}: tensor {name} is not part of a {family} model")]
    Unexpected {
        path: String,
        name: String,
        family: &'static str,
    },
}

pub(super) fn io(path: &Path) -> impl FnOnce(std::io::Error) -> CheckpointError + '_ {
    move |source| CheckpointError::Io {
        path: path.display().to_string(),
        source,
    }
}

/// Config fields that change nothing Covey computes: dropout (training
/// runs without it, as fine-tuning on devices does), token ids, metadata.
const IGNORED: &[&str] = &[
    "_name_or_path",
    "architectures",
    "attention_dropout",
    "attn_pdrop",
    "bos_token_id",
    "dtype",
    "embd_pdrop",
    "eos_token_id",
    "initializer_range",
    "max_window_layers",
    "model_type",
    "pad_token_id",
    "pretraining_tp",
    "reorder_and_upcast_attn",
    "resid_pdrop",
    "summary_activation",
    "summary_first_dropout",
    "summary_proj_to_labels",
    "summary_type",
    "summary_use_proj",
    "task_specific_params",
    "torch_dtype",
    "transformers_version",
    "use_cache",
];

/// A config.json's fields, each taken once; what is left at the end is
/// unknown and refused.
struct Fields<'a> {
    path: &'a str,
    map: Map<String, Value>,
}

impl<'a> Fields<'a> {
    fn err(&self, field: &str, problem: impl Into<String>) -> CheckpointError {
        CheckpointError::Field {
            path: self.path.to_owned(),
            field: field.to_owned(),
            problem: problem.into(),
        }
    }

    /// The field, absent when missing or null.
    fn take(&mut self, field: &str) -> Option<Value> {
        self.map.remove(field).filter(|v| !v.is_null())
    }

    fn usize(&mut self, field: &str) -> Result<Option<usize>, CheckpointError> {
        match self.take(field) {
            None => Ok(None),
            Some(v) => v
                .as_u64()
                .and_then(|n| usize::try_from(n).ok())
                .map(Some)
                .ok_or_else(|| self.err(field, format!("{v} is not a whole number"))),
        }
    }

    fn need(&mut self, field: &str) -> Result<usize, CheckpointError> {
        self.usize(field)?
            .ok_or_else(|| self.err(field, "is required"))
    }

    fn f64(&mut self, field: &str) -> Result<Option<f64>, CheckpointError> {
        match self.take(field) {
            None => Ok(None),
            Some(v) => v
                .as_f64()
                .map(Some)
                .ok_or_else(|| self.err(field, format!("{v} is not a number"))),
        }
    }

    fn bool(&mut self, field: &str) -> Result<Option<bool>, CheckpointError> {
        match self.take(field) {
            None => Ok(None),
            Some(v) => v
                .as_bool()
                .map(Some)
                .ok_or_else(|| self.err(field, format!("{v} is not true or false"))),
        }
    }

    fn string(&mut self, field: &str) -> Result<Option<String>, CheckpointError> {
        match self.take(field) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(v) => Err(self.err(field, format!("{v} is not a string"))),
        }
    }

    /// Requires `field`, when present, to hold `wanted`.
    fn expect_bool(&mut self, field: &str, wanted: bool, why: &str) -> Result<(), CheckpointError> {
        match self.bool(field)? {
            Some(v) if v != wanted => Err(self.err(field, format!("{v}: {why}"))),
            _ => Ok(()),
        }
    }

    /// Refuses any field not taken.
    fn finish(mut self) -> Result<(), CheckpointError> {
        for name in IGNORED {
            self.map.remove(*name);
        }
        match self.map.keys().next() {
            Some(field) => Err(self.err(
                field,
                "unknown field; Covey refuses what it might compute differently from transformers",
            )),
            None => Ok(()),
        }
    }
}

/// Reads `dir/config.json`.
pub fn read_config(dir: &Path) -> Result<LmArch, CheckpointError> {
    let path = dir.join("config.json");
    let text = std::fs::read_to_string(&path).map_err(io(&path))?;
    parse_config(&text, &path.display().to_string())
}

/// A family's configuration from the text of a Hugging Face config.json.
pub fn parse_config(text: &str, path: &str) -> Result<LmArch, CheckpointError> {
    let value: Value = serde_json::from_str(text).map_err(|source| CheckpointError::Json {
        path: path.to_owned(),
        source,
    })?;
    let Value::Object(map) = value else {
        return Err(CheckpointError::Format {
            path: path.to_owned(),
            problem: "config.json is not a JSON object".into(),
        });
    };
    let family = map
        .get("model_type")
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_owned();
    let mut f = Fields { path, map };
    let arch = match family.as_str() {
        "gpt2" => LmArch::Gpt2(gpt2_config(&mut f)?),
        "llama" => LmArch::Llama(llama_config(&mut f, AttentionBias::None)?),
        "qwen2" => LmArch::Llama(llama_config(&mut f, AttentionBias::Qkv)?),
        _ => {
            return Err(CheckpointError::UnknownFamily {
                path: path.to_owned(),
                family,
            });
        }
    };
    f.finish()?;
    arch.family()
        .validate()
        .map_err(|e| CheckpointError::Field {
            path: path.to_owned(),
            field: e.field,
            problem: e.problem,
        })?;
    Ok(arch)
}

fn gpt2_config(f: &mut Fields) -> Result<Gpt2Config, CheckpointError> {
    let n_embd = f.need("n_embd")?;
    let n_positions = match (f.usize("n_positions")?, f.usize("n_ctx")?) {
        (Some(p), _) | (None, Some(p)) => p,
        (None, None) => return Err(f.err("n_positions", "is required")),
    };
    let config = Gpt2Config {
        vocab_size: f.need("vocab_size")?,
        n_positions,
        n_embd,
        n_layer: f.need("n_layer")?,
        n_head: f.need("n_head")?,
        n_inner: f.usize("n_inner")?.unwrap_or(4 * n_embd),
        layer_norm_epsilon: f.f64("layer_norm_epsilon")?.unwrap_or(1e-5),
    };
    if let Some(act) = f.string("activation_function")?
        && act != "gelu_new"
        && act != "gelu_pytorch_tanh"
    {
        return Err(f.err(
            "activation_function",
            format!("'{act}': Covey's GPT-2 uses the tanh GELU (gelu_new)"),
        ));
    }
    f.expect_bool(
        "scale_attn_weights",
        true,
        "unscaled attention is not implemented",
    )?;
    f.expect_bool(
        "scale_attn_by_inverse_layer_idx",
        false,
        "per-layer attention scaling is not implemented",
    )?;
    f.expect_bool(
        "add_cross_attention",
        false,
        "cross-attention is not implemented",
    )?;
    f.expect_bool(
        "tie_word_embeddings",
        true,
        "GPT-2's LM head is the token embedding",
    )?;
    Ok(config)
}

fn llama_config(f: &mut Fields, bias: AttentionBias) -> Result<LlamaConfig, CheckpointError> {
    let hidden_size = f.need("hidden_size")?;
    let heads = f.need("num_attention_heads")?;
    if let Some(act) = f.string("hidden_act")?
        && act != "silu"
    {
        return Err(f.err("hidden_act", format!("'{act}': the LLaMA family uses silu")));
    }
    f.expect_bool("mlp_bias", false, "MLP biases are not implemented")?;
    f.expect_bool(
        "use_sliding_window",
        false,
        "sliding-window attention is not implemented",
    )?;
    if bias == AttentionBias::None {
        // Qwen2 carries a window size it does not use unless told to.
        if f.usize("sliding_window")?.is_some() {
            return Err(f.err(
                "sliding_window",
                "sliding-window attention is not implemented",
            ));
        }
    } else {
        f.take("sliding_window");
    }
    if let Some(types) = f.take("layer_types")
        && types
            .as_array()
            .is_none_or(|t| t.iter().any(|l| l.as_str() != Some("full_attention")))
    {
        return Err(f.err(
            "layer_types",
            "only full attention in every layer is implemented",
        ));
    }
    let attention_bias = match (bias, f.bool("attention_bias")?) {
        (AttentionBias::None, Some(true)) => AttentionBias::All,
        (b, _) => b,
    };
    let (rope_theta, rope_scaling) = rope(f)?;
    Ok(LlamaConfig {
        vocab_size: f.need("vocab_size")?,
        hidden_size,
        intermediate_size: f.need("intermediate_size")?,
        num_hidden_layers: f.need("num_hidden_layers")?,
        num_attention_heads: heads,
        num_key_value_heads: f.usize("num_key_value_heads")?.unwrap_or(heads),
        head_dim: f.usize("head_dim")?.unwrap_or(hidden_size / heads.max(1)),
        max_position_embeddings: f.usize("max_position_embeddings")?.unwrap_or(2048),
        rms_norm_eps: f.f64("rms_norm_eps")?.unwrap_or(1e-6),
        rope_theta,
        rope_scaling,
        tie_word_embeddings: f.bool("tie_word_embeddings")?.unwrap_or(false),
        attention_bias,
    })
}

/// Rotary settings in either layout: `rope_theta` + `rope_scaling`
/// (transformers 4) or `rope_parameters` (transformers 5).
fn rope(f: &mut Fields) -> Result<(f64, Option<Llama3Scaling>), CheckpointError> {
    let (field, params) = match (f.take("rope_parameters"), f.take("rope_scaling")) {
        (Some(p), _) => ("rope_parameters", Some(p)),
        (None, Some(s)) => ("rope_scaling", Some(s)),
        (None, None) => ("rope_scaling", None),
    };
    let mut theta = f.f64("rope_theta")?;
    let Some(params) = params else {
        return Ok((theta.unwrap_or(10_000.0), None));
    };
    let Value::Object(map) = params else {
        return Err(f.err(field, "is not an object"));
    };
    let mut p = Fields { path: f.path, map };
    if let Some(t) = p.f64("rope_theta")? {
        theta = Some(t);
    }
    let kind = match (p.string("rope_type")?, p.string("type")?) {
        (Some(k), _) | (None, Some(k)) => k,
        (None, None) => "default".into(),
    };
    let scaling = match kind.as_str() {
        "default" => None,
        "llama3" => Some(Llama3Scaling {
            factor: p
                .f64("factor")?
                .ok_or_else(|| f.err(&format!("{field}.factor"), "is required"))?,
            low_freq_factor: p.f64("low_freq_factor")?.unwrap_or(1.0),
            high_freq_factor: p.f64("high_freq_factor")?.unwrap_or(4.0),
            original_max_position_embeddings: p
                .usize("original_max_position_embeddings")?
                .unwrap_or(8192),
        }),
        other => {
            return Err(f.err(
                &format!("{field}.rope_type"),
                format!("'{other}' is not implemented (default and llama3 are)"),
            ));
        }
    };
    if let Some(extra) = p.map.keys().next() {
        return Err(f.err(&format!("{field}.{extra}"), "unknown field"));
    }
    Ok((theta.unwrap_or(10_000.0), scaling))
}

/// Names a tensor may carry in a checkpoint that are no parameter.
pub(super) fn is_buffer(name: &str, arch: &LmArch) -> bool {
    match arch {
        LmArch::Gpt2(_) => {
            name.ends_with(".attn.bias")
                || name.ends_with(".attn.masked_bias")
                || name == "lm_head.weight"
        }
        LmArch::Llama(c) => {
            name.ends_with("rotary_emb.inv_freq")
                || (c.tie_word_embeddings && name == "lm_head.weight")
        }
    }
}

/// The checkpoint's name for a family tensor, in whichever of the known
/// layouts the file uses.
pub(super) fn strip_prefix<'a>(name: &'a str, arch: &LmArch) -> &'a str {
    match arch {
        LmArch::Gpt2(_) => name.strip_prefix("transformer.").unwrap_or(name),
        LmArch::Llama(_) => name,
    }
}

/// The safetensors files of a checkpoint directory: `model.safetensors`,
/// or the shards a `model.safetensors.index.json` names.
fn weight_files(dir: &Path) -> Result<Vec<PathBuf>, CheckpointError> {
    let single = dir.join("model.safetensors");
    if single.exists() {
        return Ok(vec![single]);
    }
    let index = dir.join("model.safetensors.index.json");
    let text = std::fs::read_to_string(&index).map_err(|_| CheckpointError::Format {
        path: dir.display().to_string(),
        problem: "holds neither model.safetensors nor model.safetensors.index.json".into(),
    })?;
    let value: Value = serde_json::from_str(&text).map_err(|source| CheckpointError::Json {
        path: index.display().to_string(),
        source,
    })?;
    let map = value
        .get("weight_map")
        .and_then(Value::as_object)
        .ok_or_else(|| CheckpointError::Format {
            path: index.display().to_string(),
            problem: "has no weight_map".into(),
        })?;
    let mut files: Vec<PathBuf> = Vec::new();
    for file in map.values().filter_map(Value::as_str) {
        // Shards live beside the index, never elsewhere.
        if file.contains('/') || file.contains('\\') || file.starts_with('.') {
            return Err(CheckpointError::Format {
                path: index.display().to_string(),
                problem: format!("shard name '{file}' leaves the directory"),
            });
        }
        let p = dir.join(file);
        if !files.contains(&p) {
            files.push(p);
        }
    }
    Ok(files)
}

/// Reads a checkpoint directory: its family and every parameter, flat in
/// the family's order.
pub fn read_checkpoint(dir: &Path) -> Result<(LmArch, Vec<f32>), CheckpointError> {
    let arch = read_config(dir)?;
    let files = weight_files(dir)?;
    let weights = super::reader::read_tensors(&files, &arch)?;
    Ok((arch, weights))
}

/// Writes named f32 tensors, laid out by `specs` over `flat`, as one
/// safetensors file with `metadata`.
pub fn write_safetensors(
    path: &Path,
    specs: &[TensorSpec],
    flat: &[f32],
    prefix: &str,
    metadata: HashMap<String, String>,
) -> Result<(), CheckpointError> {
    let expected: usize = specs.iter().map(TensorSpec::len).sum();
    if flat.len() != expected {
        return Err(CheckpointError::Format {
            path: path.display().to_string(),
            problem: format!("{} values for tensors of {expected}", flat.len()),
        });
    }
    let bytes: Vec<u8> = flat.iter().flat_map(|v| v.to_le_bytes()).collect();
    let mut views = Vec::with_capacity(specs.len());
    let mut at = 0;
    for t in specs {
        let len = t.len() * 4;
        let view =
            TensorView::new(Dtype::F32, t.shape.clone(), &bytes[at..at + len]).map_err(|e| {
                CheckpointError::Format {
                    path: path.display().to_string(),
                    problem: e.to_string(),
                }
            })?;
        views.push((format!("{prefix}{}", t.name), view));
        at += len;
    }
    let out =
        safetensors::serialize(views, Some(metadata)).map_err(|e| CheckpointError::Format {
            path: path.display().to_string(),
            problem: e.to_string(),
        })?;
    std::fs::write(path, out).map_err(io(path))
}

/// The config.json `transformers` builds this model from.
pub fn hf_config(arch: &LmArch) -> Value {
    match arch {
        LmArch::Gpt2(c) => json!({
            "architectures": ["GPT2LMHeadModel"],
            "model_type": "gpt2",
            "vocab_size": c.vocab_size,
            "n_positions": c.n_positions,
            "n_ctx": c.n_positions,
            "n_embd": c.n_embd,
            "n_layer": c.n_layer,
            "n_head": c.n_head,
            "n_inner": c.n_inner,
            "layer_norm_epsilon": c.layer_norm_epsilon,
            "activation_function": "gelu_new",
            "tie_word_embeddings": true,
            "torch_dtype": "float32",
        }),
        LmArch::Llama(c) => {
            let qwen = c.attention_bias == AttentionBias::Qkv;
            let mut v = json!({
                "architectures": [if qwen { "Qwen2ForCausalLM" } else { "LlamaForCausalLM" }],
                "model_type": if qwen { "qwen2" } else { "llama" },
                "vocab_size": c.vocab_size,
                "hidden_size": c.hidden_size,
                "intermediate_size": c.intermediate_size,
                "num_hidden_layers": c.num_hidden_layers,
                "num_attention_heads": c.num_attention_heads,
                "num_key_value_heads": c.num_key_value_heads,
                "head_dim": c.head_dim,
                "max_position_embeddings": c.max_position_embeddings,
                "rms_norm_eps": c.rms_norm_eps,
                "rope_theta": c.rope_theta,
                "hidden_act": "silu",
                "tie_word_embeddings": c.tie_word_embeddings,
                "torch_dtype": "float32",
            });
            if !qwen {
                v["attention_bias"] = json!(c.attention_bias == AttentionBias::All);
            }
            if let Some(s) = c.rope_scaling {
                v["rope_scaling"] = json!({
                    "rope_type": "llama3",
                    "factor": s.factor,
                    "low_freq_factor": s.low_freq_factor,
                    "high_freq_factor": s.high_freq_factor,
                    "original_max_position_embeddings": s.original_max_position_embeddings,
                });
            }
            v
        }
    }
}

/// The prefix `save_pretrained` writes before the family's tensor names.
pub fn hf_prefix(arch: &LmArch) -> &'static str {
    match arch {
        LmArch::Gpt2(_) => "transformer.",
        LmArch::Llama(_) => "",
    }
}

/// Writes a Hugging Face checkpoint directory: config.json and
/// model.safetensors of the whole model (`flat` in family order).
pub fn write_checkpoint(dir: &Path, arch: &LmArch, flat: &[f32]) -> Result<(), CheckpointError> {
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let config = dir.join("config.json");
    let text =
        serde_json::to_string_pretty(&hf_config(arch)).map_err(|source| CheckpointError::Json {
            path: config.display().to_string(),
            source,
        })?;
    std::fs::write(&config, text).map_err(io(&config))?;
    write_safetensors(
        &dir.join("model.safetensors"),
        &arch.family().tensors(),
        flat,
        hf_prefix(arch),
        HashMap::from([("format".to_owned(), "pt".to_owned())]),
    )
}

/// peft's name for an adapter tensor of a Covey name.
fn peft_name(arch: &LmArch, name: &str) -> String {
    format!("base_model.model.{}{name}", hf_prefix(arch))
}

/// Writes a LoRA adapter as peft saves one: adapter_config.json and
/// adapter_model.safetensors with A and B of every adapted projection.
/// `trainable` is the wire vector; under FFA-LoRA the frozen A factors are
/// drawn from the spec's seed and written too, so the adapter stands alone.
pub fn write_adapter(
    dir: &Path,
    spec: &LanguageSpec,
    trainable: &[f32],
) -> Result<(), CheckpointError> {
    let Tuning::Lora { lora, .. } = &spec.tuning else {
        return Err(CheckpointError::Format {
            path: dir.display().to_string(),
            problem: "this model is fully fine-tuned: it has no adapter to write".into(),
        });
    };
    let modules = spec.lora_modules().map_err(|e| CheckpointError::Field {
        path: dir.display().to_string(),
        field: e.field,
        problem: e.problem,
    })?;
    let r = lora.rank as usize;
    let mut specs = Vec::new();
    let mut flat = Vec::new();
    let mut at = 0;
    for (i, m) in modules.iter().enumerate() {
        let a = match lora.variant {
            LoraVariant::FrozenA => lora.a_factor(i, m),
            LoraVariant::Plain => {
                let a = trainable
                    .get(at..at + r * m.inputs)
                    .unwrap_or_default()
                    .to_vec();
                at += r * m.inputs;
                a
            }
        };
        let b = trainable
            .get(at..at + m.outputs * r)
            .unwrap_or_default()
            .to_vec();
        at += m.outputs * r;
        if a.len() != r * m.inputs || b.len() != m.outputs * r {
            return Err(CheckpointError::Format {
                path: dir.display().to_string(),
                problem: format!(
                    "the adapter vector of {} values is too short",
                    trainable.len()
                ),
            });
        }
        specs.push(TensorSpec::new(
            peft_name(&spec.arch, &format!("{}.lora_A.weight", m.path)),
            &[r, m.inputs],
        ));
        flat.extend(a);
        specs.push(TensorSpec::new(
            peft_name(&spec.arch, &format!("{}.lora_B.weight", m.path)),
            &[m.outputs, r],
        ));
        flat.extend(b);
    }
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    write_safetensors(
        &dir.join("adapter_model.safetensors"),
        &specs,
        &flat,
        "",
        HashMap::from([("format".to_owned(), "pt".to_owned())]),
    )?;
    let config = json!({
        "peft_type": "LORA",
        "r": lora.rank,
        "lora_alpha": lora.alpha,
        "target_modules": lora.targets,
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": matches!(spec.arch, LmArch::Gpt2(_)),
        "task_type": "CAUSAL_LM",
        "inference_mode": true,
    });
    let path = dir.join("adapter_config.json");
    std::fs::write(&path, config.to_string()).map_err(io(&path))
}

/// Reads a peft adapter into the wire vector of `spec`'s LoRA (A and B
/// under plain LoRA, B alone under FFA-LoRA, whose A must then be the one
/// the spec's seed draws).
pub fn read_adapter(dir: &Path, spec: &LanguageSpec) -> Result<Vec<f32>, CheckpointError> {
    let path = dir.join("adapter_model.safetensors");
    let shown = path.display().to_string();
    let bytes = std::fs::read(&path).map_err(io(&path))?;
    let st = SafeTensors::deserialize(&bytes).map_err(|e| CheckpointError::Format {
        path: shown.clone(),
        problem: format!("not a safetensors file: {e}"),
    })?;
    let mut by_name = BTreeMap::new();
    for (name, view) in st.tensors() {
        let values = super::reader::widen(view.dtype(), view.data()).ok_or_else(|| {
            CheckpointError::DType {
                path: shown.clone(),
                name: name.clone(),
                dtype: format!("{:?}", view.dtype()),
            }
        })?;
        by_name.insert(name, (view.shape().to_vec(), values));
    }
    let mut flat = Vec::new();
    for t in spec.trainable_tensors() {
        let name = peft_name(&spec.arch, &t.name);
        let (shape, values) = by_name
            .remove(&name)
            .ok_or_else(|| CheckpointError::Missing {
                path: shown.clone(),
                name: name.clone(),
            })?;
        if shape != t.shape {
            return Err(CheckpointError::Shape {
                path: shown,
                name,
                got: shape,
                expected: t.shape,
            });
        }
        flat.extend(values);
    }
    if let Tuning::Lora { lora, .. } = &spec.tuning
        && lora.variant == LoraVariant::FrozenA
    {
        let modules = spec.lora_modules().map_err(|e| CheckpointError::Field {
            path: shown.clone(),
            field: e.field,
            problem: e.problem,
        })?;
        for (i, m) in modules.iter().enumerate() {
            let name = peft_name(&spec.arch, &format!("{}.lora_A.weight", m.path));
            if let Some((_, a)) = by_name.get(&name)
                && *a != lora.a_factor(i, m)
            {
                return Err(CheckpointError::Format {
                    path: shown,
                    problem: format!(
                        "{name} is not the frozen A this run's seed draws; load it as plain LoRA"
                    ),
                });
            }
        }
    }
    Ok(flat)
}
