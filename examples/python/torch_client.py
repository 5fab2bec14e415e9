"""A PyTorch Covey client: McMahan et al.'s CNN (1,663,370 parameters) on
MNIST, the model Covey's own Rust client trains as `--model cnn` (same
tensors, same order), so both can serve one federation.

    python examples/python/torch_client.py --identity alice.identity --shard 0/2

`--synthetic` skips training and returns the model plus small noise, to
time the framework alone (the Flower side-by-side benchmark).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

import covey
import mnist
from numpy_client import arguments


def cnn() -> nn.Module:
    # 'same' padding, as Covey's spec: conv 5x5 32, pool, conv 5x5 64, pool, 512, 10.
    return nn.Sequential(
        nn.Conv2d(1, 32, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(64 * 7 * 7, 512), nn.ReLU(), nn.Linear(512, 10),
    )


NAMES = ["conv1.weight", "conv1.bias", "conv2.weight", "conv2.bias",
         "fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"]


class TorchClient(covey.NumPyClient):
    def __init__(self, images, labels, synthetic=False):
        self.x = torch.from_numpy(images).unsqueeze(1)
        self.y = torch.from_numpy(labels)
        self.model = cnn()
        self.synthetic = synthetic

    def get_parameters(self, config):
        return [p.detach().numpy() for p in self.model.parameters()]

    def set_parameters(self, parameters):
        with torch.no_grad():
            for p, a in zip(self.model.parameters(), parameters):
                p.copy_(torch.from_numpy(np.asarray(a)))

    def fit(self, parameters, config):
        if self.synthetic:
            rng = np.random.default_rng(int(config["seed"]))
            return ([a + rng.normal(0, 1e-3, a.shape).astype(np.float32) for a in parameters],
                    len(self.y), {})
        self.set_parameters(parameters)
        opt = torch.optim.SGD(self.model.parameters(), lr=float(config["learning_rate"]))
        batch = int(config["batch_size"])
        g = torch.Generator().manual_seed(int(config["seed"]))
        losses = []
        self.model.train()
        for _ in range(int(config["epochs"])):
            perm = torch.randperm(len(self.y), generator=g)
            for i in range(0, len(perm), batch):
                idx = perm[i : i + batch]
                opt.zero_grad(set_to_none=True)
                loss = nn.functional.cross_entropy(self.model(self.x[idx]), self.y[idx])
                loss.backward()
                opt.step()
                losses.append(loss.item())
        return self.get_parameters({}), len(self.y), {"loss": float(np.mean(losses))}

    def evaluate(self, parameters, config):
        self.set_parameters(parameters)
        self.model.eval()
        loss, correct = 0.0, 0
        with torch.no_grad():
            # In batches: the whole shard at once holds 200 MB of activations.
            for i in range(0, len(self.y), 500):
                logits = self.model(self.x[i : i + 500])
                y = self.y[i : i + 500]
                loss += nn.functional.cross_entropy(logits, y, reduction="sum").item()
                correct += (logits.argmax(1) == y).sum().item()
        return loss / len(self.y), len(self.y), {"accuracy": correct / len(self.y)}


def main():
    ap = arguments(__doc__.splitlines()[0])
    ap.add_argument("--synthetic", action="store_true", help="no training: time the framework")
    ap.add_argument("--examples", type=int, default=0, help="use only the first N of the shard")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    images, labels = mnist.shard(*mnist.load("train", args.data), args.shard)
    if args.examples:
        images, labels = images[: args.examples], labels[: args.examples]
    client = TorchClient(images, labels, args.synthetic)
    if args.write_initial:
        covey.write_initial_model(client, args.write_initial, names=NAMES)
        return
    print(covey.run_client(client, identity=args.identity, server=args.server))


if __name__ == "__main__":
    main()
