"""msg-numpy: A Flower / NumPy app (Message API)."""

from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

from msgnumpy.task import get_initial_model, load_centralized_dataset, test

# Create ServerApp
app = ServerApp()


def central_eval(server_round: int, arrays: ArrayRecord) -> MetricRecord:
    """Evaluate the global model on the held-out central data."""
    x_test, y_test = load_centralized_dataset()
    loss, accuracy = test(arrays.to_numpy_ndarrays(), x_test, y_test)
    return MetricRecord({"accuracy": accuracy, "loss": loss})


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Main entry point for the ServerApp."""
    num_rounds: int = context.run_config["num-server-rounds"]
    fraction_train: float = context.run_config["fraction-train"]
    lr: float = context.run_config["lr"]

    strategy = FedAvg(fraction_train=fraction_train)

    result = strategy.start(
        grid=grid,
        initial_arrays=ArrayRecord(get_initial_model()),
        train_config=ConfigRecord({"lr": lr}),
        num_rounds=num_rounds,
        evaluate_fn=central_eval,
    )

    print("\nFinal central evaluation:", result.evaluate_metrics_serverapp.get(num_rounds))
