"""other-metric: A Flower / NumPy app (Message API) with eval_acc / eval_loss."""

import datetime
import os

from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from othermetric.task import load_data
from othermetric.task import test as test_fn
from othermetric.task import train as train_fn

app = ClientApp()


@app.train()
def train(msg: Message, context: Context):
    partition_id = context.node_config["partition-id"]
    num_partitions = context.node_config["num-partitions"]
    x_train, y_train, _, _ = load_data(partition_id, num_partitions)

    model, train_loss = train_fn(
        msg.content["arrays"].to_numpy_ndarrays(),
        x_train,
        y_train,
        epochs=context.run_config["local-epochs"],
        lr=context.run_config["lr"],
        shuffle=context.run_config["shuffle"],
    )

    # Keep a local log of the rounds this node took part in (relative path: the
    # ClientApp's working directory)
    server_round = msg.content["config"]["server-round"]
    with open(context.run_config["rounds-file"], "a", encoding="utf-8") as f:
        f.write(
            f"{datetime.datetime.now().isoformat()} round={server_round} "
            f"partition={partition_id} pid={os.getpid()} train_loss={train_loss:.4f}\n"
        )

    metrics = MetricRecord({"train_loss": train_loss, "num-examples": len(x_train)})
    return Message(
        content=RecordDict({"arrays": ArrayRecord(model), "metrics": metrics}),
        reply_to=msg,
    )


@app.evaluate()
def evaluate(msg: Message, context: Context):
    partition_id = context.node_config["partition-id"]
    num_partitions = context.node_config["num-partitions"]
    _, _, x_val, y_val = load_data(partition_id, num_partitions)

    eval_loss, eval_acc = test_fn(msg.content["arrays"].to_numpy_ndarrays(), x_val, y_val)

    metrics = MetricRecord(
        {"eval_loss": eval_loss, "eval_acc": eval_acc, "num-examples": len(x_val)}
    )
    return Message(content=RecordDict({"metrics": metrics}), reply_to=msg)
