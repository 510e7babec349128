"""A run's record and its Flower run: create the record, write the flwr connection, submit the app.

The app is submitted with the `flwr` CLI, as a user would (it builds the FAB
from the app directory); the run config file holds only what the Plan says
the app gets.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

from flotilla.appspec import BUILTIN_FAB
from flotilla.contracts import RecordPaths
from flotilla.errors import RunFailure
from flotilla.job import Job
from flotilla.plan import Plan, format_node_config, make_plan
from flotilla.runs import RunRecord, new_run_id
from flotilla.targets import Federation

CONNECTION = "flotilla"


def create_run(job: Job, target: str, runs_dir: Path | None = None, run_id: str | None = None,
               target_options: dict | None = None) -> RunRecord:
    plan = make_plan(job)
    # job.yaml holds what the job file set (paths resolved): readers tell a user's choice from a default
    # (flotilla.strategy.Auto takes the job's train values only where they were set); plan.json has it all.
    rec = RunRecord.create(Path(runs_dir or job.runs_dir), run_id or new_run_id(job.name),
                           job.model_dump(mode="json", exclude_unset=True), plan.to_dict())
    rec.write_state(target=target, target_options=target_options or {}, job_name=job.name,
                    rounds=plan.target_rounds(), devices=[d.name for d in plan.devices], app=plan.app.name)
    return rec


def app_dir_for(job: Job, run: RunRecord) -> Path:
    """The Flower App directory to submit (a copy: `flwr run` may rewrite its pyproject)."""
    src = BUILTIN_FAB if job.builtin_app else Path(job.app)
    dst = run.dir / "app"
    if not dst.exists():
        shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__", ".venv", "*.pyc", "runs"))
    return dst


def write_flwr_config(flwr_home: Path, fed: Federation) -> None:
    flwr_home.mkdir(parents=True, exist_ok=True)
    lines = [f"[superlink.{CONNECTION}]", f'address = "{fed.control_address}"']
    if fed.insecure:
        lines.append("insecure = true")
    elif fed.root_certificates:
        lines.append(f'root-certificates = "{fed.root_certificates}"')
    (flwr_home / "config.toml").write_text("\n".join(lines) + "\n")


def run_config_toml(cfg: dict) -> str:
    return "\n".join(f"{k} = {format_node_config({k: v}).split('=', 1)[1]}" for k, v in cfg.items()) + "\n"


def write_run_config(plan: Plan, run: RunRecord) -> Path | None:
    """The run config file `flwr run` gets; written before the fleet starts, so the built-in trainer can load
    its partition and report its capability as it starts."""
    cfg = plan.run_config()
    if not cfg:
        return None
    path = RecordPaths(run.dir).run_config
    path.write_text(run_config_toml(cfg))
    return path


def submit(plan: Plan, run: RunRecord, fed: Federation, env: dict) -> int:
    """`flwr run` the app against the federation; returns Flower's run id."""
    write_flwr_config(run.dir / "flwr", fed)
    app_dir = app_dir_for(plan.job, run)
    cmd = ["flwr", "run", str(app_dir), CONNECTION, "--format", "json"]
    if cfg_path := write_run_config(plan, run):
        cmd += ["--run-config", str(cfg_path)]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    with open(run.log_path("flwr-run"), "a") as fh:
        fh.write(res.stdout + res.stderr)
    try:
        out = json.loads(res.stdout[res.stdout.index("{"):])
    except ValueError:
        out = {}
    if res.returncode != 0 or not out.get("success", True) or "run-id" not in out:
        tail = (res.stderr or res.stdout).strip().splitlines()[-3:]
        raise RunFailure(f"flwr run failed to submit the app: {' | '.join(tail)}")
    return int(out["run-id"])
