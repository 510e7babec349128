"""One simulated device's cgroup: create it with limits, move processes in, rewrite the limits
live, read its usage and OOM counters, and kill and remove it; plus removing every group of a run.

The group's directories are saved with `to_state()` so another process
(`flotilla stop`, `flotilla throttle`) can act on them with `from_state()`;
cleanup_run() needs no saved state at all (crash recovery).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

from flotilla.sandbox.cgroup_layout import Layout, cgroups_available, detect_layout
from flotilla.sandbox.cgroupfs import (
    _V2,
    UNLIMITED,
    CgroupError,
    _check_limits,
    _check_name,
    _cpu_limit,
    _enable_v2_controllers,
    _keyed,
    _kill_and_remove,
    _memory_limit,
    _period_us,
    _procs,
    _prune,
    _quota_us,
    _read,
    _role,
    _write,
    _write_if_present,
)

_MAX_SEARCH_DEPTH = 10
MIN_PRIVATE_BYTES = 32 * 2**20  # the least a device's own processes get beside what they share
PAGE = os.sysconf("SC_PAGE_SIZE")  # the kernel rounds a memory limit down to whole pages


def page_floor(n: int) -> int:
    """n rounded down to whole pages: a limit written less this reads back exactly plus this."""
    return int(n) // PAGE * PAGE


@dataclass
class DeviceCgroup:
    name: str  # e.g. flotilla/<run-id>/<device>, relative to each base
    version: int
    dirs: dict[str, Path]  # role -> this group's directory in that hierarchy
    # Memory the device's processes share with the run's zygote (charged to the zygote, not to this group),
    # counted as the device's own: the kernel holds the group to (limit - shared_bytes), and limits and usage
    # are read back with it added, so a shared device fails where one holding its own copy would.
    shared_bytes: int = 0

    # creation ---------------------------------------------------------------
    @classmethod
    def create(
        cls, name: str, cpus: float | None = None, memory: int | None = None, *, layout: Layout | None = None,
        shared_bytes: int = 0,
    ) -> "DeviceCgroup | None":
        """Create the group with the given limits; None when this process cannot manage cgroups."""
        _check_name(name)
        _check_limits(cpus, memory)
        if memory is not None and memory - shared_bytes < MIN_PRIVATE_BYTES:
            raise CgroupError(f"{name}: a memory limit of {memory} bytes leaves {memory - shared_bytes} beside the "
                              f"{shared_bytes} its processes share; at least {MIN_PRIVATE_BYTES} are needed")
        if layout is None:
            ok, _reason = cgroups_available()
            if not ok:
                return None
            layout, _ = detect_layout()
            if layout is None:
                return None
        cg = cls(name, layout.version, {role: base / name for role, base in layout.bases.items()},
                 page_floor(shared_bytes))
        try:
            if layout.version == 2:
                d = layout.bases[_V2]
                for part in _check_name(name):
                    _enable_v2_controllers(d)  # children of d get cpu.max / memory.max
                    d = d / part
                    d.mkdir(exist_ok=True)
            else:
                for d in cg._unique_dirs():
                    d.mkdir(parents=True, exist_ok=True)
                # A device that runs out of memory should be OOM-killed, not swap.
                _write_if_present(cg.dirs["memory"] / "memory.swappiness", "0")
            cg._yield_cpu_to_the_server(layout)
            cg.set_limits(
                cpus=UNLIMITED if cpus is None else cpus,
                memory=UNLIMITED if memory is None else memory,
            )
        except BaseException:
            try:
                cg.destroy(timeout=2.0)
            except CgroupError:
                pass
            raise
        return cg

    def _yield_cpu_to_the_server(self, layout: Layout) -> None:
        """Low CPU weight for the groups Flotilla creates (every level), so emulated devices do not
        starve the SuperLink and ServerApp sharing their host: a device is its own machine in the
        fleet being emulated. Its quota still caps it; the weight only matters when the host is full.
        Devices all weigh the same. Weights in proportion to the quotas were measured (100 devices of
        0.05-0.25 CPU, 15 CPUs on 2 cores) and were worse: fast devices trained under full contention and
        the slow ones last, alone, at their whole quota, so measured speeds inverted (0.05-CPU devices
        trained in 0.39x the 0.25-CPU ones' time), and start to round 1 went from 28 s to 47 s."""
        role, knob, value = (_V2, "cpu.weight", "10") if self.version == 2 else ("cpu", "cpu.shares", "128")
        d = layout.bases[role]
        for part in _check_name(self.name):
            d = d / part
            _write_if_present(d / knob, value)

    # state ------------------------------------------------------------------
    def to_state(self) -> dict:
        return {"name": self.name, "version": self.version, "dirs": {r: str(d) for r, d in self.dirs.items()},
                "shared_bytes": self.shared_bytes}

    @classmethod
    def from_state(cls, state: dict) -> "DeviceCgroup":
        try:
            version = int(state["version"])
            dirs = {str(r): Path(d) for r, d in state["dirs"].items()}
            name = str(state["name"])
            shared = int(state.get("shared_bytes", 0))
        except (KeyError, TypeError, ValueError, AttributeError):
            raise CgroupError(f"cgroup state {state!r}: expected keys name, version, dirs") from None
        needed = {_V2} if version == 2 else {"cpu", "memory"}
        if version not in (1, 2) or not needed <= dirs.keys():
            raise CgroupError(f"cgroup state {state!r}: version 1 needs dirs cpu and memory, version 2 needs unified")
        return cls(name, version, dirs, shared)

    def _unique_dirs(self) -> list[Path]:
        return list(dict.fromkeys(self.dirs.values()))

    def _dir(self, role: str) -> Path:
        return self.dirs[_role(self.version, role)]

    @property
    def exists(self) -> bool:
        return any(d.is_dir() for d in self._unique_dirs())

    # processes --------------------------------------------------------------
    def add_pid(self, pid: int) -> None:
        """Move a process into the group; the children it forks later inherit it."""
        for d in self._unique_dirs():
            try:
                with open(d / "cgroup.procs", "w") as f:
                    f.write(str(pid))
            except ProcessLookupError:
                raise CgroupError(f"{d}: cannot add pid {pid}: no such process") from None
            except OSError as err:
                raise CgroupError(f"{d}: cannot add pid {pid}: {err.strerror}") from None

    def procs_files(self) -> list[str]:
        """The cgroup.procs files a process writes its pid to, to enter the group (one per hierarchy)."""
        return [str(d / "cgroup.procs") for d in self._unique_dirs()]

    def enter(self) -> None:
        """Move the calling process in; as Popen(preexec_fn=cg.enter) the child starts inside, race-free."""
        self.add_pid(os.getpid())

    def pids(self) -> list[int]:
        return sorted(set().union(*(_procs(d) for d in self._unique_dirs())))

    # limits -----------------------------------------------------------------
    def set_limits(self, cpus: float | str | None = None, memory: int | str | None = None) -> None:
        """Rewrite limits live. None leaves a limit as it is; UNLIMITED removes it. A memory limit is the
        device's (the kernel holds its group to the limit less shared_bytes)."""
        _check_limits(cpus, memory)
        if memory is not None and memory != UNLIMITED and self.shared_bytes:
            if int(memory) - self.shared_bytes < MIN_PRIVATE_BYTES:
                raise CgroupError(f"{self.name}: a memory limit of {int(memory)} bytes leaves too little beside "
                                  f"the {self.shared_bytes} its processes share")
            memory = int(memory) - self.shared_bytes
        if self.version == 2:
            self._set_v2(cpus, memory)
        else:
            self._set_v1(cpus, memory)

    def _set_v1(self, cpus, memory) -> None:
        if cpus is not None:
            d = self.dirs["cpu"]
            _write(d / "cpu.cfs_period_us", str(_period_us(cpus)))
            _write(d / "cpu.cfs_quota_us", "-1" if cpus == UNLIMITED else _quota_us(cpus))
        if memory is not None:
            d = self.dirs["memory"]
            memsw = d / "memory.memsw.limit_in_bytes"  # memory+swap; must stay >= the memory limit
            old_memsw = _read(memsw, "")
            _write_if_present(memsw, "-1")
            try:
                _write(d / "memory.limit_in_bytes", "-1" if memory == UNLIMITED else str(int(memory)))
            except CgroupError:
                if old_memsw:
                    _write_if_present(memsw, old_memsw)
                raise
            if memory != UNLIMITED:
                _write_if_present(memsw, str(int(memory)))  # i.e. no swap on top of the limit

    def _set_v2(self, cpus, memory) -> None:
        d = self.dirs[_V2]
        if cpus is not None:
            quota = "max" if cpus == UNLIMITED else _quota_us(cpus)
            _write(d / "cpu.max", f"{quota} {_period_us(cpus)}")
        if memory is not None:
            _write(d / "memory.max", "max" if memory == UNLIMITED else str(int(memory)))
            _write_if_present(d / "memory.swap.max", "max" if memory == UNLIMITED else "0")

    def read_limits(self) -> dict:
        """What the kernel holds now: {"cpus": float | None, "memory": int | None} (None = no limit)."""
        memory = _memory_limit(self.version, self._dir("memory"))
        return {
            "cpus": _cpu_limit(self.version, self._dir("cpu")),
            "memory": None if memory is None else memory + self.shared_bytes,
        }

    # accounting -------------------------------------------------------------
    def usage(self) -> dict:
        """CPU time used and memory charged to the group (cpu_seconds is None without cpuacct on v1)."""
        if self.version == 2:
            d = self.dirs[_V2]
            current = int(_read(d / "memory.current"))
            return {
                "cpu_seconds": _keyed(_read(d / "cpu.stat")).get("usage_usec", 0) / 1e6,
                "memory_bytes": current + self.shared_bytes,
                # memory.peak: kernel >= 5.19
                "memory_peak_bytes": int(_read(d / "memory.peak", str(current))) + self.shared_bytes,
            }
        acct = self.dirs.get("cpuacct")
        mem = self.dirs["memory"]
        return {
            "cpu_seconds": int(_read(acct / "cpuacct.usage")) / 1e9 if acct else None,
            "memory_bytes": int(_read(mem / "memory.usage_in_bytes")) + self.shared_bytes,
            "memory_peak_bytes": int(_read(mem / "memory.max_usage_in_bytes")) + self.shared_bytes,
        }

    def memory_pressure(self) -> dict:
        """How hard the group presses on its memory limit: {"limit_hits": times usage hit the limit,
        "major_faults": pages read back from disk (a group at its limit without swap evicts its own
        code and mapped files, then faults them back in: thrashing)}."""
        if self.version == 2:
            d = self.dirs[_V2]
            return {"limit_hits": _keyed(_read(d / "memory.events", "")).get("max", 0),
                    "major_faults": _keyed(_read(d / "memory.stat", "")).get("pgmajfault", 0)}
        d = self.dirs["memory"]
        stat = _keyed(_read(d / "memory.stat", ""))
        return {"limit_hits": int(_read(d / "memory.failcnt", "0")),
                "major_faults": stat.get("total_pgmajfault", stat.get("pgmajfault", 0))}

    def oom_kills(self) -> int:
        """Processes the kernel OOM-killed in this group.

        v1 kernels before 4.13 have no oom_kill counter; then memory.failcnt
        (times usage hit the limit) is returned as the nearest signal.
        """
        if self.version == 2:
            return _keyed(_read(self.dirs[_V2] / "memory.events")).get("oom_kill", 0)
        d = self.dirs["memory"]
        fields = _keyed(_read(d / "memory.oom_control"))
        if "oom_kill" in fields:
            return fields["oom_kill"]
        return int(_read(d / "memory.failcnt", "0"))

    # teardown ---------------------------------------------------------------
    def destroy(self, timeout: float = 10.0) -> None:
        """SIGKILL what is left in the group, remove it and its empty parents. Idempotent."""
        deadline = time.monotonic() + timeout
        parts = _check_name(self.name)
        dirs = [d for d in self._unique_dirs() if d.is_dir()]
        if dirs:
            _kill_and_remove(dirs, deadline)
        for d in self._unique_dirs():
            base = d.parents[len(parts) - 1]
            _prune(base, parts)


# -- whole runs ----------------------------------------------------------------


def _find_dirs(rel_parts: tuple[str, ...], roots: list[Path]) -> list[Path]:
    """Every dir under `roots` whose path ends in rel_parts (a run's groups may hang below
    another process's own group, so its memory groups are not under ours)."""
    found = []
    for root in roots:
        root_depth = len(root.parts)
        for dirpath, dirnames, _ in os.walk(root):
            p = Path(dirpath)
            if p.parts[-len(rel_parts):] == rel_parts and len(p.parts) - root_depth >= len(rel_parts):
                found.append(p)
                dirnames[:] = []
            elif len(p.parts) - root_depth >= _MAX_SEARCH_DEPTH:
                dirnames[:] = []
    return found


def cleanup_run(prefix: str, layout: Layout | None = None, timeout: float = 10.0) -> list[Path]:
    """Kill and remove every group under `prefix` (flotilla/<run-id>) in every hierarchy; returns the run dirs removed.

    For crash recovery: needs no saved state, it searches each hierarchy.
    """
    parts = _check_name(prefix, min_parts=2)
    if layout is None:
        layout, _ = detect_layout()
        if layout is None:
            return []
    removed = []
    for run_dir in _find_dirs(parts, list(dict.fromkeys(layout.mounts.values()))):
        deadline = time.monotonic() + timeout
        groups = sorted((Path(dp) for dp, _, _ in os.walk(run_dir)), key=lambda p: len(p.parts), reverse=True)
        _kill_and_remove(groups, deadline)
        _prune(run_dir.parents[len(parts) - 1], parts)
        removed.append(run_dir)
    return removed
