import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

FLOTILLA = [sys.executable, "-m", "flotilla.cli"]


def processes_of(run_dir: Path) -> list[str]:
    """Live processes that belong to a run: anything with its FLWR_HOME, or its path on the command line."""
    marker = f"FLWR_HOME={run_dir}/flwr".encode()
    found = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry.name}/environ", "rb") as fh:
                env = fh.read()
            with open(f"/proc/{entry.name}/cmdline", "rb") as fh:
                cmd = fh.read().replace(b"\0", b" ")
            with open(f"/proc/{entry.name}/stat") as fh:
                if fh.read().rsplit(")", 1)[1].split()[0] == "Z":
                    continue
        except OSError:
            continue
        if marker in env or str(run_dir).encode() in cmd:
            found.append(f"{entry.name}: {cmd.decode(errors='replace')[:120]}")
    return found


def cgroups_of(run_id: str) -> list[str]:
    return [str(p) for p in Path("/sys/fs/cgroup").glob(f"*/**/flotilla/{run_id}")]


@pytest.fixture
def job_file(tmp_path):
    def make(**over) -> Path:
        doc = {
            "name": "e2e",
            "rounds": 2,
            "train": {"batch_size": 32, "lr": 0.02, "local_epochs": 1},
            "strategy": {"min_devices": 1},
            "devices": [{"name": "dev", "count": 2, "cpus": 1.0, "memory": "1g"}],
            "runs_dir": str(tmp_path / "runs"),
        }
        doc.update(over)
        p = tmp_path / "job.yaml"
        p.write_text(yaml.safe_dump(doc))
        return p

    return make


def flotilla(*args, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(FLOTILLA + [str(a) for a in args], capture_output=True, text=True, **kw)


def wait_until(pred, timeout: float, what: str, step: float = 0.5):
    end = time.time() + timeout
    while time.time() < end:
        v = pred()
        if v:
            return v
        time.sleep(step)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


@pytest.fixture
def task_identity():
    """Flower stamps every Message with the running task's identity (set by flwr-serverapp in a real run)."""
    from flwr.supercore.task_identity import TaskIdentity

    saved = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    yield
    TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = saved
