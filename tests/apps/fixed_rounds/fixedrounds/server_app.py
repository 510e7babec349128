"""fixed-rounds: A Flower / NumPy app whose round count is fixed in code."""

from flwr.app import ArrayRecord, Context
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

from fixedrounds.task import initial_model

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    strategy = FedAvg(fraction_train=1.0, fraction_evaluate=1.0)
    result = strategy.start(
        grid=grid,
        initial_arrays=ArrayRecord(initial_model()),
        num_rounds=3,  # fixed in code: this app always runs three rounds
    )
    print("Federated evaluation per round:", result.evaluate_metrics_clientapp)
