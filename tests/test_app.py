"""The built-in app's pieces: model training/evaluation, the warm trainer over its socket, a thin ClientApp."""

import subprocess
import sys
import time
from multiprocessing.connection import Client

import numpy as np
import pytest
import torch

from flotilla.app.task import Net, evaluate, get_weights, set_weights, steps_for, to_tensors, train
from flotilla.data import load_partition, load_test

CFG = {
    "dataset": "mnist-5k", "data-path": "", "test-fraction": 0.2, "partition": "iid", "alpha": 0.5,
    "shards-per-device": 2, "partition-seed": 42, "partition-id": 0, "num-partitions": 2,
    "batch-size": 32, "lr": 0.02, "momentum": 0.9, "local-epochs": 1.0, "seed": 0, "server-round": 1,
}


@pytest.fixture(scope="module")
def data():
    torch.set_num_threads(1)
    x, y = to_tensors(*load_partition("mnist-5k", None, 0.2, "iid", 0.5, 2, 42, 0, 2))
    xt, yt = to_tensors(*load_test("mnist-5k", None, 0.2, 42))
    return x, y, xt, yt


def test_train_then_evaluate_beats_chance(data):
    x, y, xt, yt = data
    torch.manual_seed(0)
    model = Net()
    loss0, acc0 = evaluate(model, xt, yt)
    res = train(model, x, y, batch_size=32, lr=0.02, momentum=0.9, steps=steps_for(len(x), 32, 1.0), seed=1)
    loss1, acc1 = evaluate(model, xt, yt)
    assert res["steps"] == steps_for(len(x), 32, 1.0) and res["samples"] == res["steps"] * 32
    assert acc0 < 0.3 and acc1 > 0.8 and loss1 < loss0


def test_deadline_gives_partial_work(data):
    x, y, *_ = data
    res = train(Net(), x, y, batch_size=32, lr=0.02, momentum=0.9, steps=10_000, seed=1, deadline_s=0.3)
    assert 0 < res["steps"] < 10_000 and res["train_s"] < 3


def test_weights_round_trip():
    a, b = Net(), Net()
    keys, arrays = get_weights(a)
    set_weights(b, keys, arrays)
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))


def test_warm_trainer_over_its_socket(tmp_path):
    sock = str(tmp_path / "t.sock")
    proc = subprocess.Popen([sys.executable, "-m", "flotilla.app.trainer", "--socket", sock, "--threads", "1"])
    try:
        end = time.time() + 60
        while not (tmp_path / "t.sock").exists():
            assert proc.poll() is None and time.time() < end
            time.sleep(0.05)
        keys, arrays = get_weights(Net())

        def call(op, payload=None):
            with Client(sock, family="AF_UNIX") as c:
                c.send((op, payload))
                return c.recv()

        status, (out, res) = call("train", {"keys": keys, "arrays": arrays, "config": CFG})
        assert status == "ok" and len(out) == len(arrays)
        assert any(not np.array_equal(o, a) for o, a in zip(out, arrays))
        assert res["partition_size"] == 2000 and res["steps"] == 63
        status, cap = call("capability")
        assert status == "ok" and cap["throughput_sps"] > 0 and cap["threads"] == 1
        status, msg = call("train", {"keys": keys, "arrays": arrays, "config": {}})  # bad request
        assert status == "error" and "KeyError" in msg
        assert call("ping") == ("ok", "pong")  # still serving after an error
    finally:
        proc.terminate()
        proc.wait(10)


def test_client_app_imports_no_torch():
    code = ("import sys, flotilla.app.client_app; "
            "print(sorted(m for m in ('torch','mlxtend','sklearn','pandas') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_train_ahead_carries_progress_onto_the_next_global_model():
    from flotilla.app.trainer import Trainer

    trainer = Trainer(threads=1)
    keys, w0 = get_weights(Net())
    cfg = CFG | {"train-ahead": 1, "local-steps": 5}
    out, res = trainer.train(keys, w0, cfg)
    assert res["ahead_steps"] == 0 and res["steps"] == 5  # nothing trained ahead before the first message
    sent = [a.copy() for a in out]
    trainer.after_reply()  # the reply is out: the device trains on instead of idling
    wait_until = time.time() + 30
    while trainer._ahead.result["steps"] == 0 and time.time() < wait_until:
        time.sleep(0.05)
    time.sleep(0.3)
    assert all(np.array_equal(o, s) for o, s in zip(out, sent)), "the reply's arrays changed under training ahead"

    # the next round's global model: the progress made meanwhile is carried onto it, and counted
    _, w1 = get_weights(Net())
    ahead = trainer._ahead
    at_stop = {}
    finish = ahead.finish

    def finish_and_look():
        delta, result = finish()
        at_stop.update({k: t.detach().numpy().copy() for k, t in ahead.model.state_dict().items()})
        return delta, result

    ahead.finish = finish_and_look
    out2, res2 = trainer.train(keys, w1, cfg | {"local-steps": 1, "lr": 0.0})  # lr 0: the round itself moves nothing
    assert not ahead.thread.is_alive()
    assert res2["ahead_steps"] > 0 and res2["ahead_s"] > 0 and res2["ahead_samples"] == 32 * res2["ahead_steps"]
    assert res2["ahead_steps"] <= 16 * 5  # bounded by the last round's own steps
    # carried = what the device trained past its reply: (model when stopped) - (model it replied with)
    for o2, a, k, s in zip(out2, w1, keys, sent):
        assert np.allclose(o2 - a, at_stop[k] - s, atol=1e-6)
    assert any(np.abs(at_stop[k] - s).max() > 0 for k, s in zip(keys, sent))

    # without train-ahead the next round starts from the global model alone
    trainer.after_reply()
    out3, res3 = trainer.train(keys, w1, CFG | {"local-steps": 1, "lr": 0.0})
    assert res3["ahead_steps"] == 0
    assert all(np.array_equal(o, a) for o, a in zip(out3, w1))
