"""other-metric: A Flower / NumPy app (Message API) with eval_acc / eval_loss."""

from flwr.app import ArrayRecord, Context
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

from othermetric.task import init_model

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    num_rounds: int = context.run_config["num-server-rounds"]
    fraction_evaluate: float = context.run_config["fraction-evaluate"]

    strategy = FedAvg(fraction_train=1.0, fraction_evaluate=fraction_evaluate)
    result = strategy.start(
        grid=grid,
        initial_arrays=ArrayRecord(init_model()),
        num_rounds=num_rounds,
    )

    last = result.evaluate_metrics_clientapp.get(num_rounds)
    if last is not None:
        print(f"Final eval_acc={last['eval_acc']:.3f} eval_loss={last['eval_loss']:.3f}")
