"""The memory Covey's core adds to a Python client, with nothing else in
the way: McMahan's CNN (1,663,370 parameters, 6.65 MB), two clients whose
`fit` returns the arrays it was handed (no framework, no numpy
temporaries), R rounds on loopback. One client's RSS is sampled every
20 ms; the report is its RSS once `covey` is imported and before the first
task, and the most it reached through the rounds.

    cargo build --release -p covey-server
    pip install ./client/python
    python examples/bench/python_memory.py --rounds 30
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "examples" / "python"))

import local_server  # noqa: E402

ECHO = """
import sys, covey
class Echo(covey.NumPyClient):
    def fit(self, parameters, config):
        return parameters, 1, {}
print("imported", flush=True)
covey.run_client(Echo(), identity=sys.argv[1])
"""


def rss_kb(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--bin", default=str(ROOT / "target" / "release"))
    args = ap.parse_args()
    server = Path(args.bin) / "covey-server"
    tmp = Path(tempfile.mkdtemp(prefix="covey-pymem-"))
    # The state, identities and data go with the run (a CNN run leaves 128 MB).
    atexit.register(shutil.rmtree, tmp, ignore_errors=True)
    state = tmp / "state"
    local_server.init(server, state, local_server.free_udp_port(), "--model", "cnn",
                      "--rounds", str(args.rounds), "--clients-per-round", "2")
    ids = local_server.enroll(server, state, ["d0", "d1"], tmp)
    env = dict(os.environ, NO_COLOR="1", COVEY_LOG="warn")
    # The sampled client starts first and alone: its RSS before any task is the baseline.
    run = subprocess.Popen([server, "run", "--json", "--dir", state], stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, env=env, text=True)
    sampled = subprocess.Popen([sys.executable, "-c", ECHO, ids[0]], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, env=env, text=True)
    assert sampled.stdout.readline().strip() == "imported"
    time.sleep(1.0)
    baseline = rss_kb(sampled.pid)
    other = subprocess.Popen([sys.executable, "-c", ECHO, ids[1]], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, env=env, text=True)
    peak = baseline
    while sampled.poll() is None:
        peak = max(peak, rss_kb(sampled.pid) or 0)
        time.sleep(0.02)
    summary = json.loads(run.communicate()[0])
    other.communicate()
    model_kb = 1_663_370 * 4 / 1024
    print(json.dumps({
        "rounds": summary["final_version"], "baseline_rss_kb": baseline, "peak_rss_kb": peak,
        "added_kb": peak - baseline, "added_over_model": round((peak - baseline) / model_kb, 2),
    }))


if __name__ == "__main__":
    main()
