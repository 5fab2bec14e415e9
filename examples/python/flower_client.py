"""A Flower NumPyClient, unmodified, federated by Covey.

Only the launcher changes (see the README's "Coming from Flower"):

    -    fl.client.start_client(server_address="10.0.0.1:8080", client=FlowerClient(x, y).to_client())
    +    covey.run_client(FlowerClient(x, y), identity="device.identity")

    python examples/python/flower_client.py --identity alice.identity --shard 0/2
"""

from __future__ import annotations

import flwr as fl

import covey
import mnist
from numpy_client import SoftmaxRegression, arguments


class FlowerClient(fl.client.NumPyClient):
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


def main():
    args = arguments(__doc__.splitlines()[0]).parse_args()
    client = FlowerClient(*mnist.shard(*mnist.load("train", args.data), args.shard))
    if args.write_initial:
        covey.write_initial_model(client, args.write_initial, names=["fc.weight", "fc.bias"])
        return
    print(covey.run_client(client, identity=args.identity, server=args.server))


if __name__ == "__main__":
    main()
