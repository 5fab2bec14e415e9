"""The shipped MNIST subset (examples/data/mnist) for the Python examples:
IDX files read with the standard library, one device's shard of them."""

from __future__ import annotations

import gzip
import os
import struct
from pathlib import Path

import numpy as np

DEFAULT_DIR = Path(__file__).resolve().parent.parent / "data" / "mnist"


def _idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        data = f.read()
    magic, count = struct.unpack(">II", data[:8])
    dims = magic & 0xFF
    shape = struct.unpack(">" + "I" * dims, data[4 : 4 + 4 * dims])
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * dims).reshape(shape)


def load(split: str = "train", directory: str | os.PathLike | None = None):
    """Images as float32 in [0, 1] of shape (n, 28, 28), labels as int64."""
    d = Path(directory) if directory else DEFAULT_DIR
    images = _idx(d / f"{split}-images-idx3-ubyte.gz").astype(np.float32) / 255.0
    labels = _idx(d / f"{split}-labels-idx1-ubyte.gz").astype(np.int64)
    return images, labels


def shard(images: np.ndarray, labels: np.ndarray, spec: str):
    """`i/n`: the i-th of n equal, disjoint slices (IID, as MNIST is shuffled)."""
    i, n = (int(x) for x in spec.split("/"))
    if not 0 <= i < n:
        raise ValueError(f"--shard {spec}: expected i/n with 0 <= i < n")
    size = len(labels) // n
    return images[i * size : (i + 1) * size], labels[i * size : (i + 1) * size]
