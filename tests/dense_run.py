"""A synthetic run record of a dense fleet (as the ServerApp and the driver write one), for the views' tests."""

from __future__ import annotations

import json
import random
from pathlib import Path

CLASSES = {  # class -> (devices, cpus range, samples/s per cpu)
    "phone": (30, (0.1, 0.6), 400.0), "pi": (25, (0.25, 0.5), 300.0), "laptop": (20, (1.0, 2.0), 500.0),
    "tablet": (20, (0.3, 1.0), 350.0), "watch": (15, (0.05, 0.2), 250.0), "server": (10, (2.0, 4.0), 600.0),
}
LOST = ("phone-7", "watch-3", "watch-11", "pi-20")  # lost for good in round 3
DOWN = ("tablet-5",)  # being restarted when the record was read
SLOWEST = "watch-9"  # the slowest device of the fleet: the smallest CPU limit
T0 = 1_700_000_000.0


def make_dense_run(root: Path, *, rounds: int = 6, finished: bool = True, run_id: str = "dense-20250101-120000-cd34",
                   usage: bool = True) -> Path:
    rng = random.Random(7)
    d = root / run_id
    (d / "logs").mkdir(parents=True)
    plan = []
    for cls, (n, (lo, hi), per_cpu) in CLASSES.items():
        for i in range(1, n + 1):
            name = f"{cls}-{i}"
            cpus = round(lo + (hi - lo) * rng.random(), 3) if name != SLOWEST else 0.01
            plan.append({"name": name, "device_class": cls, "partition_id": len(plan), "num_partitions": 120,
                         "cpus": cpus, "memory": rng.choice([512, 768, 1024]) * 2**20, "tp": cpus * per_cpu})
    records = [{"round": 0, "accuracy": 0.1, "loss": 2.3, "t_start": T0 + 2, "t_end": T0 + 2.5, "wall_s": 0,
                "devices": [], "failures": 0}]
    t = T0 + 2.5
    for r in range(1, rounds + 1):
        rows = []
        for p in plan:
            name = p["name"]
            if name in LOST and r > 3:
                continue  # gone: no row
            samples = 200
            train_s = samples / p["tp"]
            status = "lost" if name in LOST and r == 3 else "late" if train_s > 60 and r % 2 else "ok"
            row = {"name": name, "class": p["device_class"], "status": status, "started": t + 0.1,
                   "ended": t + 0.1 + train_s}
            row |= ({"train_s": round(train_s, 3), "samples": samples, "throughput_sps": round(p["tp"], 3)}
                    if status == "ok" else {"train_s": 0.0, "samples": 0, "throughput_sps": None})
            rows.append(row)
        t_end = t + 0.5 + max(r2["ended"] - t for r2 in rows if r2["status"] == "ok")
        records.append({"round": r, "accuracy": round(0.98 - 0.8 * 0.6 ** r, 4), "loss": round(2 * 0.6 ** r, 4),
                        "t_start": t, "t_end": t_end, "wall_s": round(t_end - t, 3), "devices": rows,
                        "failures": sum(1 for x in rows if x["status"] != "ok")})
        t = t_end
    (d / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in records))
    (d / "plan.json").write_text(json.dumps({"job": {"name": "dense"}, "devices": [
        {k: v for k, v in p.items() if k != "tp"} for p in plan]}))
    (d / "devices.jsonl").write_text("".join(json.dumps(
        {"name": p["name"], "class": p["device_class"], "cpus": p["cpus"], "memory": p["memory"],
         "throughput_sps": round(p["tp"], 3), "t": T0 + 1}) + "\n" for p in plan))
    reasons = {n: "killed by SIGKILL" for n in LOST} | {n: "exited with code 1" for n in DOWN}
    state = {"status": "completed" if finished else "running", "target": "local", "created": T0, "started": T0,
             "rounds": rounds, "limits_enforced": True, "lost_devices": sorted(LOST), "down_devices": sorted(DOWN),
             "lost_reasons": reasons}
    if finished:
        state["ended"] = t
        (d / "summary.json").write_text(json.dumps({
            "run_id": run_id, "status": "completed", "final_accuracy": records[-1]["accuracy"], "wall_s": t - T0,
            "target": "local", "started": T0, "ended": t, "lost_devices": sorted(LOST + DOWN),
            "lost_reasons": reasons, "rounds": [], "devices": []}))
    (d / "state.json").write_text(json.dumps(state))
    if usage:
        lines = []
        for k in range(int((t - T0) / 1.0)):
            for i, p in enumerate(plan):
                lines.append({"t": T0 + k + 0.01 * (i % 7), "device": p["name"],
                              "cpu_seconds_total": round(k * p["cpus"] * 0.9, 3),
                              "memory_bytes": int(p["memory"] * 0.6)})
        (d / "usage.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    return d
