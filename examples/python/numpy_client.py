"""A numpy-only Covey client: multinomial logistic regression on MNIST.

    python examples/python/numpy_client.py --identity alice.identity --shard 0/2

The server side: `covey-server init --model-file init.safetensors`, where
`python examples/python/numpy_client.py --write-initial init.safetensors`
writes the file; or `covey-server init --model logreg`, which Covey's own
Rust client trains too (the tensor order and shapes are the same).
"""

from __future__ import annotations

import argparse

import numpy as np

import covey
import mnist


class SoftmaxRegression:
    """fc.weight (10, 784) and fc.bias (10,): the layout of Covey's `logreg`."""

    def __init__(self):
        self.w = np.zeros((10, 784), np.float32)
        self.b = np.zeros(10, np.float32)

    def get(self):
        return [self.w, self.b]

    def set(self, parameters):
        self.w, self.b = (np.array(p, dtype=np.float32) for p in parameters)

    def _probabilities(self, x):
        z = x @ self.w.T + self.b
        z -= z.max(axis=1, keepdims=True)
        e = np.exp(z)
        return e / e.sum(axis=1, keepdims=True)

    def train(self, x, y, epochs, batch, lr, seed):
        """Minibatch SGD on cross-entropy; the mean training loss."""
        rng = np.random.default_rng(seed)
        losses = []
        for _ in range(epochs):
            order = rng.permutation(len(y))
            for start in range(0, len(order), batch):
                idx = order[start : start + batch]
                p = self._probabilities(x[idx])
                rows = np.arange(len(idx))
                losses.append(-np.log(p[rows, y[idx]] + 1e-12).mean())
                p[rows, y[idx]] -= 1.0
                p /= len(idx)
                self.w -= lr * (p.T @ x[idx])
                self.b -= lr * p.sum(axis=0)
        return float(np.mean(losses))

    def evaluate(self, x, y):
        """Cross-entropy and accuracy."""
        p = self._probabilities(x)
        loss = float(-np.log(p[np.arange(len(y)), y] + 1e-12).mean())
        return loss, float((p.argmax(axis=1) == y).mean())


class Client(covey.NumPyClient):
    def __init__(self, images, labels):
        self.x = images.reshape(len(images), -1)
        self.y = labels
        self.model = SoftmaxRegression()

    def get_parameters(self, config):
        return self.model.get()

    def fit(self, parameters, config):
        self.model.set(parameters)
        loss = self.model.train(self.x, self.y, int(config["epochs"]), int(config["batch_size"]),
                                float(config["learning_rate"]), int(config["seed"]))
        return self.model.get(), len(self.y), {"loss": loss}

    def evaluate(self, parameters, config):
        self.model.set(parameters)
        loss, accuracy = self.model.evaluate(self.x, self.y)
        return loss, len(self.y), {"accuracy": accuracy}


def arguments(description: str):
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--identity", default="device.identity")
    ap.add_argument("--shard", default="0/1", help="i/n: this device's slice of the training set")
    ap.add_argument("--data", default=None, help="MNIST IDX directory (default: the shipped subset)")
    ap.add_argument("--server", default=None, help="dial IP:port instead of the bundle's address")
    ap.add_argument("--write-initial", metavar="PATH", help="write the initial model file and exit")
    return ap


def main():
    args = arguments(__doc__.splitlines()[0]).parse_args()
    client = Client(*mnist.shard(*mnist.load("train", args.data), args.shard))
    if args.write_initial:
        covey.write_initial_model(client, args.write_initial, names=["fc.weight", "fc.bias"])
        return
    print(covey.run_client(client, identity=args.identity, server=args.server))


if __name__ == "__main__":
    main()
