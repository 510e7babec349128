"""legacy-numpy: A Flower / NumPy app (legacy client_fn / server_fn API)."""

from typing import List, Tuple

from flwr.common import Context, Metrics, ndarrays_to_parameters
from flwr.server import ServerApp, ServerAppComponents, ServerConfig
from flwr.server.strategy import FedAvg

from legacynumpy.task import init_weights, load_central_data, test


def get_evaluate_fn():
    """Return a callback that evaluates the global model on central data."""
    central = load_central_data()

    def evaluate(server_round, parameters_ndarrays, config):
        loss, accuracy = test(parameters_ndarrays, central)
        return loss, {"accuracy": accuracy}

    return evaluate


def weighted_average(metrics: List[Tuple[int, Metrics]]) -> Metrics:
    """Average the clients' accuracies, weighted by their number of examples."""
    total = sum(num_examples for num_examples, _ in metrics)
    accuracy = sum(num_examples * m["accuracy"] for num_examples, m in metrics)
    return {"accuracy": accuracy / total}


def fit_metrics(metrics: List[Tuple[int, Metrics]]) -> Metrics:
    """Average the clients' training losses, weighted by their number of examples."""
    total = sum(num_examples for num_examples, _ in metrics)
    loss = sum(num_examples * m["train_loss"] for num_examples, m in metrics)
    return {"train_loss": loss / total}


def server_fn(context: Context):
    """Create the components of the ServerApp."""
    num_rounds = context.run_config["num-server-rounds"]
    fraction_fit = context.run_config["fraction-fit"]
    lr = context.run_config["learning-rate"]
    hidden_units = context.run_config["hidden-units"]

    parameters = ndarrays_to_parameters(init_weights(hidden_units))

    strategy = FedAvg(
        fraction_fit=fraction_fit,
        fraction_evaluate=1.0,
        min_available_clients=2,
        initial_parameters=parameters,
        on_fit_config_fn=lambda server_round: {"lr": lr},
        evaluate_fn=get_evaluate_fn(),
        fit_metrics_aggregation_fn=fit_metrics,
        evaluate_metrics_aggregation_fn=weighted_average,
    )
    config = ServerConfig(num_rounds=num_rounds)

    return ServerAppComponents(strategy=strategy, config=config)


# Create ServerApp
app = ServerApp(server_fn=server_fn)
