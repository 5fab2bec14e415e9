"""The operator's console against real components: covey-server and
covey-client processes on loopback, Debian's Prometheus and promtool, and
Debian's Chromium driven over the DevTools protocol by Playwright.

Outside CI a missing Prometheus or Chromium skips its tests with the
command that installs it; under CI (CI=1, set by .ci/run) it fails them.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(ROOT / "examples" / "python"))

from local_server import Federation, binary, run  # noqa: E402, F401

MNIST = ROOT / "examples" / "data" / "mnist"
# Screenshots for the README land here (generated, never committed).
SCREENSHOTS = ROOT / "target" / "screenshots"


def need(program: str, package: str) -> str:
    path = shutil.which(program)
    if path:
        return path
    message = f"{program} is not installed: apt-get install {package}"
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


@pytest.fixture
def federation(tmp_path):
    f = Federation(tmp_path)
    yield f
    f.close()


def dashboard_url(federation: Federation) -> str:
    from local_server import eventually

    path = federation.dir / "dashboard.url"
    eventually(path.exists, 30)
    return path.read_text().strip()


def token(federation: Federation, identity: Path) -> str:
    """A dashboard login for `identity`, from the operator API."""
    return run([binary("covey-server"), "remote", "--identity", identity,
                "dashboard-login", "--hours", "1"]).strip()


def enroll_as(federation: Federation, name: str, role: str) -> Path:
    out = federation.root / f"{name}.identity"
    run([binary("covey-server"), "enroll", "--dir", federation.dir, "--name", name,
         "--role", role, "--out", out])
    return out
