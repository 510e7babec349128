"""A run's summary.json and report, from its record: written by the driver, or by whoever notices the end.

The record alone is enough (metrics.jsonl, observed.json, state.json, the
plan), so a run whose driver died is still summed up by `flotilla stop`,
`resume` or `status` when they find it finished.
"""

from __future__ import annotations

import json
import sys
import time
from collections import Counter
from pathlib import Path

from flotilla.contracts import RecordPaths, trained
from flotilla.runs import RunRecord


def read_json(path: Path) -> dict:
    try:
        doc = json.loads(Path(path).read_text())
        return doc if isinstance(doc, dict) else {}
    except (OSError, ValueError):
        return {}


def write_summary(run: RunRecord, status: str, error: str | None, *, target_name: str, notes: list[str],
                  lost: dict[str, str] | None = None, rounds_target: int | None = None) -> dict:
    """summary.json (also `--json`'s last line), the final state and the report."""
    paths = RecordPaths(run.dir)
    st = run.state()
    plan = run.plan()
    job = plan["job"]
    rounds = _last_per_round(run.rounds())
    per_device = {d["name"]: {"name": d["name"], "class": d["device_class"], "train_s": 0.0, "trained_rounds": 0}
                  for d in plan["devices"]}
    for r in rounds:
        for d in r.get("devices", []):
            if d.get("name") in per_device and trained(d):
                per_device[d["name"]]["train_s"] = round(per_device[d["name"]]["train_s"] + (d.get("train_s") or 0), 3)
                per_device[d["name"]]["trained_rounds"] += 1
    lost = lost if lost is not None else dict(st.get("lost_reasons") or {})
    untrained = never_trained(rounds, lost)
    for name, why in untrained.items():
        if name in per_device:
            per_device[name]["untrained_because"] = why
    warnings = class_warnings(plan, per_device, len(rounds))
    observed = read_json(paths.observed)
    seen = observed.get("metrics_seen", {})
    notes = list(notes)
    acc_key = job.get("metrics", {}).get("accuracy", "accuracy")
    if rounds and all(r.get("accuracy") is None for r in rounds):
        names = sorted({m for scope in seen.values() for m in scope})
        notes.append(f"no metric named {acc_key!r} was reported; the app reported: "
                     f"{', '.join(names) or 'none'} (set metrics.accuracy in the job to one of them)")
    ended = time.time()
    summary = {
        "run_id": run.run_id,
        "status": status,
        "app": st.get("app"),
        "final_accuracy": next((r["accuracy"] for r in reversed(rounds) if r.get("accuracy") is not None), None),
        "accuracy_metric": acc_key,
        "rounds_target": rounds_target if rounds_target is not None else st.get("rounds"),
        "rounds": [{k: r.get(k) for k in ("round", "accuracy", "loss", "wall_s")} for r in rounds],
        "devices": list(per_device.values()),
        "metrics_seen": seen,
        "wall_s": round(ended - st.get("started", ended), 3),
        "target": target_name,
        "limits_enforced": st.get("limits_enforced", False),
        "lost_devices": sorted(lost),
        "lost_reasons": lost,
        "recoveries": st.get("recoveries", []),
        "started": st.get("started"),
        "ended": ended,
        "error": error,
        "degraded": bool(warnings),  # completed, but a whole class of the fleet never trained
        "warnings": warnings,
        "untrained_devices": {n: d.get("untrained_because", "") for n, d in per_device.items()
                              if not d["trained_rounds"]} if rounds else {},
        "notes": notes,
        "outputs": outputs(paths),
    }
    run.summary_path.write_text(json.dumps(summary, indent=2))
    run.write_state(status=status, ended=ended, error=error)
    try:
        from flotilla.monitor.report import write_report

        write_report(run.dir)
    except Exception as err:  # noqa: BLE001 - a report problem must not turn a good run into a failed one
        print(f"flotilla: could not write the report: {err}", file=sys.stderr)
    return summary


def never_trained(rounds: list[dict], lost: dict[str, str]) -> dict[str, str]:
    """Why each device that took part in some round but never trained did not: its most frequent error (the
    reason its ClientApp's error reply gave), else why it was lost, else the states it was in."""
    seen: dict[str, list[dict]] = {}
    for r in rounds:
        for d in r.get("devices", []):
            seen.setdefault(d.get("name"), []).append(d)
    out = {}
    for name, rows in seen.items():
        if any(trained(d) for d in rows):
            continue
        errors = Counter(str(d["error"]).removeprefix("Flotilla: ") for d in rows if d.get("error"))
        if errors:
            why, n = errors.most_common(1)[0]
            out[name] = f"{why} ({n} of {len(rows)} messages)" if len(rows) > 1 else why
        elif name in lost:
            out[name] = f"lost: {lost[name]}"
        else:
            states = Counter(d.get("status", "?") for d in rows)
            out[name] = ", ".join(f"{s} in {n} round{'s' * (n > 1)}" for s, n in states.most_common())
    return out


def class_warnings(plan: dict, per_device: dict[str, dict], rounds_run: int) -> list[str]:
    """A line per device class none of whose devices trained in a run where others did: the run's result
    leaves that part of the fleet (and its data) out."""
    if not rounds_run or not any(d["trained_rounds"] for d in per_device.values()):
        return []
    classes = [c["name"] for c in plan["job"].get("devices", [])]
    out = []
    for idx, cls in enumerate(classes):
        members = [d for d in per_device.values() if d["class"] == cls]
        if not members or any(d["trained_rounds"] for d in members):
            continue
        reasons = Counter(d.get("untrained_because", "never sent work") for d in members)
        why = "; ".join(f"{r} ({', '.join(d['name'] for d in members if d.get('untrained_because', 'never sent work') == r)})"
                        for r, _ in reasons.most_common(3))
        hint = f"; raise devices[{idx}].memory or make the app use less" if "memory limit" in why else ""
        out.append(f"class {cls}: none of its {len(members)} device{'s' * (len(members) > 1)} trained in "
                   f"{rounds_run} round{'s' * (rounds_run > 1)}: {why}{hint}")
    return out


def outputs(paths: RecordPaths) -> list[str]:
    """Files the apps wrote in their working directories (the record's outputs/), relative paths."""
    root = paths.outputs
    if not root.is_dir():
        return []
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def _last_per_round(rows: list[dict]) -> list[dict]:
    """Training rounds in order; a round written twice (resumed before its checkpoint) counts once, the last."""
    by_round: dict[int, dict] = {}
    for r in rows:
        if isinstance(r.get("round"), int) and r["round"] >= 1:
            by_round[r["round"]] = r
    return [by_round[k] for k in sorted(by_round)]


def finished_by_itself(run: RunRecord) -> bool:
    """Did the app end on its own (its ServerApp returned without an error) with every round it was to run?"""
    obs = read_json(RecordPaths(run.dir).observed)
    if not obs or obs.get("error"):
        return False
    target = run.state().get("rounds") or obs.get("num_rounds")
    return target is None or obs.get("rounds_run", 0) >= target
