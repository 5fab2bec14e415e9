"""The numpy example client, misbehaving on purpose in its first fit, for
the failure tests; it records every config it is handed."""

from __future__ import annotations

import json

import numpy as np

import covey
import mnist
from numpy_client import Client, arguments


class Scripted(Client):
    def __init__(self, images, labels, fault, record):
        super().__init__(images, labels)
        self.fault = fault
        self.record = record
        self.calls = 0

    def fit(self, parameters, config):
        self.calls += 1
        if self.record:
            with open(self.record, "a") as f:
                f.write(json.dumps(config) + "\n")
        out, n, metrics = super().fit(parameters, config)
        if self.calls > 1 or self.fault == "none":
            return out, n, metrics
        w, b = out
        if self.fault == "raise":
            raise RuntimeError("the training loop broke on purpose")
        if self.fault == "shape":
            return [w[:, :100], b], n, metrics
        if self.fault == "count":
            return [w], n, metrics
        if self.fault == "nan":
            b = b.copy()
            b[3] = np.nan
            return [w, b], n, metrics
        if self.fault == "int":
            return [w, b.astype(np.int64)], n, metrics
        if self.fault == "no-examples":
            return out, 0, metrics
        if self.fault == "not-array":
            return [w, b.tolist()], n, metrics
        raise ValueError(self.fault)


def main():
    ap = arguments(__doc__.splitlines()[0])
    ap.add_argument("--fault", default="none")
    ap.add_argument("--record", default=None)
    args = ap.parse_args()
    images, labels = mnist.shard(*mnist.load("train", args.data), args.shard)
    client = Scripted(images, labels, args.fault, args.record)
    print(covey.run_client(client, identity=args.identity, server=args.server))


if __name__ == "__main__":
    main()
