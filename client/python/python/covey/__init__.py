"""Covey for Python: federated learning with your own training code.

Your model and training loop stay in Python (PyTorch, numpy, anything).
Covey's Rust core does everything around them: mutual TLS over QUIC,
check-in and backoff, model download, clipping, distributed DP noise,
quantization, SecAgg+ masking, certificate renewal and upload resume.

    import covey

    class Client(covey.NumPyClient):          # or flwr.client.NumPyClient
        def get_parameters(self, config): ...
        def fit(self, parameters, config): ...       # -> (parameters, num_examples, metrics)
        def evaluate(self, parameters, config): ...  # -> (loss, num_examples, metrics)

    covey.run_client(Client(), identity="device.identity")
"""

from __future__ import annotations

import os
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from ._covey import PROTOCOL_VERSION, CoveyError, Summary
from ._covey import read_model_file as _read_model_file
from ._covey import run_client as _run_client
from ._covey import write_model_file as _write_model_file

__all__ = [
    "NumPyClient",
    "run_client",
    "write_initial_model",
    "read_model_file",
    "CoveyError",
    "Summary",
    "PROTOCOL_VERSION",
]

Config = Dict[str, Any]
NDArrays = List[np.ndarray]


class NumPyClient:
    """Flower's ``NumPyClient`` interface, without needing ``flwr``.

    ``parameters`` is a list of numpy arrays in the model's tensor order and
    shapes. ``config`` holds the task: ``round``, ``epochs``,
    ``batch_size``, ``learning_rate``, ``proximal_mu``, ``optimizer``,
    ``seed``, and whatever the operator put in ``[fit_config]``.
    """

    def get_parameters(self, config: Config) -> NDArrays:
        raise NotImplementedError("get_parameters(config) -> list of numpy arrays")

    def fit(self, parameters: NDArrays, config: Config) -> Tuple[NDArrays, int, Dict[str, Any]]:
        raise NotImplementedError("fit(parameters, config) -> (parameters, num_examples, metrics)")

    def evaluate(self, parameters: NDArrays, config: Config) -> Tuple[float, int, Dict[str, Any]]:
        raise NotImplementedError("evaluate(parameters, config) -> (loss, num_examples, metrics)")


def _base_methods(name: str) -> list:
    """The un-overridden ``name`` of covey's and Flower's base classes."""
    bases = [getattr(NumPyClient, name)]
    try:  # Flower is optional: a class derived from its NumPyClient works unmodified.
        from flwr.client import NumPyClient as FlowerNumPyClient

        bases.append(getattr(FlowerNumPyClient, name, None))
    except Exception:
        pass
    return bases


def _overrides(client: Any, name: str) -> bool:
    method = getattr(type(client), name, None)
    return callable(method) and not any(method is base for base in _base_methods(name))


class _FitOnly:
    """A client whose ``evaluate`` is the base class's: the device reports
    no evaluation rather than an error."""

    def __init__(self, client: Any):
        self._client = client

    def fit(self, parameters, config):
        return self._client.fit(parameters, config)


def run_client(
    client: Any,
    identity: str | os.PathLike = "device.identity",
    *,
    server: Optional[str] = None,
    require_secure_aggregation: bool = False,
    give_up_after: Optional[float] = None,
    max_model_bytes: int = 1 << 30,
    cache: Optional[str | os.PathLike] = None,
) -> Summary:
    """Serves ``client`` in the federation its identity bundle names.

    Blocks until the server ends the run (returning a :class:`Summary`) or
    until Ctrl-C (raising ``KeyboardInterrupt`` after closing the
    connection). A ``fit`` that raises, or returns the wrong count, shapes,
    dtypes or non-finite values, has its round skipped with the reason
    logged; nothing is sent, and the device stays in the federation.

    ``identity``: the bundle ``covey-server enroll`` wrote.
    ``server``: dial this ``IP:port`` instead of the bundle's address.
    ``require_secure_aggregation``: refuse any task that would send the
    update unmasked.
    ``give_up_after``: seconds without a working connection before giving up.
    ``max_model_bytes``: largest global model accepted.
    ``cache``: where downloaded assets are kept (default: beside the bundle).
    """
    if not _overrides(client, "fit"):
        raise TypeError("the client must define fit(parameters, config)")
    target = client if _overrides(client, "evaluate") else _FitOnly(client)
    return _run_client(
        target,
        os.fspath(identity),
        server=server,
        require_secure_aggregation=require_secure_aggregation,
        give_up_after=give_up_after,
        max_model_bytes=max_model_bytes,
        cache=None if cache is None else os.fspath(cache),
    )


def write_initial_model(
    client: Any,
    path: str | os.PathLike,
    names: Optional[Sequence[str]] = None,
    config: Optional[Config] = None,
) -> None:
    """Writes ``client.get_parameters(config)`` to ``path`` for
    ``covey-server init --model-file``: the model's tensors, in list order,
    as float32 safetensors. ``names`` label them (default ``"0"``, ``"1"``,
    ...), e.g. ``list(net.state_dict().keys())`` for a PyTorch module.
    """
    arrays = [np.asarray(p) for p in client.get_parameters(config or {})]
    labels = [str(i) for i in range(len(arrays))] if names is None else list(names)
    _write_model_file(os.fspath(path), labels, arrays)


def read_model_file(path: str | os.PathLike) -> List[Tuple[str, np.ndarray]]:
    """The tensors of a model file (``covey-server export``, or one
    :func:`write_initial_model` wrote) in list order, as ``(name, array)``."""
    return _read_model_file(os.fspath(path))
