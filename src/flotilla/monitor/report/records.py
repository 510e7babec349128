"""The run record read into the shapes the report draws and tabulates.

Kept apart from the plots and the page so that both work from one reading of
the record (metrics.jsonl, summary.json, state.json, plan.json, devices.jsonl,
usage.jsonl), and so that a missing or half-written file is handled once, here.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from flotilla.classes import worst_first
from flotilla.runs import read_jsonl

TRAINED = ("ok", "partial")  # statuses of a device that trained in the round (auto: partial = stopped at its deadline)


@dataclass
class _Device:
    name: str
    cls: str = "unknown"
    rounds: int = 0
    train_s: float = 0.0
    wait_s: float = 0.0
    samples: int = 0
    per_round: dict[int, dict] = field(default_factory=dict)
    cpus: float | None = None  # its limits as planned (a spread's draw)
    memory: int | None = None
    lost: str | None = None  # 'lost' / 'down' at the end of the record
    why: str = ""

    @property
    def throughput(self) -> float | None:
        return self.samples / self.train_s if self.train_s > 0 else None


def _num(v) -> float | None:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else None


def _read_json(path: Path) -> dict:
    try:
        doc = json.loads(path.read_text())
        return doc if isinstance(doc, dict) else {}
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


def _load(run_dir: Path):
    by_round = {}
    for r in read_jsonl(run_dir / "metrics.jsonl"):
        if isinstance(r.get("round"), int):
            by_round[r["round"]] = r  # a repeated round: the last line wins
    rounds = [by_round[k] for k in sorted(by_round)]
    summary = _read_json(run_dir / "summary.json")
    state = _read_json(run_dir / "state.json")
    devices: dict[str, _Device] = {}
    for d in _read_json(run_dir / "plan.json").get("devices") or []:
        if isinstance(d, dict) and d.get("name"):
            devices[str(d["name"])] = _Device(str(d["name"]), str(d.get("device_class") or "unknown"),
                                              cpus=_num(d.get("cpus")), memory=_num(d.get("memory")))
    for rep in read_jsonl(run_dir / "devices.jsonl"):
        if rep.get("name"):
            devices.setdefault(str(rep["name"]), _Device(str(rep["name"]), str(rep.get("class") or "unknown")))
    for r in rounds:
        round_s = _span(r.get("t_start"), r.get("t_end")) or _num(r.get("wall_s"))
        for d in r.get("devices") or []:
            name = str(d.get("name"))
            dev = devices.setdefault(name, _Device(name))
            dev.cls = str(d.get("class") or dev.cls)
            dev.per_round[r["round"]] = d
            if d.get("status", "ok") not in TRAINED:
                continue
            train = _num(d.get("train_s")) or 0.0
            dev.rounds += 1
            dev.train_s += train
            dev.samples += int(_num(d.get("samples")) or 0)
            if round_s is not None:
                dev.wait_s += max(0.0, round_s - train)
    # A finished run's summary names every device it ended without; a running one's state tells lost
    # (for good) from down (being restarted).
    reasons = summary.get("lost_reasons") or state.get("lost_reasons") or {}
    lost = set(summary.get("lost_devices") or []) if summary else set(state.get("lost_devices") or [])
    down = set() if summary else set(state.get("down_devices") or [])
    for name, dev in devices.items():
        if name in lost or name in down:
            dev.lost, dev.why = ("lost" if name in lost else "down"), str(reasons.get(name) or "")
    usage = [u for u in read_jsonl(run_dir / "usage.jsonl") if u.get("device") and _num(u.get("t")) is not None]
    starts = [_num(r.get("t_start")) for r in rounds] + [_num(u["t"]) for u in usage]
    t0 = _num(summary.get("started")) or _num(state.get("created")) or min((t for t in starts if t), default=None)
    # Plot order: grouped by class so the slow class stands out as a block.
    ordered = sorted(devices.values(), key=lambda d: (d.cls, d.name))
    return rounds, summary, state, ordered, usage, t0


def _span(a, b) -> float | None:
    a, b = _num(a), _num(b)
    return b - a if a is not None and b is not None and b >= a else None


def _usage_by_device(usage: list[dict]) -> dict[str, list[dict]]:
    """usage.jsonl samples per device name, in record order."""
    by_device: dict[str, list[dict]] = {}
    for u in usage:
        by_device.setdefault(str(u["device"]), []).append(u)
    return by_device


def _by_class(devices: list[_Device]) -> dict[str, list[_Device]]:
    out: dict[str, list[_Device]] = {}
    for d in devices:
        out.setdefault(d.cls, []).append(d)
    return out


def _as_status_row(d: _Device) -> dict:
    return {"name": d.name, "class": d.cls, "cpus": d.cpus, "memory": d.memory, "throughput_sps": d.throughput,
            "train_s": d.train_s, "lost": d.lost == "lost", "down": d.lost == "down"}


def _worst_first(devices: list[_Device]) -> list[_Device]:
    """Lost and down devices, then the slowest (lowest throughput; never trained first)."""
    by_name = {d.name: d for d in devices}
    return [by_name[r["name"]] for r in worst_first([_as_status_row(d) for d in devices], len(devices))]
