#!/usr/bin/env bash
# Time from a fresh clone to the first round of the README's first command:
# clones this repository, builds with an empty CARGO_HOME (so every crate is
# downloaded) and no target/, and timestamps every line covey-sim prints.
#
#   examples/bench/first_run.sh [WORKDIR]      # default: a new temporary directory
set -euo pipefail
repo="$(cd "$(dirname "$0")/../.." && pwd)"
work="${1:-$(mktemp -d)}"
git clone -q "$repo" "$work/covey"
export CARGO_HOME="$work/cargo-home"
# The toolchain stays where rustup put it; only the registry starts empty.
export RUSTUP_HOME="${RUSTUP_HOME:-$HOME/.rustup}"
cd "$work/covey"
start=$(date +%s.%N)
cargo run --release -p covey-examples --bin covey-sim 2>&1 | while IFS= read -r line; do
    awk -v now="$(date +%s.%N)" -v start="$start" -v line="$line" \
        'BEGIN { printf "%8.1f %s\n", now - start, line }'
done
