"""PyTorch eager against covey-bench-lm: the same GPT-2 shapes from Hugging
Face transformers (peft for LoRA), local SGD over random token ids,
tokens/s and peak memory.

    python3 -m venv /tmp/torch && /tmp/torch/bin/pip install torch transformers peft
    /tmp/torch/bin/python examples/bench/torch_lm.py --model gpt2-bytes --batch 16 --context 128
    /tmp/torch/bin/python examples/bench/torch_lm.py --model gpt2-124m --lora-rank 8 --batch 2 --context 128
"""
import argparse
import json
import resource
import time

import torch
from transformers import GPT2Config, GPT2LMHeadModel

SHAPES = {
    # covey's built-ins: Gpt2Config::bytes() and Gpt2Config::gpt2_124m().
    "gpt2-bytes": dict(vocab_size=256, n_positions=128, n_embd=256, n_layer=4, n_head=4),
    "gpt2-124m": dict(vocab_size=50257, n_positions=1024, n_embd=768, n_layer=12, n_head=12),
}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="gpt2-bytes")
    p.add_argument("--lora-rank", type=int, default=0)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--context", type=int, default=128)
    p.add_argument("--sequences", type=int, default=64)
    p.add_argument("--trials", type=int, default=3)
    p.add_argument("--device", default="cpu")
    args = p.parse_args()
    dev = torch.device(args.device)
    torch.manual_seed(7)
    # No dropout: covey trains without it.
    config = GPT2Config(**SHAPES[args.model], resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    model = GPT2LMHeadModel(config).to(dev)
    if args.lora_rank:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(
            model,
            LoraConfig(
                r=args.lora_rank,
                lora_alpha=2 * args.lora_rank,
                target_modules=["c_attn", "attn.c_proj"],
                lora_dropout=0.0,
                fan_in_fan_out=True,
            ),
        )
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=1e-4)
    ids = torch.randint(0, config.vocab_size, (args.sequences, args.context + 1), device=dev)

    def epoch():
        perm = torch.randperm(args.sequences, device=dev)
        for i in range(0, args.sequences, args.batch):
            batch = ids[perm[i : i + args.batch]]
            opt.zero_grad(set_to_none=True)
            out = model(batch[:, :-1], labels=batch[:, :-1])
            out.loss.backward()
            opt.step()
        if dev.type == "cuda":
            torch.cuda.synchronize()

    epoch()
    times = []
    for _ in range(args.trials):
        start = time.perf_counter()
        epoch()
        times.append(time.perf_counter() - start)
    times.sort()
    median = times[len(times) // 2]
    # Positions processed, as covey-bench-lm counts them.
    tokens = args.sequences * args.context
    print(
        json.dumps(
            {
                "model": args.model,
                "lora_rank": args.lora_rank,
                "batch": args.batch,
                "context": args.context,
                "tokens": tokens,
                "seconds": median,
                "tokens_per_sec": tokens / median,
                "trainable": sum(p.numel() for p in params),
                "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                "threads": torch.get_num_threads(),
                "torch": torch.__version__,
            }
        )
    )


if __name__ == "__main__":
    main()
