"""Compose start-up: from submit (compose up + app submission) to the first round started.

    python bench/compose_startup.py [--devices 3] [--image flotilla:VERSION]

Needs a Docker engine, Compose v2 and the prebuilt image (`flotilla images build`).
Runs a real 1-round job through the driver and prints where the time went; the
goal is <= 30 s. "Round started" is round 1's t_start in metrics.jsonl, stamped
by the ServerApp when it sends the first train messages.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import yaml

from flotilla.driver import Driver, create_run
from flotilla.job import load_job
from flotilla.targets.compose.target import ComposeTarget

GOAL_S = 30.0


class TimedCompose(ComposeTarget):
    """ComposeTarget that notes when `up` returned (the SuperLink answers, devices started)."""

    up_returned: float | None = None

    def up(self, plan, run):
        fed = super().up(plan, run)
        self.up_returned = time.time()
        return fed


def one_run(args, tmp: Path) -> dict:
    """One 1-round job through the driver; the timings of its start-up."""
    runs_dir = Path(args.runs_dir or tmp / "runs").resolve()
    job_path = tmp / "job.yaml"
    job_path.write_text(yaml.safe_dump({
        "name": "bench-compose",
        "rounds": 1,
        "strategy": {"min_devices": args.devices},
        "train": {"local_epochs": 0.2},
        "devices": [{"name": "dev", "count": args.devices, "memory": "1g",
                     **({"cpus": args.cpus} if args.cpus else {})}],
        "runs_dir": str(runs_dir),
    }))
    job = load_job(job_path)
    run = create_run(job, "compose")
    target = TimedCompose(image=args.image)
    t_submit = time.time()
    summary = Driver(job, run, target).execute()
    rounds = {r["round"]: r for r in run.rounds()}
    if summary["status"] != "completed" or 1 not in rounds:
        raise SystemExit(f"bench: run {summary['status']}: {summary['error']} (record {run.dir})")
    return {
        "compose_up_s": round(target.up_returned - t_submit, 2),
        "submit_to_first_round_s": round(rounds[1]["t_start"] - t_submit, 2),
        "first_round_wall_s": rounds[1]["wall_s"],
        "image": target.image,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--devices", type=int, default=3)
    ap.add_argument("--cpus", type=float, default=None,
                    help="CPU limit per device (default none: measure orchestration, not throttled imports)")
    ap.add_argument("--image", default=None)
    ap.add_argument("--repeat", type=int, default=1, help="runs to take the median of (start-up is noisy)")
    ap.add_argument("--runs-dir", default=None, help="keep the run records here (default: a temporary dir)")
    args = ap.parse_args()

    runs = []
    for i in range(args.repeat):
        with tempfile.TemporaryDirectory(prefix="flotilla-bench-") as tmp:
            runs.append(one_run(args, Path(tmp)))
        print(f"run {i + 1}/{args.repeat}: compose up {runs[-1]['compose_up_s']:.1f} s, "
              f"submit -> round 1 started {runs[-1]['submit_to_first_round_s']:.1f} s", file=sys.stderr)
    first = statistics.median(r["submit_to_first_round_s"] for r in runs)
    up = statistics.median(r["compose_up_s"] for r in runs)
    result = {
        "bench": "compose_startup", "devices": args.devices, "cpus": args.cpus, "image": runs[0]["image"],
        "repeat": args.repeat, "compose_up_s": up, "submit_to_first_round_s": first,
        "all_s": [r["submit_to_first_round_s"] for r in runs], "load_avg_1m": round(os.getloadavg()[0], 1),
        "goal_s": GOAL_S, "ok": first <= GOAL_S,
    }
    print(f"compose up (SuperLink healthy, {args.devices} devices running): {up:.1f} s (median)")
    print(f"submit -> round 1 started: {first:.1f} s (median of {args.repeat}; goal <= {GOAL_S:.0f} s)")
    print(json.dumps(result))
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
