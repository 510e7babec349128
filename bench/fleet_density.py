"""Fleet density: the example app on fleets of 10, 25, 50 and 100 real devices on this machine, in one run.

Every device is its own processes under its own cgroup; the fleets share
(`local: {shared: true}`) what devices have in common: one warm process per
run that has imported flwr, the app and torch, which every device forks from.
Per fleet size:
  - idle phase (the target alone: up, quiet, down): time until every device is
    connected and warm, CPU per idle device over IDLE_S (its cgroup, plus its
    share of the SuperLink's), teardown time, anything left;
  - run phase (`flotilla run`, policy none): start-up to round 1, each round's
    wall time vs the slowest device's training time (the overhead is the
    rest), where each round's CPU went (devices, SuperLink, ServerApp; per
    device exchange; the machine's busy share), final accuracy, peak memory used (MemTotal - MemAvailable, from the
    kernel, above what was used before) and PSS per device (every process of
    the run, from /proc/*/smaps_rollup, over the device count).
The baseline is the layout without sharing (every device its own Pythons)
at the sizes it reaches; "per-object" is the shared layout with flwr's one
request per object instead of Flotilla's batches (FLOTILLA_OBJECT_BATCHES=0);
"fit-cpus" the shared layout with local.fit_cpus: every limit scaled by one
factor so the fleet fits the cores (run phase only).
speed_spread / reply_spread: the slowest class's median training / reply time
over the fastest's. The limits declare 5x; where they add up to more than the
cores (15 CPUs at 100 devices on 2) busy devices share the cores and the
spread shrinks (capacity.cpu_note says so when a run starts); fit-cpus keeps it.
Goals at 100 devices: completes; <= 150 MB PSS per device; idle CPU <= 0.2 %
of a core per device; start-up <= 30 s and teardown <= 5 s; round overhead
within 2x of the 10-device overhead.

    .venv/bin/python bench/fleet_density.py [--sizes 10,25,50,100] [--baseline-sizes 10,25]
                                            [--per-object-sizes 10] [--fit-cpus-sizes 100] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import yaml

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path.insert(0, str(ROOT / "tests"))
from conftest import cgroups_of, processes_of  # noqa: E402
from flotilla.runtime.object_batches import ENABLE_ENV  # noqa: E402

CLASSES = [(0.05, "a"), (0.1, "b"), (0.15, "c"), (0.2, "d"), (0.25, "e")]  # the same spread of CPU quotas
SPREAD = CLASSES[-1][0] / CLASSES[0][0]  # the slowest class's training time over the fastest's, as declared
MEMORY = "512m"
IDLE_S = 10.0
# PSS is read from every process's smaps_rollup, which walks its page tables: at 100 devices (~600 processes
# with torch mapped) one pass took 3.5-3.7 s of CPU. Sampled all run long it took a core from the fleet being
# measured (100-device rounds of 37 s, against 16-19 s unsampled). So PSS is sampled (every 5 s) from start-up
# through round 1 only: the fleet complete, warm and training; the round figures are those of the later
# rounds, which nothing of the bench's disturbs (its CPU per round is reported: bench_cpu_s).
PSS_EVERY = 10  # half-second ticks


def job_doc(n: int, shared: bool, rounds: int, runs_dir: Path, fit: bool = False) -> dict:
    per = [n // len(CLASSES) + (1 if i < n % len(CLASSES) else 0) for i in range(len(CLASSES))]
    return {
        "name": f"density-{n}{'' if shared else '-base'}",
        "rounds": rounds,
        "data": {"dataset": "mnist-5k", "partition": {"kind": "iid", "seed": 42}},
        "train": {"batch_size": 16, "lr": 0.05, "local_epochs": 1},
        "strategy": {"min_devices": max(2, n // 2), "start_timeout_s": 900},
        "heterogeneity": {"policy": "none"},
        "devices": [{"name": name, "count": c, "cpus": cpus, "memory": MEMORY}
                    for (cpus, name), c in zip(CLASSES, per) if c],
        "local": {"shared": shared, **({"fit_cpus": True} if fit else {})},
        "runs_dir": str(runs_dir),
    }


def mem_used() -> int:
    info = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
    kb = lambda k: int(info[k].split()[0]) * 1024  # noqa: E731
    return kb("MemTotal") - kb("MemAvailable")


def pss_of(run_dir: Path) -> int:
    """PSS of every process of the run (its FLWR_HOME or its path on the command line), bytes."""
    total = 0
    for line in processes_of(run_dir):
        pid = line.split(":", 1)[0]
        try:
            for row in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                if row.startswith("Pss:"):
                    total += int(row.split()[1]) * 1024
        except OSError:
            continue
    return total


def machine_cpu() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine so far, from /proc/stat (idle and iowait are not busy)."""
    v = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    tck = os.sysconf("SC_CLK_TCK")
    return (sum(v) - v[3] - v[4]) / tck, sum(v) / tck


