#!/usr/bin/env bash
# The byte-level GPT-2's local learning rate, on one device: Hamlet's and Macbeth's spoken lines as
# one speaking role (80% to train, 20% held out), E = 1, B = 8 (or $BATCH), local Adam, three
# rounds (three epochs) per rate; then the held-out next-character accuracy of n-gram models (most
# frequent next byte after the last n bytes of the training text) as the yardstick: a model that
# does not read its context cannot beat the bigram's.
#
#   cargo build --release -p covey-examples
#   [BATCH=2] examples/bench/lm_lr.sh PLAYS_DIR ["0.0005 0.001 0.002 0.006"]
set -euo pipefail
cd "$(dirname "$0")/../.."
plays=${1:?usage: lm_lr.sh PLAYS_DIR [RATES]}
rates=${2:-"0.0005 0.001 0.002 0.006"}
sim=${COVEY_SIM:-target/release/covey-sim}
dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT
python3 - "$plays" "$dir/one_gut.txt" <<'PY'
import sys
plays, out = sys.argv[1], sys.argv[2]
lines = []
for name in ["hamlet_gut.txt", "macbeth_gut.txt"]:
    for line in open(f"{plays}/{name}", encoding="utf-8", errors="replace"):
        line = line.strip()
        # Speaker names, headings and stage directions are not speech.
        if not line or line.startswith("[") or line.isupper():
            continue
        if line.endswith(".") and len(line) < 20 and " " not in line.strip("."):
            continue
        lines.append(line)
with open(out, "w") as f:
    f.write("ONE ROLE\n\nACT I.\n\nONE.\n" + "\n".join(lines) + "\n")
# The held-out split covey-sim makes: the last 20% of the lines.
n = len(lines)
train, test = "\n".join(lines[: n * 4 // 5]), "\n".join(lines[n * 4 // 5 :])
from collections import Counter, defaultdict
for k in range(5):
    follow = defaultdict(Counter)
    for i in range(k, len(train)):
        follow[train[i - k : i]][train[i]] += 1
    fallback = Counter(train).most_common(1)[0][0]
    hits = sum(
        (follow[test[i - k : i]].most_common(1)[0][0] if test[i - k : i] in follow else fallback) == test[i]
        for i in range(k, len(test))
    )
    print(f'{{"ngram": {k + 1}, "accuracy": {hits / (len(test) - k):.4f}}}')
PY
for lr in $rates; do
    "$sim" --model gpt2-bytes --data "shakespeare:$dir" --clients 1 --min-cohort 1 --rounds 3 \
        --epochs 1 --batch "${BATCH:-8}" --lr "$lr" --seed 0 --json | sed "s/^{/{\"lr\":$lr,\"batch\":${BATCH:-8},/"
done
