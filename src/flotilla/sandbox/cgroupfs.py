"""The cgroupfs file interface shared by layout detection and device groups.

Reading and writing the kernel's control files (one-line errors naming the
file), the v1/v2 spellings of a CPU quota and a memory limit, group-name and
limit validation, and killing/removing groups. Kept apart so that
cgroup_layout.py (what this machine allows) and device_cgroup.py (one
device's group) share one implementation without importing each other.
"""

from __future__ import annotations

import errno
import math
import numbers
import os
import re
import signal
import time
from pathlib import Path

from flotilla.errors import FlotillaError

PERIOD_US = 100_000  # CFS period; quota = cpus * period
MIN_CPUS = 0.01  # the smallest limit a job declares: the kernel's smallest CFS quota, 1 ms, per PERIOD_US
MIN_QUOTA_US, MAX_PERIOD_US = 1_000, 1_000_000  # the kernel's bounds on a CFS quota and period
MIN_SCALED_CPUS = MIN_QUOTA_US / MAX_PERIOD_US  # a limit scaled down to fit the machine (local.fit_cpus): 0.001
UNLIMITED = "max"  # pass to set_limits() to remove a limit (None leaves it unchanged)
GROUP_ROOT = "flotilla"
_V1_NO_LIMIT = 2**62  # v1 reports "no memory limit" as ~2^63 rounded down to a page
_V2 = "unified"
_NAME_PART = re.compile(r"^[A-Za-z0-9_.-]+$")


class CgroupError(FlotillaError, RuntimeError):
    """A cgroup operation failed; the message is one line naming the file and the cause."""


def run_prefix(run_id: str) -> str:
    """Group path holding every device group of one run: flotilla/<run-id>."""
    return f"{GROUP_ROOT}/{run_id}"


def group_name(run_id: str, device: str) -> str:
    """Group path of one device: flotilla/<run-id>/<device>."""
    return f"{run_prefix(run_id)}/{device}"


def _role(version: int, role: str) -> str:
    """The key of a controller's directory: its own hierarchy on v1, the unified tree on v2."""
    return _V2 if version == 2 else role


# -- reading and writing control files ---------------------------------------


def _read(path: Path, default: str | None = None) -> str:
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        if default is None:
            raise CgroupError(f"{path}: missing (the group is gone or the controller is not enabled)") from None
        return default
    except OSError as err:
        raise CgroupError(f"{path}: cannot read: {err.strerror}") from None


def _write(path: Path, value: str) -> None:
    try:
        with open(path, "w") as f:
            f.write(value)
    except OSError as err:
        hint = ""
        if err.errno == errno.EBUSY and path.name.startswith("memory."):
            hint = " (usage is above the new limit and could not be reclaimed)"
        raise CgroupError(f"{path}: cannot write {value!r}: {err.strerror}{hint}") from None


def _write_if_present(path: Path, value: str) -> None:
    """Optional knobs (swap accounting, swappiness) differ between kernels: best effort."""
    if path.exists():
        try:
            _write(path, value)
        except CgroupError:
            pass


def _keyed(text: str) -> dict[str, int]:
    """'key value' lines (cpu.stat, memory.events, memory.oom_control) -> dict."""
    out = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[1].lstrip("-").isdigit():
            out[parts[0]] = int(parts[1])
    return out


def _procs(d: Path) -> set[int]:
    try:
        return {int(p) for p in (d / "cgroup.procs").read_text().split()}
    except FileNotFoundError:
        return set()


def _subtree_controllers(d: Path) -> set[str]:
    return {c.lstrip("+") for c in _read(d / "cgroup.subtree_control", "").split()}


def _enable_v2_controllers(d: Path) -> None:
    missing = {"cpu", "memory"} - _subtree_controllers(d)
    if missing:
        _write(d / "cgroup.subtree_control", " ".join(f"+{c}" for c in sorted(missing)))


# -- limits ------------------------------------------------------------------