class Sampler:
    """Peak memory used (every half second) and peak PSS (every PSS_EVERY ticks) of the run; every second, where the CPU went
    (the machine, the devices' cgroups, the SuperLink, the ServerApp) for `round_cpu`."""

    def __init__(self, run_dir_fn) -> None:
        self.pss_done = False  # set once round 2 starts: from then on the fleet is measured undisturbed
        self.base = mem_used()
        self.peak_used = self.peak_pss = 0
        self.cpu: list[dict] = []  # {"t", "busy", "total", "devices", "superlink", "serverapp"} cumulative
        self._fn, self._stop = run_dir_fn, threading.Event()
        self._t = threading.Thread(target=self._loop, daemon=True)
        self._t.start()

    def _loop(self) -> None:
        tick = 0
        while not self._stop.wait(0.5):
            self.peak_used = max(self.peak_used, mem_used() - self.base)
            d = self._fn()
            if d is None:
                continue
            tick += 1
            if tick % 2 == 0:
                self._sample_cpu(d)
            if not self.pss_done and (d / "round_starts.jsonl").exists() and \
                    len((d / "round_starts.jsonl").read_text().splitlines()) >= 2:
                self.pss_done = True
            if tick % PSS_EVERY == 1 and not self.pss_done:
                self.peak_pss = max(self.peak_pss, pss_of(d))

    def _sample_cpu(self, run_dir: Path) -> None:
        from flotilla.runs import RunRecord

        run = RunRecord(run_dir)
        st = run.state()
        busy, total = machine_cpu()
        row = {"t": time.time(), "busy": busy, "total": total, "bench": time.process_time(),
               "devices": cpu_seconds(run, [n for n in st.get("cgroups", {}) if n != "superlink"])}
        for name, pid in (("superlink", st.get("groups", {}).get("superlink")),
                          ("serverapp", _read_pid(run_dir / "serverapp.pid"))):
            try:
                row[name] = proc_cpu(int(pid)) if pid else None
            except (OSError, ValueError):
                row[name] = None
        self.cpu.append(row)

    def stop(self) -> None:
        self._stop.set()
        self._t.join(5)


def _read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def round_cpu(samples: list[dict], t_start: float, t_end: float) -> dict | None:
    """CPU seconds spent in [t_start, t_end] by the devices, the SuperLink, the ServerApp, and the machine's
    busy share (1.0: every core busy), from the samples nearest each end."""
    inside = [r for r in samples if t_start - 1.0 <= r["t"] <= t_end + 1.0]
    if len(inside) < 2:
        return None
    a, b = inside[0], inside[-1]
    out = {"machine_busy": round((b["busy"] - a["busy"]) / max(b["total"] - a["total"], 1e-9), 3)}
    for k in ("devices", "superlink", "serverapp", "bench"):
        out[k] = round(b[k] - a[k], 2) if a.get(k) is not None and b.get(k) is not None else None
    return out


