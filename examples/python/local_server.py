"""A covey-server on loopback for the examples' benchmarks and the tests of
the Python package and the operator's console: a port chosen at run time,
init, enrollment, config edits, and a running federation of real processes.

The server binary is $COVEY_SERVER, else the workspace's target/debug or
target/release build."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples" / "python"


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def free_tcp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def set_option(config: Path, section: str, key: str, value: str) -> None:
    """Sets `key = value` (a TOML literal) in `[section]` of config.toml."""
    text = config.read_text()
    start = text.index(f"[{section}]\n")
    end = text.find("\n[", start + 1)
    end = len(text) if end < 0 else end
    body = text[start:end]
    line = re.compile(rf"^{re.escape(key)} = .*$", re.M)
    if line.search(body):
        body = line.sub(f"{key} = {value}", body, count=1)
    else:
        body = body.rstrip("\n") + f"\n{key} = {value}\n"
    config.write_text(text[:start] + body + text[end:])


def init(server: Path, state: Path, port: int, *args: str) -> None:
    """`covey-server init` listening on 127.0.0.1:`port`."""
    _run([server, "init", "--dir", state, "--listen", f"127.0.0.1:{port}", *args])


def enroll(server: Path, state: Path, names, out_dir: Path) -> list[Path]:
    """An identity bundle for each name, written into `out_dir`."""
    bundles = []
    for name in names:
        bundles.append(out_dir / f"{name}.identity")
        _run([server, "enroll", "--dir", state, "--name", name, "--out", bundles[-1]])
    return bundles


def _run(cmd) -> str:
    out = subprocess.run([str(c) for c in cmd], capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, cmd))}: {out.stderr}")
    return out.stdout


def binary(name: str) -> Path:
    env = os.environ.get(f"COVEY_{name.split('-')[1].upper()}")
    if env:
        return Path(env)
    for profile in ("debug", "release"):
        path = ROOT / "target" / profile / name
        if path.exists():
            return path
    raise FileNotFoundError(f"{name} is not built: run `cargo build --bin {name}` or set COVEY_*")


class Federation:
    """One state directory, its enrolled devices and a running server."""

    def __init__(self, root: Path):
        self.root = root
        self.dir = root / "state"
        self.port = free_udp_port()
        self.server = None
        self.clients: list[subprocess.Popen] = []
        # Where python_client looks for scripts, first match wins.
        self.scripts: list[Path] = [EXAMPLES]

    @staticmethod
    def binary(name: str) -> Path:
        return binary(name)

    def init(self, *args: str) -> None:
        init(binary("covey-server"), self.dir, self.port, *args)
        # The Prometheus endpoint tells the tests how many devices are connected.
        self.metrics = f"127.0.0.1:{free_tcp_port()}"
        text = self.config.read_text().replace(
            '# listen = "127.0.0.1:9464"', f'listen = "{self.metrics}"')
        self.config.write_text(text)

    def wait_connected(self, n: int, timeout: float = 60.0) -> None:
        """Until `n` devices hold a connection (the server's connections_open)."""
        def connected():
            try:
                with urllib.request.urlopen(f"http://{self.metrics}/metrics", timeout=2) as r:
                    body = r.read().decode()
            except OSError:
                return False
            found = re.search(r"^covey_connections_open (\d+)", body, re.M)
            return found is not None and int(found.group(1)) >= n
        eventually(connected, timeout)

    @property
    def config(self) -> Path:
        return self.dir / "config.toml"

    def set(self, section: str, key: str, value: str) -> None:
        set_option(self.config, section, key, value)

    def enroll(self, name: str) -> Path:
        (out,) = enroll(binary("covey-server"), self.dir, [name], self.root)
        return out

    def _spawn(self, name: str, cmd, **kwargs) -> subprocess.Popen:
        """Starts `cmd` with its output in files under root/logs: a pipe
        nobody reads fills up, and a long run would then block on a log line."""
        logs = self.root / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        out_path, err_path = logs / f"{name}.out", logs / f"{name}.err"
        with open(out_path, "w") as out, open(err_path, "w") as err:
            proc = subprocess.Popen([str(c) for c in cmd], stdout=out, stderr=err, text=True,
                                    **kwargs)
        proc.out_path, proc.err_path = out_path, err_path
        return proc

    def start(self) -> None:
        env = dict(os.environ, NO_COLOR="1",
                   COVEY_LOG="info,quinn=warn,quinn_proto=warn,rustls=warn,sled=warn")
        self.server = self._spawn(
            "server", [binary("covey-server"), "run", "--json", "--dir", self.dir], env=env)

    def python_client(self, script: str, identity: Path, *args: str) -> subprocess.Popen:
        """Runs `script`, found in `self.scripts` (the examples by default)."""
        path = next((d / script for d in self.scripts if (d / script).exists()), EXAMPLES / script)
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(
            [*map(str, self.scripts), os.environ.get("PYTHONPATH", "")]))
        proc = self._spawn(
            f"client-{len(self.clients)}",
            [sys.executable, path, "--identity", identity, *map(str, args)], env=env, cwd=EXAMPLES)
        self.clients.append(proc)
        return proc

    def rust_client(self, identity: Path, data: Path) -> subprocess.Popen:
        proc = self._spawn(
            f"client-{len(self.clients)}",
            [binary("covey-client"), "run", "--identity", identity, "--data", data],
            env=dict(os.environ, NO_COLOR="1"))
        self.clients.append(proc)
        return proc

    def finish(self, timeout: float = 120) -> dict:
        """Waits for the server to end the run; its JSON summary."""
        try:
            self.server.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.close()
            logs = [output(p)[1][-3000:] for p in self.clients]
            raise AssertionError(f"the run did not end in {timeout} s; clients' logs: {logs}")
        out, err = output(self.server)
        assert self.server.returncode == 0, err
        self.server_log = err
        return json.loads(out)

    def export(self, version: int) -> Path:
        out = self.root / f"v{version}.safetensors"
        run([binary("covey-server"), "export", "--dir", self.dir,
             "--version", str(version), "--out", out])
        return out

    def close(self) -> None:
        for p in self.clients + ([self.server] if self.server else []):
            if p.poll() is None:
                p.kill()
                p.wait()


def run(cmd) -> str:
    out = subprocess.run([str(c) for c in cmd], capture_output=True, text=True)
    assert out.returncode == 0, f"{cmd}: {out.stderr}"
    return out.stdout


def output(proc: subprocess.Popen) -> tuple[str, str]:
    """What a process `Federation` started wrote, so far."""
    return proc.out_path.read_text(), proc.err_path.read_text()


def wait(proc: subprocess.Popen, timeout: float = 300):
    """A client's exit code, stdout and stderr."""
    proc.wait(timeout=timeout)
    return (proc.returncode, *output(proc))


def interrupt(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGINT)


def eventually(check, timeout: float = 60.0, every: float = 0.1):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(every)
    raise AssertionError("condition not met in time")
