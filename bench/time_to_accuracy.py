"""Time to accuracy on an unlike fleet: heterogeneity policy `none` vs `auto`.

Four devices with CPU quotas 1.0, 0.5, 0.25 and 0.125 (cgroups, local target)
train the built-in MNIST app on the same data with the same seed, once under
`none` (uniform work, every round waits for the slowest device: the seeds'
baseline) and once under `auto` (work sized by measured throughput, a round
deadline, stragglers asynchronous, FedNova averaging). The runs go one after
the other through `flotilla run JOB --json`.

Printed for each policy: wall time to the target accuracy (round t_end minus
round 1's t_start, from metrics.jsonl), accuracy at the same wall time, final
accuracy (auto runs twice the rounds by default, as its rounds are shorter; it
still ends first; its accuracy after the same number of rounds is printed too),
fleet utilization (device-seconds spent training / device-seconds
available over the run's rounds), and the compute bound (samples the faster
run needed to reach the target / the fleet's summed measured throughput: the
time a fleet that never idles and has no per-round overhead would need).

    python bench/time_to_accuracy.py [--rounds 6] [--local-epochs 2] [--repeat 3] [--json]

With --json the last line holds the medians over the repetitions
(speedup, utilization_auto, utilization_none, accuracy_gap_pts) and every
pair's figures under "repeats".

The machine's load average is printed with each run: CPU quotas are ceilings,
so on a busy machine the fleet is less unlike than its quotas say.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
QUOTAS = {"c100": 1.0, "c050": 0.5, "c025": 0.25, "c012": 0.125}


def job_doc(policy: str, args, runs_dir: Path) -> dict:
    return {
        "name": f"tta-{policy}",
        "rounds": args.auto_rounds if policy == "auto" else args.rounds,
        "seed": args.seed,
        "data": {"dataset": "mnist-5k", "partition": {"kind": "iid", "seed": 42}, "test_fraction": 0.2},
        "train": {"batch_size": 32, "lr": 0.02, "local_epochs": args.local_epochs, "momentum": 0.9},
        "strategy": {"min_devices": 1},
        "heterogeneity": {"policy": policy, "deadline_factor": 1.5},
        "devices": [{"name": n, "count": 1, "cpus": q, "memory": "1g"} for n, q in QUOTAS.items()],
        "runs_dir": str(runs_dir),
    }


def run_policy(policy: str, args, work: Path) -> dict:
    work.mkdir(parents=True, exist_ok=True)
    job = work / f"{policy}.yaml"
    job.write_text(yaml.safe_dump(job_doc(policy, args, work / "runs")))
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO / "src"), env.get("PYTHONPATH")]))
    load_before = os.getloadavg()[0]
    t0 = time.time()
    # Popen, not run(): on Ctrl-C run() would SIGKILL the driver, leaving its devices behind
    proc = subprocess.Popen([sys.executable, "-m", "flotilla.cli", "run", str(job), "--json"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        out, err = proc.communicate(timeout=args.timeout)
    except (KeyboardInterrupt, subprocess.TimeoutExpired):
        proc.send_signal(signal.SIGINT)  # the driver stops the run and removes what it started
        proc.communicate(timeout=120)
        raise
    if proc.returncode != 0:
        raise SystemExit(f"bench: the {policy} run failed (exit {proc.returncode}):\n{err[-2000:]}")
    summary = json.loads(out.strip().splitlines()[-1])
    run_dir = work / "runs" / summary["run_id"]
    rounds = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return {"policy": policy, "summary": summary, "rounds": rounds, "run_dir": str(run_dir),
            "load_before": round(load_before, 2), "load_after": round(os.getloadavg()[0], 2),
            "elapsed_s": round(time.time() - t0, 1)}


# -- figures from metrics.jsonl --------------------------------------------------


def curve(rounds: list[dict]) -> list[tuple[float, float, int]]:
    """(seconds since round 1 started, accuracy, round) at the end of each training round."""
    trained = [r for r in rounds if r["round"] >= 1]
    t0 = trained[0]["t_start"]
    return [(r["t_end"] - t0, r["accuracy"], r["round"]) for r in trained]


def time_to(rounds: list[dict], target: float) -> float | None:
    return next((t for t, acc, _ in curve(rounds) if acc >= target), None)


def accuracy_at(rounds: list[dict], seconds: float) -> float:
    """The accuracy of the model the run had `seconds` after round 1 started (round 0's before any round ended)."""
    acc = next(r["accuracy"] for r in rounds if r["round"] == 0)
    for t, a, _ in curve(rounds):
        if t <= seconds + 1e-9:
            acc = a
    return acc


def went_in(d: dict) -> bool:
    """A device record whose training went into the model: a reply (ok/partial) or a stale update, averaged in."""
    return d.get("status") in ("ok", "partial", "stale") and d.get("aggregated", True)


def training_seconds(r: dict) -> float:
    """Device-seconds of training that went into the model this round (train-ahead time included)."""
    return sum((d.get("train_s") or 0.0) + (d.get("ahead_s") or 0.0) for d in r.get("devices", []) if went_in(d))


def utilization(rounds: list[dict], n_devices: int) -> float:
    """Device-seconds of training that went into the model / device-seconds of the run's rounds."""
    trained = [r for r in rounds if r["round"] >= 1]
    available = n_devices * sum(r["t_end"] - r["t_start"] for r in trained)
    return sum(training_seconds(r) for r in trained) / available if available > 0 else 0.0


def idle_share(rounds: list[dict], n_devices: int) -> float:
    """Share of device-seconds spent idle, waiting for other devices (round end minus own reply)."""
    trained = [r for r in rounds if r["round"] >= 1]
    available = n_devices * sum(r["t_end"] - r["t_start"] for r in trained)
    idle = sum(max(0.0, (r["t_end"] - r["t_start"]) - d["reply_s"]) for r in trained for d in r.get("devices", [])
               if d.get("status") in ("ok", "partial") and d.get("reply_s") is not None)
    return idle / available if available > 0 else 0.0


def samples_until(rounds: list[dict], target: float) -> int | None:
    total = 0
    for r in (r for r in rounds if r["round"] >= 1):
        total += sum((d.get("samples") or 0) + (d.get("ahead_samples") or 0) for d in r.get("devices", []) if went_in(d))
        if r["accuracy"] >= target:
            return total
    return None


def fleet_throughput(rounds: list[dict]) -> float:
    """Summed per-device median of measured throughput (samples/s) over the run."""
    per: dict[str, list[float]] = {}
    for r in rounds:
        for d in r.get("devices", []):
            if d.get("throughput_sps") and d.get("train_s", 0) >= 0.05:
                per.setdefault(d["name"], []).append(d["throughput_sps"])
    return sum(statistics.median(v) for v in per.values())


def message_overhead(rounds: list[dict]) -> dict[str, float]:
    """Per device, the median seconds of a train exchange not spent training (Flower messaging, ClientApp start)."""
    per: dict[str, list[float]] = {}
    for r in rounds:
        for d in r.get("devices", []):
            if d.get("reply_s") is not None and d.get("status") in ("ok", "partial"):
                per.setdefault(d["name"], []).append(d["reply_s"] - d["train_s"])
    return {k: round(statistics.median(v), 2) for k, v in sorted(per.items())}


def round_profile(rounds: list[dict]) -> dict:
    trained = [r for r in rounds if r["round"] >= 1]
    walls = [r["t_end"] - r["t_start"] for r in trained]
    return {"rounds": len(trained), "median_round_s": round(statistics.median(walls), 2),
            "first_round_s": round(walls[0], 2)}


def report_pair(runs: dict, args) -> dict:
    """Print one none/auto pair's figures; return them."""
    n = len(QUOTAS)
    tt = {p: time_to(r["rounds"], args.target) for p, r in runs.items()}
    final = {p: r["rounds"][-1]["accuracy"] for p, r in runs.items()}
    util = {p: utilization(r["rounds"], n) for p, r in runs.items()}
    idle = {p: idle_share(r["rounds"], n) for p, r in runs.items()}
    reached = [t for t in tt.values() if t is not None]
    same_wall = min(reached) if reached else min(curve(r["rounds"])[-1][0] for r in runs.values())
    acc_same = {p: accuracy_at(r["rounds"], same_wall) for p, r in runs.items()}
    same_rounds = {p: next((x["accuracy"] for x in r["rounds"] if x["round"] == args.rounds), None)
                   for p, r in runs.items()}
    end_s = {p: curve(r["rounds"])[-1][0] for p, r in runs.items()}
    needed = [s for s in (samples_until(r["rounds"], args.target) for r in runs.values()) if s]
    thr = fleet_throughput(runs["none"]["rounds"])
    bound = min(needed) / thr if needed and thr else None

    print(f"\ntime to {args.target:.0%} test accuracy, 4 devices with CPU quotas {list(QUOTAS.values())}:")
    print(f"{'policy':<7}{'to target':>11}{'acc @ ' + format(same_wall, '.0f') + 's':>13}{'final':>8}"
          f"{'util':>7}{'rounds':>8}{'median round':>14}{'load':>12}")
    for p, r in runs.items():
        prof = round_profile(r["rounds"])
        t = f"{tt[p]:.1f}s" if tt[p] is not None else "not reached"
        print(f"{p:<7}{t:>11}{acc_same[p]:>13.3f}{final[p]:>8.3f}{util[p]:>7.2f}{prof['rounds']:>8}"
              f"{prof['median_round_s']:>13.1f}s{r['load_before']:>6.1f}>{r['load_after']:<5.1f}")
    print(f"final accuracy: none {final['none']:.3f} after {args.rounds} rounds in {end_s['none']:.0f}s; "
          f"auto {final['auto']:.3f} after {args.auto_rounds} rounds in {end_s['auto']:.0f}s "
          f"(after {args.rounds} rounds: {same_rounds['auto']:.3f})")
    if bound:
        print(f"compute bound: {min(needed)} samples / {thr:.0f} samples/s summed throughput = {bound:.1f}s")
    speedup = tt["none"] / tt["auto"] if tt["none"] and tt["auto"] else None
    if speedup:
        print(f"speedup (none / auto time to target): {speedup:.2f}x")
    ovh = message_overhead(runs["none"]["rounds"])
    print("per-round overhead outside training (median reply - train seconds, policy none): "
          + ", ".join(f"{k} {v:.1f}s" for k, v in ovh.items()))
    print(f"device time idle, waiting for other devices: none {idle['none']:.0%}, auto {idle['auto']:.0%} "
          "(the rest of what is not training is the per-round overhead above)")
    return {
        "speedup": round(speedup, 3) if speedup else None,
        "utilization_auto": round(util["auto"], 3), "utilization_none": round(util["none"], 3),
        "accuracy_gap_pts": round(100 * (final["none"] - final["auto"]), 2),
        "accuracy_gap_same_rounds_pts": round(100 * (same_rounds["none"] - same_rounds["auto"]), 2),
        "run_end_s": {p: round(t, 1) for p, t in end_s.items()},
        "target": args.target,
        "time_to_target_s": {p: round(t, 2) if t else None for p, t in tt.items()},
        "accuracy_at_same_wall": {"seconds": round(same_wall, 2), **{p: a for p, a in acc_same.items()}},
        "final_accuracy": final,
        "compute_bound_s": round(bound, 2) if bound else None,
        "median_round_s": {p: round_profile(r["rounds"])["median_round_s"] for p, r in runs.items()},
        "message_overhead_s": ovh,
        "idle_share": {p: round(v, 3) for p, v in idle.items()},
        "load_avg": {p: [r["load_before"], r["load_after"]] for p, r in runs.items()},
        "rounds": {"none": args.rounds, "auto": args.auto_rounds}, "local_epochs": args.local_epochs,
        "run_dirs": {p: r["run_dir"] for p, r in runs.items()},
    }


# -- main -------------------------------------------------------------------------


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=6, help="rounds of the none run")
    ap.add_argument("--auto-rounds", type=int, default=None,
                    help="rounds of the auto run (default: twice --rounds; its rounds are shorter, and it still "
                         "finishes first)")
    ap.add_argument("--local-epochs", type=float, default=2.0)
    ap.add_argument("--target", type=float, default=0.95, help="test accuracy to reach")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--timeout", type=float, default=600, help="seconds per run")
    ap.add_argument("--work-dir", type=Path, default=None, help="keep jobs and run records here (default: temp)")
    ap.add_argument("--repeat", type=int, default=3,
                    help="none/auto pairs to run; figures are reported per pair and as medians (default 3: a "
                         "single pair's time to target moves by a round on a 2-core machine)")
    ap.add_argument("--json", action="store_true", help="end with the figures as one JSON line")
    args = ap.parse_args()
    args.auto_rounds = args.auto_rounds or 2 * args.rounds

    work = args.work_dir or Path(tempfile.mkdtemp(prefix="flotilla-tta-"))
    work.mkdir(parents=True, exist_ok=True)
    t_bench = time.time()
    pairs = []
    for rep in range(args.repeat):
        runs = {}
        for policy in ("none", "auto"):
            print(f"[{rep + 1}/{args.repeat}] running policy {policy} (load average {os.getloadavg()[0]:.1f}) ...",
                  file=sys.stderr, flush=True)
            runs[policy] = run_policy(policy, args, work / f"rep{rep + 1}")
        pairs.append(report_pair(runs, args))
    if args.repeat > 1:
        print(f"\nover {args.repeat} repetitions (median, min..max):")
        for key in ("speedup", "utilization_auto", "utilization_none", "accuracy_gap_pts"):
            vals = [p[key] for p in pairs if p[key] is not None]
            if vals:
                print(f"  {key:<18}{statistics.median(vals):>8.3f}   {min(vals):.3f}..{max(vals):.3f}")
    print(f"records: {work}  (bench took {time.time() - t_bench:.0f}s)")
    if args.json:
        med = {k: (round(statistics.median(v), 3) if (v := [p[k] for p in pairs if p[k] is not None]) else None)
               for k in ("speedup", "utilization_auto", "utilization_none", "accuracy_gap_pts")}
        print(json.dumps(med | {"repeats": pairs, "bench_s": round(time.time() - t_bench, 1)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