def cpu_seconds(run, names: list[str]) -> float:
    """CPU seconds used so far by the devices' cgroups (cpuacct / cpu.stat)."""
    from flotilla.sandbox.cgroups import CgroupError, DeviceCgroup

    total = 0.0
    for name, cstate in run.state().get("cgroups", {}).items():
        if name in names:
            try:
                total += DeviceCgroup.from_state(cstate).usage()["cpu_seconds"] or 0.0
            except (CgroupError, OSError):
                continue
    return total


def proc_cpu(pid: int) -> float:
    f = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(f[11]) + int(f[12]) + int(f[13]) + int(f[14])) / os.sysconf("SC_CLK_TCK")


def idle_phase(n: int, shared: bool, work: Path) -> dict:
    """The target alone: up, wait until connected and warm, IDLE_S quiet, down."""
    from flotilla.driver import create_run
    from flotilla.flower_control import FlowerControl
    from flotilla.job import parse_job
    from flotilla.plan import make_plan
    from flotilla.runtime.lease import Lease
    from flotilla.targets.local import LocalTarget

    job = parse_job(job_doc(n, shared, 1, work / "idle-runs"))
    plan = make_plan(job)
    run = create_run(job, "local", work / "idle-runs")
    target = LocalTarget()
    names = [d.name for d in plan.devices]
    out: dict = {}
    with Lease(run.dir / "owner.lease"):
        t0 = time.time()
        try:
            fed = target.up(plan, run)
            ctl = FlowerControl(fed.control_address)
            while True:
                ready = sum((run.dir / "nodes" / f"{d}.ready").exists() for d in names)
                if len(ctl.online_nodes()) >= n and ready >= n:
                    break
                if dead := [d for d, s in target.device_states(run).items() if s == "exited"]:
                    tail = run.log_path(dead[0]).read_text(errors="replace").strip().splitlines()[-3:]
                    raise RuntimeError(f"device {dead[0]} exited while starting (no supervisor restarts it in "
                                       f"this phase): {' | '.join(tail)}")
                if time.time() - t0 > 900:
                    raise TimeoutError(f"{n} devices not up in 900 s")
                time.sleep(0.25)
            out["up_s"] = round(time.time() - t0, 2)
            time.sleep(3)  # let the last start-up work settle
            sl = run.state()["groups"]["superlink"]
            c0, s0, t1 = cpu_seconds(run, names), proc_cpu(sl), time.time()
            time.sleep(IDLE_S)
            dt = time.time() - t1
            out["idle_cpu_pct_per_device"] = round(100 * (cpu_seconds(run, names) - c0) / dt / n, 3)
            out["superlink_idle_cpu_pct_per_device"] = round(100 * (proc_cpu(sl) - s0) / dt / n, 3)
            ctl.close()
        finally:
            t2 = time.time()
            target.down(run)
            out["teardown_s"] = round(time.time() - t2, 2)
    sockets = run.state().get("sockets_dir")
    out["left_after_teardown"] = processes_of(run.dir) + cgroups_of(run.run_id) + (
        [sockets] if sockets and Path(sockets).exists() else [])
    return out


