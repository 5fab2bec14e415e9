#!/usr/bin/env bash
# LoRA fine-tuning of a pretrained byte-level GPT-2 on Shakespeare's speaking roles: non-private,
# central DP at two budgets, secure aggregation with distributed DP, and the frozen base held in
# f32, bf16 and f16. One covey-sim run each, the same roles, rounds and seed; one JSON object a
# line, tagged with the run's name.
#
#   cargo build --release -p covey-examples -p covey-server
#   examples/bench/lm_privacy.sh BASE_DIR PLAYS_DIR > lm_privacy.jsonl
#
# BASE_DIR is a Hugging Face checkpoint (covey-server export --format hf); PLAYS_DIR the plays'
# plain texts. ROUNDS, CLIENTS, FRACTION and RUNS (names, space-separated) override the defaults.
set -euo pipefail
cd "$(dirname "$0")/../.."
base=${1:?usage: lm_privacy.sh BASE_DIR PLAYS_DIR}
plays=${2:?usage: lm_privacy.sh BASE_DIR PLAYS_DIR}
rounds=${ROUNDS:-12}
clients=${CLIENTS:-100}
fraction=${FRACTION:-0.3}
runs=${RUNS:-"plain bf16 f16 eps8 eps2 secagg-eps8"}
sim=${COVEY_SIM:-target/release/covey-sim}
server=${COVEY_SERVER:-target/release/covey-server}
delta=1e-5

# The smallest z for EPSILON over the run, times MARGIN: central DP is amplified by Poisson
# sampling at the fraction; distributed DP is not (the server knows whom it sampled), so its rate
# is 1, and its discrete Gaussian is accounted in zCDP, a little looser than RDP: 2% more noise
# keeps all its rounds within the budget.
noise() {
    "$server" privacy noise --epsilon "$1" --delta $delta --sampling-rate "$2" --rounds "$rounds" --json |
        sed -E 's/.*"noise_multiplier":([0-9.eE+-]+).*/\1/' | awk -v m="$3" '{ printf "%.4f", $1 * m }'
}

common=(--model "hf:$base" --tokenizer bytes --lora-rank 8 --data "shakespeare:$plays"
    --clients "$clients" --fraction "$fraction" --epochs 1 --batch 8 --rounds "$rounds" --seed 2 --json)
for run in $runs; do
    case $run in
        plain) extra=() ;;
        bf16 | f16) extra=(--base-dtype "$run") ;;
        eps*)
            eps=${run#eps}
            extra=(--dp central --clip adaptive --noise-multiplier "$(noise "$eps" "$fraction" 1)"
                --target-epsilon "$eps")
            ;;
        secagg-eps*)
            eps=${run#secagg-eps}
            extra=(--dp distributed --secagg --clip 1 --bits 24
                --noise-multiplier "$(noise "$eps" 1 1.02)" --target-epsilon "$eps")
            ;;
        *)
            echo "unknown run '$run'" >&2
            exit 2
            ;;
    esac
    "$sim" "${common[@]}" "${extra[@]}" | sed "s/^{/{\"run\":\"$run\",/"
done
