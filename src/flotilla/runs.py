"""Run records: `runs/<run-id>/`, the one place every target writes to.

Layout:
    job.yaml        the job as its file set it (relative paths resolved)
    plan.json       the expanded devices
    state.json      status, target, controller pid, process groups, ports
    logs/<proc>.log one log per process (superlink, each device, flwr run)
    metrics.jsonl   one line per round (written by the ServerApp)
    devices.jsonl   per-device capability reports
    weights.npz     final global model
    summary.json    the run's summary (also `--json`'s last line)
"""

from __future__ import annotations

import json
import os
import secrets
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from flotilla.errors import UserError

STATE_FILE = "state.json"
TERMINAL = ("completed", "failed", "stopped")


class RunNotFound(UserError, LookupError):
    pass


def new_run_id(job_name: str) -> str:
    return f"{job_name}-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}"


@dataclass
class RunRecord:
    dir: Path

    @property
    def run_id(self) -> str:
        return self.dir.name

    @property
    def logs(self) -> Path:
        return self.dir / "logs"

    @property
    def metrics_path(self) -> Path:
        return self.dir / "metrics.jsonl"

    @property
    def devices_path(self) -> Path:
        return self.dir / "devices.jsonl"

    @property
    def summary_path(self) -> Path:
        return self.dir / "summary.json"

    @classmethod
    def create(cls, runs_dir: Path, run_id: str, job_doc: dict, plan_doc: dict) -> "RunRecord":
        d = Path(runs_dir).resolve() / run_id
        (d / "logs").mkdir(parents=True, exist_ok=False)
        rec = cls(d)
        (d / "job.yaml").write_text(yaml.safe_dump(job_doc, sort_keys=False))
        (d / "plan.json").write_text(json.dumps(plan_doc, indent=2))
        rec.write_state(status="starting", created=time.time())
        return rec

    # -- state --------------------------------------------------------------
    def state(self) -> dict:
        try:
            return json.loads((self.dir / STATE_FILE).read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return {}

    def write_state(self, **updates) -> dict:
        st = self.state() | updates
        write_json(self.dir / STATE_FILE, st, indent=2)
        return st

    # -- records ------------------------------------------------------------
    def rounds(self) -> list[dict]:
        return read_jsonl(self.metrics_path)

    def device_reports(self) -> list[dict]:
        return read_jsonl(self.devices_path)

    def plan(self) -> dict:
        return json.loads((self.dir / "plan.json").read_text())

    def summary(self) -> dict | None:
        try:
            return json.loads(self.summary_path.read_text())
        except FileNotFoundError:
            return None

    def log_path(self, proc: str) -> Path:
        return self.logs / f"{proc}.log"


def read_jsonl(path: Path) -> list[dict]:
    out = []
    try:
        with open(path) as fh:
            for line in fh:
                line = line.strip()
                if line:
                    try:
                        out.append(json.loads(line))
                    except json.JSONDecodeError:
                        pass  # a line being written right now
    except FileNotFoundError:
        pass
    return out


class JsonlTail:
    """New complete lines of a JSONL file that is being appended to (remembers its offset: cheap to poll)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._offset = 0
        self._partial = b""

    def read_new(self) -> list[dict]:
        try:
            size = self.path.stat().st_size
        except FileNotFoundError:
            return []
        if size < self._offset:  # rewritten from scratch: start over
            self._offset, self._partial = 0, b""
        if size == self._offset:
            return []
        with open(self.path, "rb") as fh:
            fh.seek(self._offset)
            chunk = fh.read(size - self._offset)
        self._offset += len(chunk)
        *lines, self._partial = (self._partial + chunk).split(b"\n")  # the last piece is still being written
        out = []
        for line in lines:
            if line.strip():
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError:
                    pass  # not a record: skip it
        return out


def write_json(path: Path, doc, indent: int | None = None) -> None:
    """Atomically (a temporary file renamed over it): a reader in another process never sees half a file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_text(json.dumps(doc, indent=indent))
    os.replace(tmp, path)


def append_jsonl(path: Path, record: dict) -> None:
    with open(path, "a") as fh:
        fh.write(json.dumps(record) + "\n")


def find_run(runs_dir: Path, run: str | None) -> RunRecord:
    """A run by id (or unique prefix, or path); the newest when `run` is None."""
    runs_dir = Path(runs_dir)
    if run and Path(run).is_dir() and (Path(run) / STATE_FILE).exists():
        return RunRecord(Path(run).resolve())
    if not runs_dir.is_dir():
        raise RunNotFound(f"no runs under {runs_dir}; start one with `flotilla run JOB`")
    candidates = [p for p in runs_dir.iterdir() if (p / STATE_FILE).exists()]
    if run is None:
        if not candidates:
            raise RunNotFound(f"no runs under {runs_dir}; start one with `flotilla run JOB`")
        return RunRecord(max(candidates, key=lambda p: RunRecord(p).state().get("created", 0)).resolve())
    exact = [p for p in candidates if p.name == run]
    matches = exact or [p for p in candidates if p.name.startswith(run)]
    if len(matches) != 1:
        what = "no run" if not matches else f"{len(matches)} runs"
        raise RunNotFound(f"{what} matching {run!r} under {runs_dir}; `flotilla status` lists runs")
    return RunRecord(matches[0].resolve())


def list_runs(runs_dir: Path) -> list[RunRecord]:
    runs_dir = Path(runs_dir)
    if not runs_dir.is_dir():
        return []
    recs = [RunRecord(p.resolve()) for p in runs_dir.iterdir() if (p / STATE_FILE).exists()]
    return sorted(recs, key=lambda r: r.state().get("created", 0))
