"""plain-noop ServerApp: FedAvg over a small numpy ArrayRecord, no client evaluation."""

import numpy as np
from flwr.app import ArrayRecord, Context
from flwr.serverapp import Grid, ServerApp

from plain_noop.bench_strategy import TimedFedAvg

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    min_nodes: int = context.run_config["min-nodes"]
    arrays = ArrayRecord([np.zeros(1000, dtype=np.float32), np.zeros((10, 10), dtype=np.float32)])
    strategy = TimedFedAvg(
        output_dir=str(context.run_config["output-dir"]),
        fraction_train=1.0,
        fraction_evaluate=0.0,  # no evaluate messages: a round is one train message per node
        min_train_nodes=min_nodes,
        min_available_nodes=min_nodes,
    )
    strategy.start(grid=grid, initial_arrays=arrays, num_rounds=context.run_config["num-server-rounds"])
