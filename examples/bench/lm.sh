#!/usr/bin/env bash
# Language-model training throughput and peak memory: covey-bench-lm against PyTorch eager
# (transformers, peft for LoRA) on the same machine, interleaved, ROUNDS times each.
#
#   cargo build --release -p covey-examples --bin covey-bench-lm
#   python3 -m venv /tmp/torch && /tmp/torch/bin/pip install torch transformers peft
#   examples/bench/lm.sh [ROUNDS] > lm.jsonl
#
# One JSON object a line: {"impl": "covey"|"torch", ...covey-bench-lm's or torch_lm.py's fields}.
set -euo pipefail
cd "$(dirname "$0")/../.."
rounds=${1:-2}
covey=${COVEY_BENCH_LM:-target/release/covey-bench-lm}
python=${TORCH_PYTHON:-/tmp/torch/bin/python}
run() {
    local impl=$1
    shift
    "$@" | sed "s/^{/{\"impl\":\"$impl\",/"
}
for _ in $(seq "$rounds"); do
    # The small GPT-2 of the issue: 4 layers, width 256, 4 heads, context 128, batch 16.
    run covey "$covey" --model gpt2-bytes --batch 16 --context 128 --json
    run torch "$python" examples/bench/torch_lm.py --model gpt2-bytes --batch 16 --context 128
    # GPT-2 124M with LoRA r = 8 on the attention projections; the base in f32, bf16 and f16.
    for dtype in f32 bf16 f16; do
        run covey "$covey" --model gpt2-124m --lora-rank 8 --base-dtype $dtype --batch 4 --context 128 --sequences 16 --json
    done
    run torch "$python" examples/bench/torch_lm.py --model gpt2-124m --lora-rank 8 --batch 4 --context 128 --sequences 16
done
