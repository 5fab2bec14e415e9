#!/usr/bin/env bash
# Flower's half of the side-by-side (BENCHMARKS.md, "Flower side by side"):
# its deployment runtime on loopback, 1 SuperLink + N SuperNodes (insecure),
# FedAvg over McMahan's CNN (1,663,370 values) with synthetic updates (the
# app in ./app returns the model plus small noise without training), so the
# framework alone is timed. Prints one JSON object to stdout; logs go to
# stderr. Covey's half: examples/bench/python_rounds.py.
#
# Usage: run.sh [N_CLIENTS=10] [ROUNDS=5]
#   env: PYENV, a virtual environment with flwr (pip install flwr numpy); RUN_TIMEOUT=900
set -u

N=${1:-${N:-10}}
R=${2:-${R:-5}}
BENCH=$(mktemp -d /tmp/flower-bench.XXXXXX)
PYENV=${PYENV:?set PYENV to a virtual environment with flwr installed}
RUN_TIMEOUT=${RUN_TIMEOUT:-900}
APP=$(cd "$(dirname "$0")" && pwd)/app
WORK=$BENCH/work
LOGS=$WORK/logs
ROUNDS_FILE=$BENCH/rounds.jsonl
PY=$PYENV/bin/python

export PATH="$PYENV/bin:$PATH"            # SuperLink/SuperNode spawn `flower-superexec` via PATH
export FLWR_HOME=$WORK/flwr_home           # isolated Flower home (config.toml, installed FABs)
export FLWR_TELEMETRY_ENABLED=0
export FLWR_DISABLE_UPDATE_CHECK=1
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1   # never `uv sync` app deps (no internet)
export PYTHONUNBUFFERED=1

log() { echo "[run.sh $(date +%H:%M:%S)] $*" >&2; }

rm -rf "$WORK"; mkdir -p "$LOGS" "$FLWR_HOME"
rm -f "$ROUNDS_FILE"

PIDS=()
cleanup() {
  # Kill only what this script started (process groups of our children, since
  # Flower's auto-launched flower-superexec runs in its own session).
  local p
  for p in "${PIDS[@]}"; do kill -TERM "$p" 2>/dev/null; done
  sleep 1
  if [ -f "$WORK/desc_pids" ]; then
    while read -r p; do kill -TERM "$p" 2>/dev/null; done < "$WORK/desc_pids"
    sleep 1
    while read -r p; do kill -KILL "$p" 2>/dev/null; done < "$WORK/desc_pids"
  fi
  for p in "${PIDS[@]}"; do kill -KILL "$p" 2>/dev/null; done
}
trap cleanup EXIT

# ---- pick free ports: 1 for the SuperLink HTTP API (Fleet+Control+Runtime), N for SuperNodes
read -r -a PORTS <<< "$($PY - "$((N + 1))" <<'EOF'
import socket, sys
socks, ports = [], []
for _ in range(int(sys.argv[1])):
    s = socket.socket(); s.bind(("127.0.0.1", 0)); socks.append(s); ports.append(s.getsockname()[1])
print(" ".join(map(str, ports)))
EOF
)"
SL_PORT=${PORTS[0]}
log "SuperLink port $SL_PORT; SuperNode ports ${PORTS[*]:1}"

# ---- CLI connection config (Flower >=1.2x: connections live in $FLWR_HOME/config.toml)
cat > "$FLWR_HOME/config.toml" <<EOF
[superlink]
default = "bench"

[superlink.bench]
address = "127.0.0.1:$SL_PORT"
insecure = true
EOF

wait_port() {  # host port timeout
  $PY - "$1" "$2" "$3" <<'EOF'
import socket, sys, time
h, p, t = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]); end = time.time() + t
while time.time() < end:
    try:
        socket.create_connection((h, p), 0.5).close(); sys.exit(0)
    except OSError:
        time.sleep(0.2)
sys.exit(1)
EOF
}

T_START=$(date +%s.%N)

# ---- SuperLink
flower-superlink --insecure --host 127.0.0.1 --port "$SL_PORT" \
  --disable-runtime-dependency-installation > "$LOGS/superlink.log" 2>&1 &
