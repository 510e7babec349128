"""sklearn-ints: A Flower / scikit-learn app (Message API)."""

import pickle

from flwr.app import ArrayRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg
from sklearn.metrics import log_loss

from sklearnints.task import (
    UNIQUE_LABELS,
    create_model,
    get_model_params,
    load_central_data,
    set_model_params,
)

# Create ServerApp
app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Main entry point for the ServerApp."""
    num_rounds: int = context.run_config["num-server-rounds"]
    local_epochs: int = context.run_config["local-epochs"]
    c: float = context.run_config["reg-c"]

    model = create_model(local_epochs, c)
    arrays = ArrayRecord(get_model_params(model))

    def central_evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        X_test, y_test = load_central_data()
        set_model_params(model, arrays.to_numpy_ndarrays())
        loss = log_loss(y_test, model.predict_proba(X_test), labels=UNIQUE_LABELS)
        return MetricRecord({"accuracy": model.score(X_test, y_test), "loss": loss})

    strategy = FedAvg(fraction_train=1.0, fraction_evaluate=1.0)

    result = strategy.start(
        grid=grid,
        initial_arrays=arrays,
        num_rounds=num_rounds,
        evaluate_fn=central_evaluate,
    )

    # FedAvg skips rounds in which every ClientApp failed and still returns:
    # make a run in which no client ever trained fail loudly.
    if not result.train_metrics_clientapp:
        raise RuntimeError(
            "No ClientApp completed a training round (see the SuperNode logs)"
        )

    print("\nSaving final model to disk...")
    set_model_params(model, result.arrays.to_numpy_ndarrays())
    with open("logreg_model.pkl", "wb") as f:
        pickle.dump(model, f)
