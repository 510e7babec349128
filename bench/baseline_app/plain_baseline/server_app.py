"""plain-baseline: a Flower / PyTorch ServerApp (quickstart-pytorch style)."""

from flwr.app import ArrayRecord, Context
from flwr.serverapp import Grid, ServerApp

from plain_baseline.bench_strategy import TimedFedAvg
from plain_baseline.task import Net

# Create ServerApp
app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Main entry point for the ServerApp."""

    # Read run config
    fraction_train: float = context.run_config["fraction-train"]
    fraction_evaluate: float = context.run_config["fraction-evaluate"]
    num_rounds: int = context.run_config["num-server-rounds"]
    min_nodes: int = context.run_config["min-nodes"]

    # Load global model
    global_model = Net()
    arrays = ArrayRecord(global_model.state_dict())

    # Initialize FedAvg strategy (TimedFedAvg = FedAvg + bench instrumentation)
    strategy = TimedFedAvg(
        output_dir=str(context.run_config["output-dir"]),
        fraction_train=fraction_train,
        fraction_evaluate=fraction_evaluate,
        min_train_nodes=min_nodes,
        min_evaluate_nodes=min_nodes,
        min_available_nodes=min_nodes,
    )

    # Start strategy, run FedAvg for `num_rounds`
    strategy.start(grid=grid, initial_arrays=arrays, num_rounds=num_rounds)
    # (quickstart then saves final_model.pt; the benchmark has no use for it)
