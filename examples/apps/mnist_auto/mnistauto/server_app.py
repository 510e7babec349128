"""mnist-auto: A Flower / PyTorch app."""

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

from flotilla.strategy import Auto
from mnistauto.task import Net, load_test
from mnistauto.task import test as test_fn

# Create ServerApp
app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Main entry point for the ServerApp."""
    cfg = context.run_config
    num_rounds: int = cfg["num-server-rounds"]

    torch.manual_seed(0)
    global_model = Net()
    arrays = ArrayRecord(global_model.state_dict())

    # FedAvg, with Flotilla's auto policy for the training rounds when the job asks for it
    # (heterogeneity.policy: auto): per-device work, round deadlines, FedNova averaging
    strategy = Auto(
        FedAvg(fraction_train=cfg["fraction-train"], fraction_evaluate=cfg["fraction-evaluate"]),
        batch_size=cfg["batch-size"],
        lr=cfg["lr"],
        local_epochs=cfg["local-epochs"],
    )

    images, labels = load_test()

    def global_evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        """Evaluate the global model on the held-out images."""
        model = Net()
        model.load_state_dict(arrays.to_torch_state_dict())
        loss, accuracy = test_fn(model, images, labels)
        return MetricRecord({"accuracy": accuracy, "loss": loss})

    result = strategy.start(
        grid=grid,
        initial_arrays=arrays,
        train_config=ConfigRecord({"lr": cfg["lr"]}),
        num_rounds=num_rounds,
        evaluate_fn=global_evaluate,
    )

    print("\nSaving final model to disk...")
    torch.save(result.arrays.to_torch_state_dict(), "final_model.pt")
