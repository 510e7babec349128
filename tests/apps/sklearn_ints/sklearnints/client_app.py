"""sklearn-ints: A Flower / scikit-learn app (Message API)."""

import warnings

from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from sklearn.metrics import log_loss

from sklearnints.task import (
    UNIQUE_LABELS,
    create_model,
    get_model_params,
    load_data,
    set_model_params,
)

# Flower ClientApp
app = ClientApp()


@app.train()
def train(msg: Message, context: Context):
    """Run `local-epochs` iterations of lbfgs from the received parameters."""
    model = create_model(context.run_config["local-epochs"], context.run_config["reg-c"])
    set_model_params(model, msg.content["arrays"].to_numpy_ndarrays())

    partition_id = context.node_config["partition-id"]
    num_partitions = context.node_config["num-partitions"]
    X_train, y_train, _, _ = load_data(partition_id, num_partitions)

    # Ignore convergence warnings due to the few local iterations
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.fit(X_train, y_train)

    train_loss = log_loss(y_train, model.predict_proba(X_train), labels=UNIQUE_LABELS)

    metrics = MetricRecord({"train_loss": train_loss, "num-examples": len(X_train)})
    content = RecordDict(
        {"arrays": ArrayRecord(get_model_params(model)), "metrics": metrics}
    )
    return Message(content=content, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context):
    """Evaluate the received parameters on the local test split."""
    model = create_model(context.run_config["local-epochs"], context.run_config["reg-c"])
    set_model_params(model, msg.content["arrays"].to_numpy_ndarrays())

    partition_id = context.node_config["partition-id"]
    num_partitions = context.node_config["num-partitions"]
    _, _, X_test, y_test = load_data(partition_id, num_partitions)

    loss = log_loss(y_test, model.predict_proba(X_test), labels=UNIQUE_LABELS)
    accuracy = model.score(X_test, y_test)

    metrics = MetricRecord(
        {"loss": loss, "accuracy": accuracy, "num-examples": len(X_test)}
    )
    return Message(content=RecordDict({"metrics": metrics}), reply_to=msg)
