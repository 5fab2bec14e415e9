"""What a Python client costs per round against the Rust client, on the
same model in the same rounds: McMahan's CNN (1,663,370 parameters), one
PyTorch client (examples/python/torch_client.py) and one covey-client, each
on its own core, the same N MNIST images, E = 1.

Per client: the rounds' wall time, the part inside training (`fit` for
Python, the candle trainer for Rust), the rest, and peak RSS. For the Python
client also the peak RSS of the same torch loop run alone (no Covey), so
the difference is what Covey adds.

    cargo build --release -p covey-server -p covey-client
    pip install ./client/python torch
    python examples/bench/python_client.py --rounds 5 --examples 2000
"""

from __future__ import annotations

import argparse
import atexit
import gzip
import json
import os
import re
import resource
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "examples" / "python"))

import local_server  # noqa: E402
import mnist  # noqa: E402


def write_idx(directory: Path, images, labels) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    raw = (images * 255).round().astype("uint8")
    with gzip.open(directory / "train-images-idx3-ubyte.gz", "wb") as f:
        f.write(struct.pack(">IIII", 0x803, len(raw), 28, 28) + raw.tobytes())
    with gzip.open(directory / "train-labels-idx1-ubyte.gz", "wb") as f:
        f.write(struct.pack(">II", 0x801, len(labels)) + labels.astype("uint8").tobytes())


def timed(cmd, env=None):
    """Starts `cmd` under /usr/bin/time, which reports its peak RSS."""
    return subprocess.Popen(["/usr/bin/time", "-f", "maxrss_kb=%M", *map(str, cmd)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env)


def peak_kb(stderr: str) -> int:
    return int(re.findall(r"maxrss_kb=(\d+)", stderr)[-1])


def standalone(args) -> None:
    """The torch loop alone, as many rounds, for its own peak RSS."""
    import torch

    from torch_client import TorchClient

    torch.set_num_threads(1)
    images, labels = mnist.load("train")
    client = TorchClient(images[: args.examples], labels[: args.examples])
    parameters = [p.copy() for p in client.get_parameters({})]
    for r in range(args.rounds):
        config = {"epochs": 1, "batch_size": args.batch, "learning_rate": 0.05, "seed": r}
        parameters, _, _ = client.fit(parameters, config)
    # As the federation's last step, federated evaluation of the final model.
    client.evaluate(parameters, {})
    print(json.dumps({"peak_rss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--examples", type=int, default=2000)
    ap.add_argument("--batch", type=int, default=10)
    ap.add_argument("--bin", default=str(ROOT / "target" / "release"))
    ap.add_argument("--standalone", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.standalone:
        return standalone(args)
    server, rust_client = Path(args.bin) / "covey-server", Path(args.bin) / "covey-client"
    tmp = Path(tempfile.mkdtemp(prefix="covey-pybench-"))
    # The state, identities and data go with the run (a CNN run leaves 128 MB).
    atexit.register(shutil.rmtree, tmp, ignore_errors=True)
    images, labels = mnist.load("train")
    write_idx(tmp / "data", images[: args.examples], labels[: args.examples])
    state = tmp / "state"
    local_server.init(server, state, local_server.free_udp_port(), "--model", "cnn",
                      "--rounds", str(args.rounds), "--clients-per-round", "2")
    config = state / "config.toml"
    local_server.set_option(config, "training", "learning_rate", "0.05")
    local_server.set_option(config, "training", "batch_size", str(args.batch))
    local_server.set_option(config, "training", "epochs", "1")
    ids = dict(zip(("python", "rust"),
                   local_server.enroll(server, state, ["python-device", "rust-device"], tmp)))
    env = dict(os.environ, NO_COLOR="1", COVEY_LOG="warn")
    run = timed([server, "run", "--json", "--dir", state], env)
    time.sleep(0.5)
    py = timed([sys.executable, ROOT / "examples" / "python" / "torch_client.py",
                "--identity", ids["python"], "--examples", str(args.examples), "--threads", "1"],
               env)
    rs = timed([rust_client, "run", "--identity", ids["rust"], "--data", tmp / "data"],
               dict(env, RAYON_NUM_THREADS="1"))
    outs = {name: p.communicate() for name, p in (("server", run), ("python", py), ("rust", rs))}
    for name, (out, err) in outs.items():
        if "maxrss_kb" not in err or (name != "server" and "final" not in out):
            raise SystemExit(f"{name} failed: {out}\n{err}")
    py_out = outs["python"][0]
    field = lambda name: float(re.search(rf"{name}=([0-9.]+)", py_out).group(1))  # noqa: E731
    rs_line = outs["rust"][0]
    rs_round, rs_train = map(float, re.search(
        r"([0-9.]+) s in rounds, ([0-9.]+) s of it training", rs_line).groups())
    alone = subprocess.run([sys.executable, __file__, "--standalone", "--rounds", str(args.rounds),
                            "--examples", str(args.examples), "--batch", str(args.batch)],
                           check=True, capture_output=True, text=True)
    result = {
        "rounds": args.rounds, "examples": args.examples, "batch": args.batch,
        "python": {
            "round_seconds": field("round_seconds"), "fit_seconds": field("fit_seconds"),
            "outside_fit_seconds": field("round_seconds") - field("fit_seconds"),
            # The numpy copy handed to fit and the checked subtraction after it.
            "conversion_seconds": field("train_seconds") - field("fit_seconds"),
            "peak_rss_kb": peak_kb(outs["python"][1]),
            "torch_alone_peak_rss_kb": json.loads(alone.stdout)["peak_rss_kb"],
        },
        "rust": {
            "round_seconds": rs_round, "train_seconds": rs_train,
            "outside_train_seconds": rs_round - rs_train,
            "peak_rss_kb": peak_kb(outs["rust"][1]),
        },
        "server": json.loads(outs["server"][0]),
    }
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
