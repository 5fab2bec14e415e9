import json
import time

from flwr.common import Context, ndarrays_to_parameters
from flwr.server import ServerApp, ServerAppComponents, ServerConfig
from flwr.server.strategy import FedAvg

from benchapp.model import zeros


class TimedFedAvg(FedAvg):
    """FedAvg that appends a timestamp to a JSONL file after each aggregation."""

    def __init__(self, rounds_file, **kw):
        super().__init__(**kw)
        self.rounds_file = rounds_file

    def _write(self, rec):
        with open(self.rounds_file, "a") as f:
            f.write(json.dumps(rec) + "\n")

    def initialize_parameters(self, client_manager):
        self._write({"event": "start", "t": time.time()})
        return super().initialize_parameters(client_manager)

    def aggregate_fit(self, server_round, results, failures):
        out = super().aggregate_fit(server_round, results, failures)
        self._write({"event": "round", "round": server_round, "t": time.time(),
                     "results": len(results), "failures": len(failures)})
        return out


def server_fn(context: Context):
    cfg = context.run_config
    n = int(cfg["num-clients"])
    strategy = TimedFedAvg(
        rounds_file=str(cfg["rounds-file"]),
        fraction_fit=1.0,
        fraction_evaluate=0.0,
        min_fit_clients=n,
        min_evaluate_clients=0,
        min_available_clients=n,
        initial_parameters=ndarrays_to_parameters(zeros()),
    )
    return ServerAppComponents(
        strategy=strategy, config=ServerConfig(num_rounds=int(cfg["num-server-rounds"]))
    )


app = ServerApp(server_fn=server_fn)
