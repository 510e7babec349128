"""plain-noop ClientApp: imports only flwr, so a fresh ClientApp process costs the least."""

from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

app = ClientApp()


@app.train()
def train(msg: Message, context: Context):
    """Echo the received arrays back unchanged: no training."""
    content = RecordDict(
        {
            "arrays": msg.content["arrays"],
            "metrics": MetricRecord({"num-examples": 1, "train-s": 0.0}),
            # bench instrumentation: the device name, as in the baseline
            "device": ConfigRecord({"device": str(context.node_config.get("device", ""))}),
        }
    )
    return Message(content=content, reply_to=msg)
