"""fixed-rounds: A Flower / NumPy app whose round count is fixed in code."""

from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fixedrounds.task import evaluate as evaluate_fn
from fixedrounds.task import load_data
from fixedrounds.task import train as train_fn

app = ClientApp()


@app.train()
def train(msg: Message, context: Context):
    model = msg.content["arrays"].to_numpy_ndarrays()
    x, y, _, _ = load_data(
        context.node_config["partition-id"], context.node_config["num-partitions"]
    )
    model, loss = train_fn(
        model, x, y, steps=context.run_config["local-steps"], lr=context.run_config["lr"]
    )
    metrics = MetricRecord({"train_loss": loss, "num-examples": len(x)})
    return Message(
        content=RecordDict({"arrays": ArrayRecord(model), "metrics": metrics}),
        reply_to=msg,
    )


@app.evaluate()
def evaluate(msg: Message, context: Context):
    w, b = msg.content["arrays"].to_numpy_ndarrays()
    _, _, x, y = load_data(
        context.node_config["partition-id"], context.node_config["num-partitions"]
    )
    loss, accuracy = evaluate_fn(w, b, x, y)
    metrics = MetricRecord({"loss": loss, "accuracy": accuracy, "num-examples": len(x)})
    return Message(content=RecordDict({"metrics": metrics}), reply_to=msg)
