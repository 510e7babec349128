"""msg-numpy: A Flower / NumPy app (Message API)."""

from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from msgnumpy.task import load_data
from msgnumpy.task import test as test_fn
from msgnumpy.task import train as train_fn

# Flower ClientApp
app = ClientApp()


@app.train()
def train(msg: Message, context: Context):
    """Train the received model on this node's partition."""
    model = msg.content["arrays"].to_numpy_ndarrays()

    partition_id = context.node_config["partition-id"]
    num_partitions = context.node_config["num-partitions"]
    x_train, y_train, _, _ = load_data(partition_id, num_partitions)

    model, train_loss = train_fn(
        model,
        x_train,
        y_train,
        epochs=context.run_config["local-epochs"],
        lr=msg.content["config"]["lr"],
    )

    metrics = MetricRecord({"train_loss": train_loss, "num-examples": len(x_train)})
    content = RecordDict({"arrays": ArrayRecord(model), "metrics": metrics})
    return Message(content=content, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context):
    """Evaluate the received model on this node's validation split."""
    model = msg.content["arrays"].to_numpy_ndarrays()

    partition_id = context.node_config["partition-id"]
    num_partitions = context.node_config["num-partitions"]
    _, _, x_val, y_val = load_data(partition_id, num_partitions)

    loss, accuracy = test_fn(model, x_val, y_val)

    metrics = MetricRecord(
        {"loss": loss, "accuracy": accuracy, "num-examples": len(x_val)}
    )
    return Message(content=RecordDict({"metrics": metrics}), reply_to=msg)