SL_PID=$!; PIDS+=("$SL_PID")
wait_port 127.0.0.1 "$SL_PORT" 60 || { log "SuperLink did not start"; cat "$LOGS/superlink.log" >&2; exit 1; }
log "SuperLink up (pid $SL_PID)"

# ---- SuperNodes
for i in $(seq 0 $((N - 1))); do
  flower-supernode --insecure --superlink "127.0.0.1:$SL_PORT" \
    --host 127.0.0.1 --port "${PORTS[$((i + 1))]}" \
    --node-config "partition-id=$i num-partitions=$N" > "$LOGS/supernode_$i.log" 2>&1 &
  PIDS+=("$!")
done

# ---- wait until all N SuperNodes are registered/online
deadline=$(( $(date +%s) + 120 ))
while :; do
  online=$(flwr supernode list bench --format json 2>/dev/null | $PY -c '
import json, sys
try:
    d = json.load(sys.stdin)
except Exception:
    print(0); sys.exit()
nodes = d.get("nodes") or d.get("supernodes") or []
print(sum(1 for n in nodes if str(n.get("status", "")).lower() == "online"))' 2>/dev/null)
  online=${online:-0}
  [ "$online" -ge "$N" ] && break
  if [ "$(date +%s)" -gt "$deadline" ]; then log "only $online/$N SuperNodes online"; exit 1; fi
  sleep 1
done
log "$online/$N SuperNodes online"

# ---- submit the run
T_RUN=$(date +%s.%N)
flwr run "$APP" bench --format json \
  --run-config "num-server-rounds=$R num-clients=$N rounds-file=\"$ROUNDS_FILE\"" \
  > "$WORK/flwr_run.json" 2> "$LOGS/flwr_run.err"
RUN_ID=$($PY -c 'import json,sys; print(json.load(open(sys.argv[1]))["run-id"])' "$WORK/flwr_run.json" 2>/dev/null)
[ -n "$RUN_ID" ] || { log "flwr run failed"; cat "$WORK/flwr_run.json" "$LOGS/flwr_run.err" >&2; exit 1; }
log "run $RUN_ID submitted"

# ---- monitor: poll RSS every 0.5 s, wait for R aggregations (or run finished/failed), then emit JSON
$PY - "$SL_PID" "$R" "$N" "$ROUNDS_FILE" "$T_START" "$T_RUN" "$RUN_TIMEOUT" "$WORK/desc_pids" "$RUN_ID" <<'EOF'
import json, os, subprocess, sys, time

sl_pid, R, N = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
rounds_file, t_start, t_run, timeout = sys.argv[4], float(sys.argv[5]), float(sys.argv[6]), float(sys.argv[7])
desc_file, run_id = sys.argv[8], sys.argv[9]

def status_kb(pid, key):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None

def cmdline(pid):
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""

def children(pid):
    out = []
    try:
        for t in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{t}/children") as f:
                out += [int(x) for x in f.read().split()]
    except OSError:
        pass
    return out

def descendants(pid):
    res, stack = [], [pid]
    while stack:
        for c in children(stack.pop()):
            res.append(c); stack.append(c)
    return res

def read_rounds():
    try:
        with open(rounds_file) as f:
            return [json.loads(l) for l in f if l.strip()]
    except OSError:
        return []

peak = {"superlink_hwm": 0, "superlink_rss": 0, "serverapp_hwm": 0, "serverapp_rss": 0}
serverapp_pids, all_desc = set(), set()
# also track descendants of the SuperNodes' parent shell (our other children) for cleanup
my_children = set(children(os.getppid()))
last_status_check, run_status = 0.0, ""
deadline = time.time() + timeout
while True:
    now = time.time()
    for k, key in (("superlink_hwm", "VmHWM"), ("superlink_rss", "VmRSS")):
        v = status_kb(sl_pid, key)
        if v: peak[k] = max(peak[k], v)
    desc = descendants(sl_pid)
    for c in my_children:
        desc += descendants(c)
    all_desc.update(desc)
    for p in desc:
        if "flwr-serverapp" in cmdline(p):
            serverapp_pids.add(p)
    for p in list(serverapp_pids):
        for k, key in (("serverapp_hwm", "VmHWM"), ("serverapp_rss", "VmRSS")):
            v = status_kb(p, key)
            if v: peak[k] = max(peak[k], v)
    rounds = [r for r in read_rounds() if r.get("event") == "round"]
    if len(rounds) >= R:
        break
    if now - last_status_check > 10:   # `flwr ls` fallback (failure detection), kept sparse
        last_status_check = now
        try:
            out = subprocess.run(["flwr", "ls", "bench", "--run-id", run_id, "--format", "json"],
                                 capture_output=True, text=True, timeout=30).stdout
            run_status = str(json.loads(out)["runs"][0]["status"])
        except Exception:
            pass
        if run_status.lower().startswith("finished"):
            # give the rounds file a last chance, then stop
            time.sleep(0.5)
            break
    if now > deadline:
        print(f"timeout after {timeout}s; run status {run_status}", file=sys.stderr)
        break
    time.sleep(0.5)

# wait briefly for the ServerApp to finish (it logs summary after the last round), sampling RSS
end = time.time() + 10
while time.time() < end and any(os.path.exists(f"/proc/{p}") for p in serverapp_pids):
    for p in list(serverapp_pids):
        for k, key in (("serverapp_hwm", "VmHWM"), ("serverapp_rss", "VmRSS")):
            v = status_kb(p, key)
            if v: peak[k] = max(peak[k], v)
    time.sleep(0.5)
v = status_kb(sl_pid, "VmHWM")
if v: peak["superlink_hwm"] = max(peak["superlink_hwm"], v)
t_end = time.time()

with open(desc_file, "w") as f:
    f.write("\n".join(map(str, all_desc)) + "\n")

recs = read_rounds()
start = next((r["t"] for r in recs if r.get("event") == "start"), t_run)
rounds = sorted((r for r in recs if r.get("event") == "round"), key=lambda r: r["round"])
ts = [start] + [r["t"] for r in rounds]
round_seconds = [round(b - a, 4) for a, b in zip(ts, ts[1:])]
import flwr
result = {
    "framework": f"flwr {flwr.__version__}",
    "runtime": "deployment (flower-superlink + flower-supernode, insecure, loopback)",
    "clients": N,
    "rounds": len(rounds),
    "rounds_requested": R,
    "round_seconds": round_seconds,
    "mean_round_seconds": round(sum(round_seconds) / len(round_seconds), 4) if round_seconds else None,
    "mean_round_seconds_excl_first": (round(sum(round_seconds[1:]) / len(round_seconds[1:]), 4)
                                       if len(round_seconds) > 1 else None),
    "failures_per_round": [r.get("failures") for r in rounds],
    "results_per_round": [r.get("results") for r in rounds],
    "superlink_peak_rss_kb": peak["superlink_hwm"] or peak["superlink_rss"],
    "superlink_max_sampled_rss_kb": peak["superlink_rss"],
    "serverapp_peak_rss_kb": (peak["serverapp_hwm"] or peak["serverapp_rss"]) or None,
    "serverapp_max_sampled_rss_kb": peak["serverapp_rss"] or None,
    "submit_to_first_round_start_seconds": round(start - t_run, 4),
    "run_seconds": round(ts[-1] - t_run, 4),
    "total_seconds": round(t_end - t_start, 4),
    "run_status_last_polled": run_status or None,
}
print(json.dumps(result))
EOF
rc=$?

# ---- ServerApp logs (kept by the SuperLink) + component logs, all to stderr
log "ServerApp log of run $RUN_ID (flwr log --show):"
flwr log "$RUN_ID" bench --show >&2 2>&1
cleanup; trap - EXIT
for f in "$LOGS"/superlink.log "$LOGS"/supernode_*.log "$LOGS"/flwr_run.err; do
  echo "===== $f =====" >&2; cat "$f" >&2
done
exit $rc
