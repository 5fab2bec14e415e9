import numpy as np
from flwr.client import ClientApp, NumPyClient
from flwr.common import Context


class SyntheticClient(NumPyClient):
    def __init__(self, seed):
        self.rng = np.random.default_rng(seed)

    def fit(self, parameters, config):
        # No training: return received params + small Gaussian noise
        out = [
            (p + self.rng.normal(0, 1e-3, p.shape).astype(np.float32)).astype(np.float32)
            for p in parameters
        ]
        return out, 1000, {}

    def evaluate(self, parameters, config):  # not used (fraction_evaluate=0)
        return 0.0, 1, {}


def client_fn(context: Context):
    seed = int(context.node_id) % (2**32)
    return SyntheticClient(seed).to_client()


app = ClientApp(client_fn=client_fn)
