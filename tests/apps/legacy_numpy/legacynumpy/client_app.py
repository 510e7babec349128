"""legacy-numpy: A Flower / NumPy app (legacy client_fn / server_fn API)."""

from flwr.client import ClientApp, NumPyClient
from flwr.common import Context

from legacynumpy.task import init_weights, load_data, test, train


class FlowerClient(NumPyClient):
    def __init__(self, trainset, valset, local_epochs, hidden_units):
        self.trainset = trainset
        self.valset = valset
        self.local_epochs = local_epochs
        self.hidden_units = hidden_units

    def get_parameters(self, config):
        return init_weights(self.hidden_units)

    def fit(self, parameters, config):
        """Train the global weights on the local training split."""
        weights, train_loss = train(
            parameters, self.trainset, self.local_epochs, config["lr"]
        )
        return weights, len(self.trainset[0]), {"train_loss": train_loss}

    def evaluate(self, parameters, config):
        """Evaluate the global weights on the local validation split."""
        loss, accuracy = test(parameters, self.valset)
        return loss, len(self.valset[0]), {"accuracy": accuracy}


def client_fn(context: Context):
    """Construct a Client for this node's partition."""
    partition_id = context.node_config["partition-id"]
    num_partitions = context.node_config["num-partitions"]
    trainset, valset = load_data(partition_id, num_partitions)
    local_epochs = context.run_config["local-epochs"]
    hidden_units = context.run_config["hidden-units"]
    return FlowerClient(trainset, valset, local_epochs, hidden_units).to_client()


# Flower ClientApp
app = ClientApp(client_fn=client_fn)
