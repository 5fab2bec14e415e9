"""A real covey-server on loopback for the Python package's tests; clients
run as real processes (the examples and this directory's scripts), each
with its own identity bundle, on a port chosen at run time. The harness is
examples/python/local_server.py, shared with the console's tests."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]
EXAMPLES = ROOT / "examples" / "python"
TESTS = Path(__file__).resolve().parent
# The examples' data loader, clients and local server, imported by the tests too.
sys.path.insert(0, str(EXAMPLES))

from local_server import (  # noqa: E402, F401
    Federation, binary, enroll, eventually, free_tcp_port, free_udp_port, init, interrupt, run,
    set_option, wait)


@pytest.fixture
def federation(tmp_path):
    f = Federation(tmp_path)
    f.scripts.insert(0, TESTS)
    yield f
    f.close()


