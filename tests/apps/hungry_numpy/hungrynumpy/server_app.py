"""hungry-numpy: ServerApp, with Flower's FedAvg or with its own push/pull loop."""

import time

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

from hungrynumpy.task import accuracy, initial_model, load_data

app = ServerApp()


def central_eval(server_round: int, arrays: ArrayRecord) -> MetricRecord:
    x, y = load_data(999, 1)
    return MetricRecord({"accuracy": accuracy(arrays.to_numpy_ndarrays(), x, y)})


def own_loop(grid: Grid, num_rounds: int, timeout_s: float = 600.0) -> None:
    """FedAvg by hand: push a train message to every node, pull until all replied, average the good ones."""
    model = initial_model()
    for server_round in range(1, num_rounds + 1):
        content = RecordDict({"arrays": ArrayRecord(model), "config": ConfigRecord({"server-round": server_round})})
        messages = [Message(content=content, message_type=MessageType.TRAIN, dst_node_id=node,
                            group_id=str(server_round)) for node in grid.get_node_ids()]
        pending = set(grid.push_messages(messages))
        replies, end = [], time.time() + timeout_s
        while pending and time.time() < end:
            for reply in grid.pull_messages(pending):
                pending.discard(reply.metadata.reply_to_message_id)
                replies.append(reply)
            time.sleep(0.2)
        good = [r for r in replies if not r.has_error()]
        print(f"round {server_round}: {len(good)} of {len(messages)} replies usable "
              f"({len(replies) - len(good)} errors, {len(pending)} missing)")
        if good:
            weights = [r.content["metrics"]["num-examples"] for r in good]
            arrays = [r.content["arrays"].to_numpy_ndarrays() for r in good]
            model = [np.average([a[i] for a in arrays], axis=0, weights=weights) for i in range(len(model))]
        print(f"round {server_round}: central accuracy {accuracy(model, *load_data(999, 1)):.3f}")


@app.main()
def main(grid: Grid, context: Context) -> None:
    num_rounds = context.run_config["num-server-rounds"]
    if context.run_config["server-loop"] == "own":
        own_loop(grid, num_rounds)
        return
    strategy = FedAvg(fraction_train=1.0, fraction_evaluate=0.0)
    strategy.start(grid=grid, initial_arrays=ArrayRecord(initial_model()),
                   train_config=ConfigRecord({"lr": context.run_config["lr"]}), num_rounds=num_rounds,
                   evaluate_fn=central_eval)
