"""Round overhead: Flotilla vs a plain Flower app vs the engine's floor, in one run.

Per round: wall time, the slowest device's training time, and the overhead
(their difference: everything that is not training). Four fleets of 4
devices on this machine, one after the other:
  flotilla  - the example job (examples/mnist.yaml) through `flotilla run`;
  unshared  - the same with `local: {shared: false}` (every device imports flwr, torch and the app itself:
              the layout before shared fleets became the default), for submit -> round 1 side by side;
  user_app  - bench/baseline_app through `flotilla run`, on the example job's
              fleet (same CPU quotas, memory enough for the app): a user's app,
              unchanged. Its "training" is the time the app's own code runs per
              round (the train and evaluate handlers, from the devices' stamps:
              data loading included), so its overhead is what the engine adds;
              the app's own train-s metric is reported beside it;
  baseline  - bench/baseline_app on plain Flower: a plain Flower app as a
              newcomer builds it from the quickstart (heavy imports in every
              ClientApp process, client-side evaluation, Flower's default polling);
  floor     - bench/noop_app on the same plain engine: a ClientApp that imports
              only flwr and trains nothing.
Also submit -> round 1 of the example job ("example_round1_s"; goal <= 10 s; `--round1-only` runs just that).
Goals: flotilla's median overhead <= floor's + 1.0 s; the user app's through
Flotilla within 1.0 s of the built-in app's.

    .venv/bin/python bench/round_overhead.py [--rounds 3] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

BENCH = Path(__file__).resolve().parent
USER_APP_MEMORY = "1536m"
ROOT = BENCH.parent
sys.path.insert(0, str(BENCH))
from run_plain import prepared_app, read_rounds, run_app, start_plain_fleet, stop_fleet, summarize  # noqa: E402

ROUND1 = {}  # fleet name -> seconds from `flotilla run` to round 1's first message


def run_flotilla(job_path: Path, rounds: int, work: Path, app: Path | None = None, local: dict | None = None,
                 name: str = "flotilla") -> list[dict]:
    """The job through `flotilla run`; with `app`, that Flower App on the job's fleet instead of the built-in;
    with `local`, those local-target options over the job's. Notes submit -> round 1 in ROUND1[name]."""
    doc = yaml.safe_load(job_path.read_text())
    doc |= {"rounds": rounds, "runs_dir": str(work / "runs")}
    if local is not None:
        doc["local"] = doc.get("local", {}) | local
    if app is not None:
        doc |= {"app": str(prepared_app(app, work / "apps")), "name": "user-app"}
        doc.pop("train", None)  # the app's own training settings stand
        for cls in doc["devices"]:
            cls.pop("train", None)
            # The same CPU quotas; memory enough for the app: with everything its ClientApp imports at module
            # level (torch, and mlxtend's pandas/scipy/scikit-learn/matplotlib) a device holds ~850 MB.
            cls["memory"] = USER_APP_MEMORY
    job = work / "job.yaml"
    job.write_text(yaml.safe_dump(doc))
    t0 = time.time()
    res = subprocess.run([sys.executable, "-m", "flotilla.cli", "run", str(job), "--json"],
                         capture_output=True, text=True, timeout=1800)
    if res.returncode != 0:
        raise RuntimeError(f"flotilla run failed:\n{res.stderr[-2000:]}")
    summary = json.loads(res.stdout.strip().splitlines()[-1])
    record = work / "runs" / summary["run_id"]
    first = json.loads((record / "round_starts.jsonl").read_text().splitlines()[0])
    ROUND1[name] = round(first["t_start"] - t0, 2)
    rounds = read_rounds(record / "metrics.jsonl")
    if app is not None:  # the app's own code's time per round (observed on the devices) is its "training"
        for r in rounds:
            app_s = max(((d.get("compute_s") or 0.0) + ((d.get("evaluate") or {}).get("compute_s") or 0.0)
                         for d in r["devices"]), default=0.0)
            r["app_train_s"] = round(max((d.get("metrics", {}).get("train-s", 0.0) for d in r["devices"]),
                                         default=0.0), 3)
            r["slowest_train_s"], r["overhead_s"] = round(app_s, 3), round(r["wall_s"] - app_s, 3)
    return rounds


