"""A fleet's start-up: what the devices report before any message, the ServerApp held until the fleet is there,
and the warm-up the zygote does once so that no device does it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from flotilla.app.server_app import recorded_capabilities
from flotilla.contracts import RUN_CONFIG_FILE, RecordPaths
from flotilla.runtime.preload import mark_ready, read_ready


def _device(nodes: Path, name: str, node_id: int, capability: dict | None, monkeypatch) -> None:
    (nodes / f"{name}.json").write_text(json.dumps({"device": name, "class": name.split("-")[0], "node_id": node_id}))
    monkeypatch.setenv("FLOTILLA_READY_FILE", str(nodes / f"{name}.ready"))
    mark_ready("trainer ready", **({"capability": capability} if capability else {}))


def test_recorded_capabilities_are_those_of_the_connected_nodes_that_reported_one(tmp_path, monkeypatch):
    paths = RecordPaths(tmp_path)
    paths.nodes.mkdir()
    cap = {"pid": 1, "threads": 1, "cpus": 0.25, "memory": 2**29, "throughput_sps": None, "partition_size": 40}
    _device(paths.nodes, "pi-1", 11, cap, monkeypatch)
    _device(paths.nodes, "pi-2", 12, None, monkeypatch)  # a ready file without a capability: asked by query
    _device(paths.nodes, "pi-3", 13, cap | {"cpus": 0.5}, monkeypatch)  # not connected (any more)
    got = recorded_capabilities(paths, [11, 12])
    assert list(got) == [11]
    row = got[11]
    assert row["name"] == "pi-1" and row["class"] == "pi" and row["node_id"] == 11
    assert row["cpus"] == 0.25 and row["memory"] == 2**29 and row["partition_size"] == 40 and row["threads"] == 1
    assert row["t"] == read_ready(paths.nodes / "pi-1.ready")["t"]


def test_the_trainer_reports_at_start_up_what_the_query_would_have(tmp_path):
    """Its partition is the one the run's config and its node config name (loaded then, not in round 1)."""
    from flotilla.app.trainer import Trainer, startup_capability, startup_config
    from flotilla.data import load_partition
    from flotilla.job import parse_job
    from flotilla.plan import format_node_config, make_plan
    from flotilla.submit import create_run, write_run_config

    job = parse_job({"name": "caps", "rounds": 1, "runs_dir": str(tmp_path),
                     "data": {"dataset": "digits", "partition": {"kind": "iid", "seed": 3}},
                     "devices": [{"name": "pi", "count": 3, "cpus": 0.5, "memory": "512m"}]})
    plan = make_plan(job)
    run = create_run(job, "local", tmp_path)
    assert write_run_config(plan, run) == RecordPaths(run.dir).run_config
    dev = plan.devices[2]
    cfg = startup_config(str(run.dir), format_node_config(dev.node_config()))
    cap = startup_capability(Trainer(threads=1), cfg)
    pid = int(dev.node_config()["partition-id"])
    x, _ = load_partition("digits", None, float(cfg["test-fraction"]), "iid", 0.5, 2, 3, pid, 3)
    assert cap["partition_size"] == len(x) > 0
    assert {"cpus", "memory", "threads", "throughput_sps"} <= set(cap)
    assert startup_config(str(tmp_path / "no-such-record"), "") is None  # then the server asks by query