def run_phase(n: int, shared: bool, rounds: int, work: Path, fit: bool = False) -> dict:
    doc = job_doc(n, shared, rounds, work / "runs", fit)
    path = work / f"job-{n}.yaml"
    path.write_text(yaml.safe_dump(doc))
    runs = work / "runs"
    sampler = Sampler(lambda: next((p for p in runs.glob("*") if (p / "state.json").exists()), None)
                      if runs.exists() else None)
    t0 = time.time()
    # The fleet's memory limits are caps, not reservations: 100 x 512m is more than this machine has, while a
    # shared device uses a fraction of its cap (measured below as PSS), so the fit check is waived here.
    res = subprocess.run([sys.executable, "-m", "flotilla.cli", "run", str(path), "--json"],
                         capture_output=True, text=True, timeout=3600,
                         env=os.environ | {"FLOTILLA_SKIP_MEMORY_CHECK": "1"})
    sampler.stop()
    out: dict = {"exit": res.returncode}
    if not res.stdout.strip():
        out["error"] = res.stderr.strip().splitlines()[-1:] or ["no output"]
        return out
    s = json.loads(res.stdout.strip().splitlines()[-1])
    run_dir = runs / s["run_id"]
    starts = [json.loads(x) for x in (run_dir / "round_starts.jsonl").read_text().splitlines()] \
        if (run_dir / "round_starts.jsonl").exists() else []
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    rows = [r for r in rows if r.get("round", 0) >= 1]
    rows = [r for r in rows if r["round"] >= 2] or rows  # round 1 had PSS sampled alongside (see PSS_EVERY)
    walls = [r["wall_s"] for r in rows]
    timed = [(c, r) for c, r in ((round_cpu(sampler.cpu, r["t_start"], r["t_end"]), r) for r in rows) if c]
    cpu = [c for c, _ in timed]
    med = lambda k: round(statistics.median([c[k] for c in cpu if c.get(k) is not None]), 3) \
        if any(c.get(k) is not None for c in cpu) else None  # noqa: E731
    per_exchange = [sum(c[k] or 0.0 for k in ("devices", "superlink", "serverapp")) / max(len(r["devices"]), 1)
                    for c, r in timed]
    slowest = [max((d.get("train_s") or 0.0) for d in r["devices"]) if r["devices"] else 0.0 for r in rows]
    # Each class's median training and reply time: the limits declare SPREAD (equal data per device)
    def by_class(key: str) -> dict[str, float]:
        seen: dict[str, list[float]] = {}
        for r in rows:
            for d in r["devices"]:
                if d.get("status") == "ok" and d.get(key):
                    seen.setdefault(d.get("class") or "?", []).append(d[key])
        return {c: round(statistics.median(v), 3) for c, v in sorted(seen.items())}

    def spread(times: dict[str, float]) -> float | None:
        slow, fast = CLASSES[0][1], CLASSES[-1][1]
        return round(times[slow] / times[fast], 2) if {slow, fast} <= times.keys() and times[fast] else None

    class_train, class_reply = by_class("train_s"), by_class("reply_s")
    out |= {
        "status": s["status"], "rounds": len(rows), "final_accuracy": s["final_accuracy"],
        "startup_to_round1_s": round(starts[0]["t_start"] - t0, 2) if starts else None,
        "median_round_s": round(statistics.median(walls), 3) if walls else None,
        "median_slowest_train_s": round(statistics.median(slowest), 3) if slowest else None,
        "class_train_s": class_train,
        "speed_spread": spread(class_train),
        "class_reply_s": class_reply,
        "reply_spread": spread(class_reply),
        "median_overhead_s": round(statistics.median([w - t for w, t in zip(walls, slowest)]), 3) if walls else None,
        # where a round's CPU went: when machine_busy is near 1.0 the round is as long as its CPU / the cores
        "round_cpu_s": {k: med(k) for k in ("devices", "superlink", "serverapp")},
        "bench_cpu_s_per_round": med("bench"),
        "rounds_timed": [r["round"] for r in rows],
        "round_machine_busy": med("machine_busy"),
        "cpu_s_per_exchange": round(statistics.median(per_exchange), 3) if per_exchange else None,
        "peak_mem_used_mb": round(sampler.peak_used / 2**20),
        "pss_mb_per_device": round(sampler.peak_pss / 2**20 / n, 1),
        "devices_trained_last_round": sum(d.get("status") == "ok" for d in rows[-1]["devices"]) if rows else 0,
        "left": processes_of(run_dir) + cgroups_of(s["run_id"]),
        "error": s.get("error"),
    }
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="10,25,50,100")
    ap.add_argument("--baseline-sizes", default="10,25", help="today's layout (no sharing); '' to skip")
    ap.add_argument("--per-object-sizes", default="10",
                    help="shared, but flwr's one request per object (FLOTILLA_OBJECT_BATCHES=0); '' to skip")
    ap.add_argument("--fit-cpus-sizes", default="100",
                    help="shared, with local.fit_cpus (every limit scaled to fit the cores: relative speeds hold, "
                         "rounds take longer); run phase only; '' to skip")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    sizes = [int(x) for x in args.sizes.split(",") if x]
    base_sizes = [int(x) for x in args.baseline_sizes.split(",") if x]
    per_object_sizes = [int(x) for x in args.per_object_sizes.split(",") if x]
    fit_sizes = [int(x) for x in args.fit_cpus_sizes.split(",") if x]
    results = []
    with tempfile.TemporaryDirectory(prefix="flotilla-density-") as tmp:
        for layout, shared, group in (("shared", True, sizes), ("per-object", True, per_object_sizes),
                                      ("fit-cpus", True, fit_sizes), ("baseline", False, base_sizes)):
            for n in group:
                work = Path(tmp) / f"{n}-{layout}"
                work.mkdir()
                row = {"devices": n, "layout": layout}
                if layout == "per-object":  # every process of the fleet inherits it
                    os.environ[ENABLE_ENV] = "0"
                try:
                    if layout != "fit-cpus":  # its idle fleet is the shared one's
                        print(f"{n} devices ({layout}): idle phase...", file=sys.stderr, flush=True)
                        row |= idle_phase(n, shared, work)
                    print(f"{n} devices: run phase...", file=sys.stderr, flush=True)
                    row |= run_phase(n, shared, args.rounds, work, fit=layout == "fit-cpus")
                except Exception as err:  # noqa: BLE001 - a size that cannot run is a result too
                    row["error"] = f"{type(err).__name__}: {err}"
                finally:
                    os.environ.pop(ENABLE_ENV, None)
                results.append(row)
                print(json.dumps(row), file=sys.stderr, flush=True)
    cols = [("devices", 8), ("layout", 9), ("up_s", 7), ("startup_to_round1_s", 10), ("median_round_s", 9),
            ("median_overhead_s", 10), ("pss_mb_per_device", 9), ("peak_mem_used_mb", 9),
            ("idle_cpu_pct_per_device", 9), ("cpu_s_per_exchange", 9), ("speed_spread", 8), ("reply_spread", 8),
            ("round_machine_busy", 9),
            ("teardown_s", 9), ("final_accuracy", 9), ("status", 10)]
    print("\n" + "".join(f"{c[:c_w - 1]:>{c_w}}" for c, c_w in cols))
    for r in results:
        print("".join(f"{str(r.get(c, '-'))[:w - 1]:>{w}}" for c, w in cols))
    shared = [r for r in results if r["layout"] == "shared" and r.get("status") == "completed"]
    top = max(shared, key=lambda r: r["devices"], default=None)
    ten = next((r for r in shared if r["devices"] == 10), None)
    fitted = max((r for r in results if r["layout"] == "fit-cpus"), key=lambda r: r["devices"], default=None)
    out = {
        "max_devices_completed": top["devices"] if top else 0,
        "pss_mb_per_device": top.get("pss_mb_per_device") if top else None,
        "idle_cpu_pct_per_device": top.get("idle_cpu_pct_per_device") if top else None,
        "startup_s_at_max": top.get("startup_to_round1_s") if top else None,
        "teardown_s_at_max": top.get("teardown_s") if top else None,
        "speed_spread_declared": SPREAD,
        "speed_spread_at_max": top.get("speed_spread") if top else None,
        "reply_spread_at_max": top.get("reply_spread") if top else None,
        "fit_cpus": {k: fitted.get(k) for k in ("devices", "speed_spread", "reply_spread", "median_round_s",
                                                "startup_to_round1_s", "status")} if fitted else None,
        "overhead_ratio_max_vs_10": (round(top["median_overhead_s"] / ten["median_overhead_s"], 2)
                                     if top and ten and ten.get("median_overhead_s") else None),
        "sizes": results,
    }
    if args.json:
        print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
