"""Tiny random GPT-2, LLaMA and Qwen2 checkpoints built with Hugging Face
transformers, with their logits, loss and gradients on fixed token ids, a
peft LoRA adapter's logits, and a small byte-level BPE tokenizer's
encodings: the reference client/tests/lm_parity.rs checks Covey against.

Regenerate with:
    python3 -m venv /tmp/hf && /tmp/hf/bin/pip install torch transformers==5.24.0 peft==0.21.2 safetensors
    /tmp/hf/bin/python client/reference/hf_lm.py client/tests/data/lm
"""
import json
import os
import sys

import torch
from safetensors.torch import save_file

from peft import LoraConfig, get_peft_model
from tokenizers import Tokenizer, models, pre_tokenizers, decoders, trainers
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

OUT = sys.argv[1]
torch.manual_seed(0)

# Two sequences of 12 token ids each.
IDS = torch.tensor(
    [
        [5, 17, 250, 3, 99, 42, 42, 7, 0, 299, 128, 64],
        [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12],
    ]
)


def randomize(model):
    # Default inits leave biases and norms at 0 and 1; random values make
    # every parameter's role visible in the logits.
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.randn_like(p) * (0.3 if p.dim() == 1 else 0.1))
            if "norm" in name or "ln_" in name:
                p.add_(1.0)


def case(name, model, lora_targets):
    model.eval()
    randomize(model)
    folder = os.path.join(OUT, name)
    os.makedirs(folder, exist_ok=True)
    model.save_pretrained(folder, safe_serialization=True)
    # Next-token loss over both sequences (labels = inputs, shifted inside).
    out = model(IDS, labels=IDS)
    out.loss.backward()
    grads = {n: p.grad.detach().clone().contiguous() for n, p in model.named_parameters()}
    save_file(grads, os.path.join(folder, "grads.safetensors"))
    model.zero_grad()
    reference = {
        "ids": IDS.tolist(),
        "logits": out.logits.detach().tolist(),
        "loss": out.loss.item(),
    }
    # A LoRA adapter with random A and B: peft's forward is the reference
    # for Covey's adapted projections and the adapter file layout.
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=lora_targets, lora_dropout=0.0)
    peft_model = get_peft_model(model, lora)
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn_like(p) * 0.2)
    peft_model.save_pretrained(os.path.join(folder, "adapter"))
    # Only the weights and configs are reference data.
    os.remove(os.path.join(folder, "adapter", "README.md"))
    os.remove(os.path.join(folder, "generation_config.json"))
    with torch.no_grad():
        reference["lora_logits"] = peft_model(IDS).logits.tolist()
    with open(os.path.join(folder, "reference.json"), "w") as f:
        json.dump(reference, f)


case(
    "gpt2",
    GPT2LMHeadModel(
        GPT2Config(vocab_size=300, n_positions=32, n_embd=32, n_layer=2, n_head=4, layer_norm_epsilon=1e-5)
    ),
    ["c_attn", "attn.c_proj"],
)
case(
    "llama",
    LlamaForCausalLM(
        LlamaConfig(
            vocab_size=300,
            hidden_size=32,
            intermediate_size=48,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=64,
            rms_norm_eps=1e-6,
            rope_theta=10000.0,
            # Llama 3's scaling, with a short original context so that every
            # branch of it (kept, stretched, blended) applies at head_dim 8.
            rope_scaling={
                "rope_type": "llama3",
                "factor": 4.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 16,
            },
            tie_word_embeddings=False,
        )
    ),
    ["q_proj", "k_proj", "v_proj", "o_proj"],
)
case(
    "qwen2",
    Qwen2ForCausalLM(
        Qwen2Config(
            vocab_size=300,
            hidden_size=32,
            intermediate_size=48,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=1,
            max_position_embeddings=64,
            rms_norm_eps=1e-6,
            rope_theta=1000000.0,
            tie_word_embeddings=True,
        )
    ),
    ["q_proj", "v_proj"],
)

# A byte-level BPE of 300 tokens learned on a few lines, as GPT-2's and
# LLaMA 3's tokenizers are built.
TEXT = [
    "Shall I compare thee to a summer's day?",
    "Thou art more lovely and more temperate:",
    "Rough winds do shake the darling buds of May,",
    "And summer's lease hath all too short a date;",
]
tok = Tokenizer(models.BPE())
tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
tok.decoder = decoders.ByteLevel()
tok.train_from_iterator(
    TEXT,
    trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=["<|endoftext|>"]),
)
folder = os.path.join(OUT, "tokenizer")
os.makedirs(folder, exist_ok=True)
tok.save(os.path.join(folder, "tokenizer.json"))
samples = ["Shall I compare thee", "summer's day, and ünïcödé ☃", "  spaces\tand\nlines"]
with open(os.path.join(folder, "encodings.json"), "w") as f:
    json.dump({"vocab_size": tok.get_vocab_size(), "samples": [{"text": s, "ids": tok.encode(s).ids} for s in samples]}, f)
