"""Covey's round time with N Python clients on loopback, synthetic updates
(the framework alone): McMahan's CNN (1,663,370 parameters), every client
`examples/python/torch_client.py --synthetic`, which returns the model plus
small noise without training. The twin of a Flower deployment-runtime run
with the same client (BENCHMARKS.md, "Flower side by side").

Prints one JSON object: the time between round commits, and the server's
peak RSS.

    cargo build --release -p covey-server
    pip install ./client/python torch
    python examples/bench/python_rounds.py --clients 10 --rounds 5
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "examples" / "python"))

import local_server  # noqa: E402


def stamp(line: str) -> float:
    return datetime.fromisoformat(line.split()[0].replace("Z", "+00:00")).timestamp()


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--bin", default=str(ROOT / "target" / "release"))
    args = ap.parse_args()
    server = Path(args.bin) / "covey-server"
    tmp = Path(tempfile.mkdtemp(prefix="covey-rounds-"))
    # The state, identities and data go with the run (a CNN run leaves 128 MB).
    atexit.register(shutil.rmtree, tmp, ignore_errors=True)
    state = tmp / "state"
    local_server.init(server, state, local_server.free_udp_port(), "--model", "cnn",
                      "--rounds", str(args.rounds), "--clients-per-round", str(args.clients))
    ids = local_server.enroll(server, state, [f"device-{i}" for i in range(args.clients)], tmp)
    env = dict(os.environ, NO_COLOR="1", COVEY_LOG="info,quinn=warn,quinn_proto=warn")
    run = subprocess.Popen(["/usr/bin/time", "-f", "maxrss_kb=%M", server, "run", "--json",
                            "--dir", state], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           text=True, env=env)
    clients = [subprocess.Popen([sys.executable, ROOT / "examples" / "python" / "torch_client.py",
                                 "--identity", ident, "--synthetic", "--examples", "10",
                                 "--threads", "1"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env=dict(env, COVEY_LOG="warn"))
               for ident in ids]
    out, err = run.communicate(timeout=1800)
    for c in clients:
        c.communicate(timeout=60)
    summary = json.loads(out)
    started = [stamp(line) for line in err.splitlines() if "round started" in line]
    committed = [stamp(line) for line in err.splitlines() if "round committed" in line]
    if len(committed) != args.rounds:
        raise SystemExit(f"expected {args.rounds} commits:\n{err}")
    rounds = [committed[0] - started[0]] + [b - a for a, b in zip(committed, committed[1:])]
    print(json.dumps({
        "framework": "covey", "clients": args.clients, "rounds": args.rounds,
        "round_seconds": [round(r, 3) for r in rounds],
        "mean_round_seconds": sum(rounds) / len(rounds),
        "server_peak_rss_kb": int(re.findall(r"maxrss_kb=(\d+)", err)[-1]),
        "bytes_up": summary["bytes_up"], "bytes_down": summary["bytes_down"],
    }))


if __name__ == "__main__":
    main()
