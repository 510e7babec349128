"""What the observer reads off any app's messages (flotilla.runtime.observed), on real Flower records."""

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from flotilla.runtime.observed import message_round, record_bytes, reply_metrics, weighted_mean

pytestmark = pytest.mark.usefixtures("task_identity")  # (conftest) Messages are built here outside a run


def test_reply_metrics_from_metric_records_and_legacy_numpyclient_replies():
    msg_api = RecordDict({"metrics": MetricRecord({"train_loss": 0.5, "num-examples": 10}),
                          "arrays": ArrayRecord([np.zeros(3)])})
    assert reply_metrics(msg_api) == {"train_loss": 0.5, "num-examples": 10.0}
    legacy = RecordDict({"fitres.metrics": ConfigRecord({"acc": 0.9, "name": "x", "num_examples": 7})})
    got = reply_metrics(legacy)
    assert got["acc"] == 0.9 and got["num-examples"] == 7.0 and "name" not in got  # strings are not metrics


def test_record_bytes_counts_array_payloads_only():
    arrays = ArrayRecord([np.zeros(1000, dtype=np.float32)])
    content = RecordDict({"arrays": arrays, "config": ConfigRecord({"lr": 0.1})})
    assert 4000 <= record_bytes(content) < 4400 and record_bytes(None) == 0


def test_message_round_from_group_id_then_server_round_then_current():
    cfg = RecordDict({"config": ConfigRecord({"server-round": 4})})
    assert message_round(Message(cfg, dst_node_id=1, message_type="train", group_id=""), current=9) == 4
    assert message_round(Message(cfg, dst_node_id=1, message_type="train", group_id="3"), current=9) == 3
    assert message_round(Message(RecordDict(), dst_node_id=1, message_type="train", group_id=""), current=9) == 9


def test_weighted_mean_is_flowers_default_aggregation():
    rows = [{"loss": 1.0, "num-examples": 30}, {"loss": 3.0, "num-examples": 10}]
    assert weighted_mean(rows) == {"loss": pytest.approx(1.5)}
    assert weighted_mean([{"acc": 0.5}, {"acc": 1.0}]) == {"acc": pytest.approx(0.75)}  # no weights: plain mean
