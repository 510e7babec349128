"""mnist-auto: A Flower / PyTorch app."""

from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from flotilla.client import Budget
from mnistauto.task import Net, load_data, load_test
from mnistauto.task import test as test_fn
from mnistauto.task import train as train_fn

# Flower ClientApp
app = ClientApp()


@app.train()
def train(msg: Message, context: Context):
    """Train the model on local data, as much as this round's budget says."""
    cfg = context.run_config
    # The round's work: Flotilla's auto policy sizes it per device; without it, the app's own settings
    budget = Budget.from_message(
        msg, context, batch_size=cfg["batch-size"], lr=cfg["lr"], local_epochs=cfg["local-epochs"]
    )

    model = Net()
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())

    partition_id = context.node_config["partition-id"]
    num_partitions = context.node_config["num-partitions"]
    server_round = msg.content["config"].get("server-round", 0)
    trainloader = load_data(partition_id, num_partitions, budget.batch_size, seed=1000 * partition_id + server_round)

    # budget.batches: epoch after epoch until the round's steps are done or its deadline has passed
    train_loss = train_fn(model, budget.batches(trainloader), budget.lr, proximal_mu=budget.proximal_mu)

    metrics = budget.metrics(len(trainloader.dataset), train_loss=train_loss)
    content = RecordDict({"arrays": ArrayRecord(model.state_dict()), "metrics": MetricRecord(metrics)})
    return Message(content=content, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context):
    """Evaluate the model on this device's share of the held-out images."""
    model = Net()
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    images, labels = load_test()
    partition_id = context.node_config["partition-id"]
    num_partitions = context.node_config["num-partitions"]
    share = slice(partition_id, None, num_partitions)
    loss, accuracy = test_fn(model, images[share], labels[share])
    metrics = MetricRecord({"loss": loss, "accuracy": accuracy, "num-examples": len(labels[share])})
    return Message(content=RecordDict({"metrics": metrics}), reply_to=msg)
