"""Job files: good ones load with defaults, bad ones fail with one line naming the field."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from flotilla.job import JobError, format_memory, load_job, parse_memory
from flotilla.plan import format_node_config, make_plan

EXAMPLE = Path(__file__).parents[1] / "examples" / "mnist.yaml"
FLOTILLA = [sys.executable, "-m", "flotilla.cli"]


def write(tmp_path, doc) -> Path:
    p = tmp_path / "job.yaml"
    p.write_text(yaml.safe_dump(doc) if not isinstance(doc, str) else doc)
    return p


def base() -> dict:
    return {"name": "t", "devices": [{"name": "pi", "count": 2, "cpus": 0.5, "memory": "512m"}]}


def test_example_loads_and_plans():
    job = load_job(EXAMPLE)
    plan = make_plan(job)
    assert [d.name for d in plan.devices] == ["server-1", "server-2", "pi-1", "pi-2"]
    assert [d.partition_id for d in plan.devices] == [0, 1, 2, 3]
    assert {d.num_partitions for d in plan.devices} == {4}
    pi = plan.device("pi-1")
    assert pi.cpus == 0.5 and pi.memory == 768 * 2**20
    assert pi.train.batch_size == 16 and plan.device("server-1").train.batch_size == 32  # manual override


def test_defaults(tmp_path):
    job = load_job(write(tmp_path, base()))
    assert job.data.dataset == "mnist-5k" and job.data.partition.kind == "iid"
    assert job.rounds == 5 and job.target == "local" and job.strategy.min_devices == 2


@pytest.mark.parametrize(
    "change, field",
    [
        ({"rounds": 0}, "rounds"),
        ({"devices": [{"name": "Pi_1"}]}, "devices[0].name"),
        ({"devices": [{"name": "pi", "memory": "lots"}]}, "devices[0].memory"),
        ({"devices": [{"name": "pi", "cpus": -1}]}, "devices[0].cpus"),
        ({"data": {"partition": {"kind": "zipf"}}}, "data.partition.kind"),
        ({"data": {"test_fraction": 1.5}}, "data.test_fraction"),
        ({"data": {"dataset": "mnist"}}, "data"),
        ({"strategy": {"min_devices": 5}}, "strategy.min_devices"),
        ({"roundz": 3}, "roundz"),
        ({"target": "mars"}, "target"),
        ({"devices": []}, "devices"),
        ({"heterogeneity": {"throttle": [{"device": "nope-1", "at_s": 5, "cpus": 0.1}]}}, "throttle"),
        ({"heterogeneity": {"policy": "manual", "train_ahead": True}}, "heterogeneity.train_ahead"),
        ({"heterogeneity": {"policy": "auto", "train_ahead": "sometimes"}}, "heterogeneity.train_ahead"),
    ],
)
def test_bad_fields_are_named(tmp_path, change, field):
    doc = base() | change
    with pytest.raises(JobError) as e:
        load_job(write(tmp_path, doc))
    msg = str(e.value)
    assert "\n" not in msg and field in msg, msg


def test_missing_name_and_bad_yaml(tmp_path):
    with pytest.raises(JobError, match="name: required field is missing"):
        load_job(write(tmp_path, {"devices": [{"name": "pi"}]}))
    with pytest.raises(JobError, match="not valid YAML at line"):
        load_job(write(tmp_path, "name: [unclosed\n"))
    with pytest.raises(JobError, match="job file not found"):
        load_job(tmp_path / "missing.yaml")


def test_missing_data_path(tmp_path):
    doc = base() | {"data": {"dataset": "mnist", "path": "nowhere"}}
    with pytest.raises(JobError, match="data.path: .*nowhere is not a directory"):
        load_job(write(tmp_path, doc))


def test_memory_units():
    assert parse_memory("512m") == 512 * 2**20
    assert parse_memory("1.5g") == int(1.5 * 2**30)
    assert parse_memory("2GiB") == 2 * 2**30
    assert format_memory(768 * 2**20) == "768m"
    with pytest.raises(ValueError):
        parse_memory("12 parsecs")


def test_node_config_format_is_toml():
    from flwr.common.config import parse_config_args  # what flower-supernode uses on --node-config

    cfg = {"partition-id": 0, "device": "pi-1", "trainer": "/tmp/flotilla-x/trainer.sock", "lr": 0.02, "n": 4}
    assert parse_config_args([format_node_config(cfg)]) == cfg


@pytest.mark.parametrize("args", [["run"], ["render", "--target", "local"], ["submit"]])
def test_cli_bad_job_exit_2_one_line(tmp_path, args):
    p = write(tmp_path, base() | {"rounds": -1})
    res = subprocess.run(FLOTILLA + [args[0], str(p), *args[1:]], capture_output=True, text=True, cwd=tmp_path)
    assert res.returncode == 2
    assert "Traceback" not in res.stderr
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "rounds" in lines[0], res.stderr
    assert not (tmp_path / "runs").exists()  # nothing started, nothing written


def test_cli_schema_and_init(tmp_path):
    res = subprocess.run(FLOTILLA + ["schema"], capture_output=True, text=True, check=True)
    schema = json.loads(res.stdout)
    assert "devices" in schema["properties"] and "Partition" in json.dumps(schema)
    subprocess.run(FLOTILLA + ["init", str(tmp_path / "new")], capture_output=True, check=True)
    assert load_job(tmp_path / "new" / "job.yaml").name == "mnist-demo"


def test_cli_unknown_run(tmp_path):
    res = subprocess.run(FLOTILLA + ["status", "nope", "--runs-dir", str(tmp_path)], capture_output=True, text=True)
    assert res.returncode == 2 and "Traceback" not in res.stderr and "nope" in res.stderr