def test_the_trainers_config_parsing_matches_flwrs_without_importing_flwr(tmp_path):
    """A trainer outside a zygote imports torch, not flwr (~33 MB more per device in the unshared layout)."""
    from flwr.common.config import parse_config_args

    (tmp_path / RUN_CONFIG_FILE).write_text('lr = 0.05\nname = "a b"\n[train]\nepochs = 2\nfast = true\n')
    node = 'partition-id=3 num-partitions=10 device="pi-4" label=\'x y\' ratio=0.5'
    code = ("import sys, json; from flotilla.app.trainer import startup_config; "
            f"print(json.dumps(startup_config({str(tmp_path)!r}, {node!r}))); "
            "print(any(m == 'flwr' or m.startswith('flwr.') for m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split("\n")
    want = parse_config_args([str(tmp_path / RUN_CONFIG_FILE)]) | parse_config_args([node])
    assert json.loads(out[0]) == want and want["train.epochs"] == 2 and want["label"] == "x y"
    assert out[1] == "False"


HELD_APP = """
import sys, threading, time
from pathlib import Path
from flwr.serverapp import ServerApp
from flotilla.contracts import RUN_CONFIG_FILE, RecordPaths
from flotilla.runtime.serverapp import hold_until_fleet

paths, lease = RecordPaths(Path(sys.argv[1])), sys.argv[2]
assert hold_until_fleet(paths, lease)
app = ServerApp()
ran = threading.Event()

@app.main()
def main(grid, context):
    ran.set()

out = threading.Lock()

def emit(line):  # one line, one write, under a lock: lines of the two threads never interleave
    with out:
        sys.stdout.write(line + "\\n")
        sys.stdout.flush()

def call():
    try:
        app(grid=None, context=None)
    except RuntimeError as err:
        emit(f"refused: {err}")

t = threading.Thread(target=call)
emit("started")
t.start()
t.join(60)
emit("ran" if ran.is_set() else "did not run")
"""


def _held(tmp_path: Path, lease: Path) -> subprocess.Popen:
    script = tmp_path / "held.py"
    script.write_text(HELD_APP)
    return subprocess.Popen([sys.executable, str(script), str(tmp_path), str(lease)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def test_a_held_app_starts_once_the_driver_says_the_fleet_is_connected(tmp_path):
    lease = tmp_path / "owner.lease"
    lease.touch()
    proc = _held(tmp_path, lease)
    try:
        assert proc.stdout.readline().strip() == "started"
        time.sleep(1.0)  # it must not run meanwhile: nothing it waits for has happened
        assert proc.poll() is None
        RecordPaths(tmp_path).fleet.write_text("{}")
        out, _ = proc.communicate(timeout=60)
        assert "the fleet is connected; the app starts" in out and out.strip().endswith("ran"), out
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _stale_lease(tmp_path: Path) -> Path:
    from flotilla.contracts import OWNER_TIMEOUT_S

    lease = tmp_path / "owner.lease"
    lease.touch()
    old = time.time() - OWNER_TIMEOUT_S - 5
    os.utime(lease, (old, old))  # the driver was SIGKILLed before the fleet came up
    return lease


def test_a_held_app_whose_driver_is_gone_does_not_start(tmp_path):
    proc = _held(tmp_path, _stale_lease(tmp_path))
    out, _ = proc.communicate(timeout=60)
    assert out.splitlines() == ["started", f"refused: the run's driver is gone (its lease {tmp_path / 'owner.lease'} "
                                "is stale); not starting the app", "did not run"], out


def test_a_held_app_whose_driver_is_gone_does_not_start_on_a_busy_machine(tmp_path):
    """Twenty times in a row while every core is kept busy (the refusal once interleaved with "started")."""
    burners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(os.cpu_count() or 2)]
    try:
        for i in range(20):
            d = tmp_path / str(i)
            d.mkdir()
            proc = _held(d, _stale_lease(d))
            out, _ = proc.communicate(timeout=120)
            assert out.splitlines()[0] == "started" and out.splitlines()[-1] == "did not run", (i, out)
            assert len(out.splitlines()) == 3 and out.splitlines()[1].startswith("refused: the run's driver is gone"), (
                i, out)
    finally:
        for b in burners:
            b.kill()
            b.wait()


ROUTES = """
import fastapi.routing as fr
import flwr.supernode.main as sm
from starlette.testclient import TestClient
from flotilla.runtime.zygote import prime_routes

primed = prime_routes(sm.app) if PRIME else 0
built = []
shipped = fr._IncludedRouter._build_effective_context
fr._IncludedRouter._build_effective_context = lambda self, route: built.append(route) or shipped(self, route)
TestClient(sm.app).post("/no-such-route", content=b"")
print(primed, len(built))
"""


def test_the_zygote_works_out_the_supernodes_routes_once_for_every_fork():
    out = {}
    for prime in (False, True):
        res = subprocess.run([sys.executable, "-W", "ignore", "-c", f"PRIME = {prime}\n" + ROUTES],
                             capture_output=True, text=True, timeout=120)
        assert res.returncode == 0, res.stderr[-2000:]
        out[prime] = [int(v) for v in res.stdout.split()]
    assert out[False][1] > 0  # unprimed, the first request works the routes out
    assert out[True][0] > 0 and out[True][1] == 0  # primed: nothing left to work out


def test_disabled_telemetry_builds_no_event():
    code = ("import resource\n"
            "from flwr.supercore import telemetry as t\n"
            "from flotilla.runtime.engine_tuning import skip_unsent_telemetry\n"
            "assert skip_unsent_telemetry()\n"
            "print(t.event(t.EventType.FLWR_CLIENTAPP_RUN_ENTER).result(timeout=10))\n"
            "c = resource.getrusage(resource.RUSAGE_CHILDREN)\n"
            "print(c.ru_utime + c.ru_stime)\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env=os.environ | {"FLWR_TELEMETRY_ENABLED": "0", "FLWR_TELEMETRY_LOGGING": "0"})
    assert res.returncode == 0, res.stderr[-2000:]
    result, child_cpu = res.stdout.split()
    assert result == "disabled" and float(child_cpu) == 0.0  # no `file` process ran for the payload


def test_the_run_config_is_the_plans(tmp_path):
    from flotilla.job import parse_job
    from flotilla.plan import make_plan
    from flotilla.submit import create_run, write_run_config

    job = parse_job({"name": "cfg", "rounds": 3, "runs_dir": str(tmp_path),
                     "devices": [{"name": "pi", "count": 2, "cpus": 0.5}]})
    run = create_run(job, "local", tmp_path)
    path = write_run_config(make_plan(job), run)
    import tomllib

    assert tomllib.loads(path.read_text()) == make_plan(job).run_config()  # what the trainer reads at start-up