def run_plain(app: str, devices: int, rounds: int, work: Path) -> list[dict]:
    fleet = start_plain_fleet(devices, work)
    try:
        return run_app(fleet, app, rounds, work / "out")
    finally:
        stop_fleet(fleet)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--job", type=Path, default=ROOT / "examples" / "mnist.yaml")
    ap.add_argument("--skip-baseline", action="store_true", help="the baseline takes ~40 s per round")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--round1-only", action="store_true",
                    help="only submit -> round 1 of the example job, shared (the default) and unshared")
    args = ap.parse_args(argv)
    devices = sum(d.get("count", 1) for d in yaml.safe_load(args.job.read_text())["devices"])

    results = {}
    with tempfile.TemporaryDirectory(prefix="flotilla-bench-") as tmp:
        tmp = Path(tmp)
        plan = [("flotilla", lambda w: run_flotilla(args.job, args.rounds, w)),
                ("unshared", lambda w: run_flotilla(args.job, args.rounds, w, local={"shared": False},
                                                    name="unshared")),
                ("user_app", lambda w: run_flotilla(args.job, args.rounds, w, app=BENCH / "baseline_app",
                                                    name="user_app")),
                ("floor", lambda w: run_plain("noop", devices, args.rounds, w))]
        if args.round1_only:
            plan = plan[:2]
        if not args.skip_baseline:
            plan.insert(2, ("baseline", lambda w: run_plain("baseline", devices, args.rounds, w)))
        for name, fn in plan:
            work = tmp / name
            work.mkdir()
            print(f"running {name} ({devices} devices, {args.rounds} rounds)...", file=sys.stderr, flush=True)
            results[name] = summarize(name, devices, fn(work))

    print(f"\n{'':10}{'round':>6}{'wall s':>9}{'slowest train s':>17}{'overhead s':>12}")
    for name, s in results.items():
        for r in s["rounds"]:
            print(f"{name:10}{r['round']:>6}{r['wall_s']:>9.2f}{r['slowest_train_s']:>17.2f}{r['overhead_s']:>12.2f}")
    print(f"\n{'median':10}{'':>6}{'wall s':>9}{'slowest train s':>17}{'overhead s':>12}")
    for name, s in results.items():
        print(f"{name:10}{'':>6}{s['median_wall_s']:>9.2f}{s['median_slowest_train_s']:>17.2f}"
              f"{s['median_overhead_s']:>12.2f}")
    print(f"\nsubmit -> round 1 (example job): {ROUND1.get('flotilla')} s shared (the default), "
          f"{ROUND1.get('unshared')} s unshared (local.shared: false); goal <= 10 s")
    if args.round1_only:
        if args.json:
            print(json.dumps({"example_round1_s": ROUND1.get("flotilla"),
                              "example_round1_unshared_s": ROUND1.get("unshared"),
                              "load_avg_1m": os.getloadavg()[0]}))
        return 0
    fl, floor = results["flotilla"]["median_overhead_s"], results["floor"]["median_overhead_s"]
    user = results["user_app"]["median_overhead_s"]
    out = {
        "example_round1_s": ROUND1.get("flotilla"),
        "example_round1_unshared_s": ROUND1.get("unshared"),
        "flotilla_overhead_s": fl,
        "baseline_overhead_s": results.get("baseline", {}).get("median_overhead_s"),
        "floor_overhead_s": floor,
        "flotilla_minus_floor_s": round(fl - floor, 3),
        "goal": "flotilla_overhead_s <= floor_overhead_s + 1.0",
        "goal_met": fl <= floor + 1.0,
        "baseline_over_flotilla_wall": (round(results["baseline"]["median_wall_s"] / results["flotilla"]["median_wall_s"], 2)
                                        if "baseline" in results else None),
        "user_app_overhead_s": user,
        "user_app_plain_overhead_s": results.get("baseline", {}).get("median_overhead_s"),
        "user_app_minus_builtin_s": round(user - fl, 3),
        "user_goal": "user_app_overhead_s <= flotilla_overhead_s + 1.0",
        "user_goal_met": user <= fl + 1.0,
        "load_avg_1m": os.getloadavg()[0],
        "details": results,
    }
    print(f"\nflotilla overhead {fl:.2f} s vs floor {floor:.2f} s (goal: <= floor + 1.0 s): "
          f"{'met' if out['goal_met'] else 'NOT met'}")
    plain = out["user_app_plain_overhead_s"]
    print(f"user app through flotilla {user:.2f} s vs the built-in app {fl:.2f} s (goal: <= built-in + 1.0 s): "
          f"{'met' if out['user_goal_met'] else 'NOT met'}" + (f"; the same app on plain Flower {plain:.2f} s"
                                                             if plain is not None else ""))
    if args.json:
        print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