def _period_us(cpus: float | str) -> int:
    """PERIOD_US, stretched for a quota under MIN_CPUS so that it stays at least the kernel's 1 ms: such a
    device runs in longer bursts (0.005 CPU: 1 ms of every 200 ms)."""
    if cpus == UNLIMITED:
        return PERIOD_US
    return min(MAX_PERIOD_US, max(PERIOD_US, math.ceil(MIN_QUOTA_US / float(cpus))))


def _quota_us(cpus: float) -> str:
    return str(round(float(cpus) * _period_us(cpus)))


def _cpu_limit(version: int, d: Path) -> float | None:
    if version == 1:
        quota = int(_read(d / "cpu.cfs_quota_us", "-1"))
        period = int(_read(d / "cpu.cfs_period_us", str(PERIOD_US)))
    else:
        quota_s, _, period_s = _read(d / "cpu.max", "max").partition(" ")
        quota = -1 if quota_s == "max" else int(quota_s)
        period = int(period_s or PERIOD_US)
    return quota / period if quota > 0 and period > 0 else None


def _memory_limit(version: int, d: Path) -> int | None:
    raw = _read(d / ("memory.limit_in_bytes" if version == 1 else "memory.max"), "max")
    if raw == "max" or int(raw) < 0 or int(raw) >= _V1_NO_LIMIT:
        return None
    return int(raw)


def _check_name(name: str, min_parts: int = 1) -> tuple[str, ...]:
    parts = tuple(name.split("/"))
    if len(parts) < min_parts:
        raise ValueError(f"cgroup prefix {name!r}: needs at least two parts, e.g. flotilla/<run-id>")
    if any(p in ("", ".", "..") or not _NAME_PART.match(p) for p in parts):
        raise ValueError(f"cgroup name {name!r}: use '/'-separated parts of letters, digits, '.', '_', '-'")
    return parts


def _check_limits(cpus, memory) -> None:
    if cpus is not None and cpus != UNLIMITED and not (isinstance(cpus, numbers.Real) and cpus >= MIN_SCALED_CPUS):
        raise ValueError(f"cpus {cpus!r}: use a number >= {MIN_SCALED_CPUS} (or UNLIMITED)")
    if memory is not None and memory != UNLIMITED and not (isinstance(memory, numbers.Integral) and memory > 0):
        raise ValueError(f"memory {memory!r}: use a byte count > 0 (or UNLIMITED)")


# -- teardown ----------------------------------------------------------------


def _kill_members(dirs: list[Path], deadline: float) -> None:
    """SIGKILL every process in `dirs` until all are empty (new forks are caught on the next pass)."""
    me = os.getpid()
    while True:
        pids = set().union(*(_procs(d) for d in dirs))
        if not pids:
            return
        if me in pids:
            raise CgroupError(f"{dirs[0]}: holds the calling process ({me}); refusing to kill it")
        if time.monotonic() > deadline:
            raise CgroupError(f"{dirs[0]}: processes {sorted(pids)} survived SIGKILL")
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.02)


def _rmdir(d: Path, deadline: float) -> None:
    """rmdir a cgroup; EBUSY lasts a moment after its last process exits."""
    while True:
        try:
            d.rmdir()
            return
        except FileNotFoundError:
            return
        except OSError as err:
            if err.errno != errno.EBUSY or time.monotonic() > deadline:
                raise CgroupError(f"{d}: cannot remove: {err.strerror}") from None
            time.sleep(0.02)


def _kill_and_remove(dirs: list[Path], deadline: float) -> None:
    """Empty `dirs` of processes, then rmdir them in order (children before their parents)."""
    _kill_members(dirs, deadline)
    for d in dirs:
        _rmdir(d, deadline)


def _prune(base: Path, parts: tuple[str, ...]) -> None:
    """Remove the now-empty parents flotilla/<run-id> and flotilla, never `base` itself."""
    for i in range(len(parts) - 1, 0, -1):
        try:
            base.joinpath(*parts[:i]).rmdir()
        except FileNotFoundError:
            continue
        except OSError:
            return  # another device's group is still there
