#!/usr/bin/env bash
# The GPU checks of the client's trainer, in two halves, for a GPU machine that has no Rust toolchain:
#
#   examples/bench/gpu.sh build DIR   # here: CUDA builds of the CPU-vs-GPU test, covey-bench-train and
#                                     # covey-sim, xz-compressed into DIR (needs a CUDA toolkit or the
#                                     # env printed by shared/tools/cuda-build-root.sh)
#   examples/bench/gpu.sh run DIR OUT # on the GPU machine: the test, then samples/s of the McMahan CNN at
#                                     # B = 10 and 50 on the GPU and the CPU, Covey and PyTorch eager
#
# `run` needs the NVIDIA driver and the CUDA 13 runtime libraries on LD_LIBRARY_PATH, and a python3 with
# torch for the PyTorch rows (skipped with a note when there is none).
set -euo pipefail
cd "$(dirname "$0")/../.."

build() {
    local dir=$1 target=${CARGO_TARGET_DIR:-target/cuda}
    mkdir -p "$dir"
    CARGO_TARGET_DIR=$target cargo build --release -p covey-examples --features cuda \
        --bin covey-bench-train --bin covey-sim
    local test_bin
    test_bin=$(CARGO_TARGET_DIR=$target cargo test --release -p covey-client --features cuda --lib \
        --no-run --message-format=json |
        python3 -c 'import json,sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m["target"]["name"] == "covey_client" and m.get("executable"):
        print(m["executable"])')
    # Stripped: the debug info would take the pack past what a device call carries (64 MiB).
    local name
    for bin in "$target/release/covey-bench-train" "$target/release/covey-sim" "$test_bin"; do
        name=$(basename "$bin" | sed 's/-[0-9a-f]\{16\}$//')
        strip -o "$dir/$name" "$bin"
        xz -T0 -6 -f "$dir/$name"
    done
    ls -la "$dir"
}

run() {
    local dir=$1 out=$2 bin
    mkdir -p "$out" /tmp/covey-gpu
    for f in "$dir"/*.xz; do
        bin=/tmp/covey-gpu/$(basename "$f" .xz)
        xz -dc "$f" > "$bin" && chmod +x "$bin"
    done
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$out/gpu.txt"
    # CPU against GPU on fixed inputs: logits, gradients and a whole local epoch.
    /tmp/covey-gpu/covey_client cuda_ --nocapture 2>&1 | tee "$out/equivalence.txt"
    for device in cuda cpu; do
        /tmp/covey-gpu/covey-bench-train --device "$device" --batches 10,50 --examples 10000 \
            --warmup 2 --json | tee -a "$out/covey.jsonl"
    done
    if python3 -c 'import torch' 2>/dev/null; then
        for device in cuda cpu; do
            python3 examples/bench/torch_train.py --device "$device" --batches 10,50 --examples 10000 |
                tee -a "$out/torch.jsonl"
        done
    else
        echo "no torch here: PyTorch rows skipped" | tee "$out/torch.jsonl"
    fi
}

case "${1:-}" in
    build) build "${2:?build DIR}" ;;
    run) run "${2:?run DIR OUT}" "${3:?run DIR OUT}" ;;
    *) echo "usage: $0 build DIR | run DIR OUT" >&2; exit 2 ;;
esac
