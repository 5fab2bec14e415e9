"""A covey-server on loopback for the examples' benchmarks and the Python
package's tests: a port chosen at run time, init, enrollment, config edits."""

from __future__ import annotations

import re
import socket
import subprocess
from pathlib import Path


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
