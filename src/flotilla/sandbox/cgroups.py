"""Per-device Linux cgroups: a CPU quota and a memory limit for one simulated device.

A device's SuperNode is put in its own group; everything it forks (superexec,
each ClientApp) inherits the group, so the whole device is capped, throttled
live, measured and killed as one.

Both cgroup layouts are supported:
  v1  one hierarchy per controller (/sys/fs/cgroup/{cpu,cpuacct,memory}); the
      limits are cpu.cfs_quota_us/cpu.cfs_period_us and memory.limit_in_bytes.
  v2  one unified tree (/sys/fs/cgroup with cgroup.controllers); the limits are
      cpu.max and memory.max, and each parent must list +cpu +memory in its
      cgroup.subtree_control for its children to get those files.

Groups are created below THIS process's own group in each hierarchy (read from
/proc/self/cgroup), never at the root: a sandboxed or delegated process may
only manage its own subtree, and limits of its ancestors still apply.

The group's directories are saved with `to_state()` so another process
(`flotilla stop`, `flotilla throttle`) can act on them with `from_state()`.
"""

from __future__ import annotations

import errno
import numbers
import os
import re
import signal
import time
from dataclasses import dataclass
from pathlib import Path

from flotilla.errors import FlotillaError

PERIOD_US = 100_000  # CFS period; quota = cpus * period
MIN_CPUS = 0.01  # the kernel's smallest CFS quota is 1 ms per period
UNLIMITED = "max"  # pass to set_limits() to remove a limit (None leaves it unchanged)
GROUP_ROOT = "flotilla"
_V1_NO_LIMIT = 2**62  # v1 reports "no memory limit" as ~2^63 rounded down to a page
_V1_ROLES = ("cpu", "cpuacct", "memory")  # cpuacct is optional (only for usage())
_V2 = "unified"
_NAME_PART = re.compile(r"^[A-Za-z0-9_.-]+$")
_MAX_SEARCH_DEPTH = 10


class CgroupError(FlotillaError, RuntimeError):
    """A cgroup operation failed; the message is one line naming the file and the cause."""


def run_prefix(run_id: str) -> str:
    """Group path holding every device group of one run: flotilla/<run-id>."""
    return f"{GROUP_ROOT}/{run_id}"


def group_name(run_id: str, device: str) -> str:
    """Group path of one device: flotilla/<run-id>/<device>."""
    return f"{run_prefix(run_id)}/{device}"


# -- layout ------------------------------------------------------------------


@dataclass(frozen=True)
class Mount:
    version: int  # 1 or 2
    mountpoint: Path
    root: str  # the cgroup mounted there; not "/" when a container sees only its own group
    controllers: frozenset[str]  # v1 only; empty for v2


@dataclass(frozen=True)
class Layout:
    """Where this process may create groups.

    roles: v1 -> "cpu", "memory" and (if mounted) "cpuacct"; v2 -> "unified".
    bases[role] is this process's own group dir; mounts[role] the hierarchy's mount point.
    """

    version: int
    bases: dict[str, Path]
    mounts: dict[str, Path]


def _unescape(field: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as \ooo
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def parse_mountinfo(text: str) -> list[Mount]:
    """The cgroup mounts listed in a /proc/<pid>/mountinfo text."""
    mounts = []
    for line in text.splitlines():
        left, sep, right = line.partition(" - ")
        if not sep:
            continue
        fields, tail = left.split(), right.split()
        if len(fields) < 5 or len(tail) < 3:
            continue
        fstype, superopts = tail[0], tail[2]
        if fstype == "cgroup":
            ctrls = frozenset(o for o in superopts.split(",") if o not in ("rw", "ro") and "=" not in o)
            mounts.append(Mount(1, Path(_unescape(fields[4])), _unescape(fields[3]), ctrls))
        elif fstype == "cgroup2":
            mounts.append(Mount(2, Path(_unescape(fields[4])), _unescape(fields[3]), frozenset()))
    return mounts


def parse_proc_cgroup(text: str) -> dict[str, str]:
    """/proc/<pid>/cgroup -> {controller: group path}; the v2 entry has key ""."""
    paths: dict[str, str] = {}
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        path = parts[2].removesuffix(" (deleted)")
        for ctrl in parts[1].split(",") if parts[1] else [""]:
            paths[ctrl] = path
    return paths


def _own_dir(mount: Mount, group_path: str | None) -> Path:
    """This process's group dir inside `mount`; the mount point when the view is confined (containers)."""
    if group_path is None:
        return mount.mountpoint
    root = mount.root.rstrip("/")
    if group_path == mount.root or group_path.startswith(root + "/"):
        rel = group_path[len(root):].lstrip("/")
        d = mount.mountpoint / rel if rel else mount.mountpoint
        if d.is_dir():
            return d
    return mount.mountpoint


def detect_layout(mountinfo: str | None = None, proc_cgroup: str | None = None) -> tuple[Layout | None, str]:
    """Find the cpu and memory controllers and this process's group in each; (layout, reason)."""
    if mountinfo is None or proc_cgroup is None:
        try:
            mountinfo = Path("/proc/self/mountinfo").read_text() if mountinfo is None else mountinfo
            proc_cgroup = Path("/proc/self/cgroup").read_text() if proc_cgroup is None else proc_cgroup
        except OSError as err:
            return None, f"cannot read /proc/self: {err.strerror} (not Linux?)"
    mounts = parse_mountinfo(mountinfo)
    paths = parse_proc_cgroup(proc_cgroup)

    v1: dict[str, Mount] = {}
    for m in mounts:
        if m.version == 1:
            for role in _V1_ROLES:
                if role in m.controllers:
                    v1.setdefault(role, m)
    if "cpu" in v1 and "memory" in v1:
        return (
            Layout(
                1,
                bases={role: _own_dir(m, paths.get(role)) for role, m in v1.items()},
                mounts={role: m.mountpoint for role, m in v1.items()},
            ),
            "cgroup v1",
        )

    unified = next((m for m in mounts if m.version == 2), None)
    if unified is None:
        return None, "no cgroup hierarchy with the cpu and memory controllers is mounted"
    base = _own_dir(unified, paths.get(""))
    available = set(_read(base / "cgroup.controllers", "").split())
    if not {"cpu", "memory"} <= available:
        if v1:
            return None, f"cpu and memory controllers are split between cgroup v1 ({', '.join(sorted(v1))}) and v2"
        return None, f"cgroup v2 group {base} lacks the cpu/memory controllers (has: {' '.join(sorted(available)) or 'none'})"
    return Layout(2, bases={_V2: base}, mounts={_V2: unified.mountpoint}), "cgroup v2"


def cgroups_available(layout: Layout | None = None) -> tuple[bool, str]:
    """Can this process create device groups? (ok, reason); the reason says what to do when not."""
    if layout is None:
        layout, reason = detect_layout()
        if layout is None:
            return False, reason
    for base in dict.fromkeys(layout.bases.values()):
        if not os.access(base, os.W_OK):
            return False, f"{base} is not writable: run as root (or in a delegated cgroup) with cgroupfs mounted read-write"
        probe = base / f"{GROUP_ROOT}-probe-{os.getpid()}"
        try:
            probe.mkdir()
            probe.rmdir()
        except OSError as err:
            return False, f"cannot create a group in {base}: {err.strerror}"
    if layout.version == 2:
        base, mount = layout.bases[_V2], layout.mounts[_V2]
        if base != mount and not {"cpu", "memory"} <= _subtree_controllers(base) and _procs(base):
            return False, (
                f"cgroup v2: {base} holds processes, so cpu/memory cannot be enabled for its children; "
                "start flotilla in its own delegated group (e.g. systemd-run --scope -p Delegate=yes)"
            )
    return True, f"cgroup v{layout.version}: " + ", ".join(f"{r} at {b}" for r, b in layout.bases.items())


# -- file helpers ------------------------------------------------------------


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
    if cpus is not None and cpus != UNLIMITED and not (isinstance(cpus, numbers.Real) and cpus >= MIN_CPUS):
        raise ValueError(f"cpus {cpus!r}: use a number >= {MIN_CPUS} (or UNLIMITED)")
    if memory is not None and memory != UNLIMITED and not (isinstance(memory, numbers.Integral) and memory > 0):
        raise ValueError(f"memory {memory!r}: use a byte count > 0 (or UNLIMITED)")


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


def _prune(base: Path, parts: tuple[str, ...]) -> None:
    """Remove the now-empty parents flotilla/<run-id> and flotilla, never `base` itself."""
    for i in range(len(parts) - 1, 0, -1):
        try:
            base.joinpath(*parts[:i]).rmdir()
        except FileNotFoundError:
            continue
        except OSError:
            return  # another device's group is still there


# -- one device's group ------------------------------------------------------


@dataclass
class DeviceCgroup:
    name: str  # e.g. flotilla/<run-id>/<device>, relative to each base
    version: int
    dirs: dict[str, Path]  # role -> this group's directory in that hierarchy

    # creation ---------------------------------------------------------------
    @classmethod
    def create(
        cls, name: str, cpus: float | None = None, memory: int | None = None, *, layout: Layout | None = None
    ) -> "DeviceCgroup | None":
        """Create the group with the given limits; None when this process cannot manage cgroups."""
        _check_name(name)
        _check_limits(cpus, memory)
        if layout is None:
            ok, _reason = cgroups_available()
            if not ok:
                return None
            layout, _ = detect_layout()
            if layout is None:
                return None
        cg = cls(name, layout.version, {role: base / name for role, base in layout.bases.items()})
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
        fleet being emulated. Its quota still caps it; the weight only matters when the host is full."""
        role, knob, value = (_V2, "cpu.weight", "10") if self.version == 2 else ("cpu", "cpu.shares", "128")
        d = layout.bases[role]
        for part in _check_name(self.name):
            d = d / part
            _write_if_present(d / knob, value)

    # state ------------------------------------------------------------------
    def to_state(self) -> dict:
        return {"name": self.name, "version": self.version, "dirs": {r: str(d) for r, d in self.dirs.items()}}

    @classmethod
    def from_state(cls, state: dict) -> "DeviceCgroup":
        try:
            version = int(state["version"])
            dirs = {str(r): Path(d) for r, d in state["dirs"].items()}
            name = str(state["name"])
        except (KeyError, TypeError, ValueError, AttributeError):
            raise CgroupError(f"cgroup state {state!r}: expected keys name, version, dirs") from None
        needed = {_V2} if version == 2 else {"cpu", "memory"}
        if version not in (1, 2) or not needed <= dirs.keys():
            raise CgroupError(f"cgroup state {state!r}: version 1 needs dirs cpu and memory, version 2 needs unified")
        return cls(name, version, dirs)

    def _unique_dirs(self) -> list[Path]:
        return list(dict.fromkeys(self.dirs.values()))

    def _dir(self, role: str) -> Path:
        return self.dirs[_V2] if self.version == 2 else self.dirs[role]

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
        """Rewrite limits live. None leaves a limit as it is; UNLIMITED removes it."""
        _check_limits(cpus, memory)
        if self.version == 2:
            self._set_v2(cpus, memory)
        else:
            self._set_v1(cpus, memory)

    def _set_v1(self, cpus, memory) -> None:
        if cpus is not None:
            d = self.dirs["cpu"]
            _write(d / "cpu.cfs_period_us", str(PERIOD_US))
            _write(d / "cpu.cfs_quota_us", "-1" if cpus == UNLIMITED else str(round(float(cpus) * PERIOD_US)))
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
            quota = "max" if cpus == UNLIMITED else str(round(float(cpus) * PERIOD_US))
            _write(d / "cpu.max", f"{quota} {PERIOD_US}")
        if memory is not None:
            _write(d / "memory.max", "max" if memory == UNLIMITED else str(int(memory)))
            _write_if_present(d / "memory.swap.max", "max" if memory == UNLIMITED else "0")

    def read_limits(self) -> dict:
        """What the kernel holds now: {"cpus": float | None, "memory": int | None} (None = no limit)."""
        return {
            "cpus": _cpu_limit(self.version, self._dir("cpu")),
            "memory": _memory_limit(self.version, self._dir("memory")),
        }

    # accounting -------------------------------------------------------------
    def usage(self) -> dict:
        """CPU time used and memory charged to the group (cpu_seconds is None without cpuacct on v1)."""
        if self.version == 2:
            d = self.dirs[_V2]
            current = int(_read(d / "memory.current"))
            return {
                "cpu_seconds": _keyed(_read(d / "cpu.stat")).get("usage_usec", 0) / 1e6,
                "memory_bytes": current,
                "memory_peak_bytes": int(_read(d / "memory.peak", str(current))),  # memory.peak: kernel >= 5.19
            }
        acct = self.dirs.get("cpuacct")
        mem = self.dirs["memory"]
        return {
            "cpu_seconds": int(_read(acct / "cpuacct.usage")) / 1e9 if acct else None,
            "memory_bytes": int(_read(mem / "memory.usage_in_bytes")),
            "memory_peak_bytes": int(_read(mem / "memory.max_usage_in_bytes")),
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
            _kill_members(dirs, deadline)
            for d in dirs:
                _rmdir(d, deadline)
        for d in self._unique_dirs():
            base = d.parents[len(parts) - 1]
            _prune(base, parts)


# -- whole runs and self-inspection ------------------------------------------


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
        _kill_members(groups, deadline)
        for g in groups:
            _rmdir(g, deadline)
        _prune(run_dir.parents[len(parts) - 1], parts)
        removed.append(run_dir)
    return removed


def _ancestors(d: Path, mount: Path):
    """d, its parent, ... up to and including the mount point."""
    yield d
    while d != mount and mount in d.parents:
        d = d.parent
        yield d


def effective_limits_of_self(layout: Layout | None = None) -> dict:
    """The tightest CPU quota and memory limit over this process's group and its ancestors.

    {"cpus": float | None, "memory": int | None}; None = no limit found. Inside a
    container the view's root is the container's own group, so its limits show.
    """
    if layout is None:
        layout, _ = detect_layout()
        if layout is None:
            return {"cpus": None, "memory": None}
    role = (lambda r: _V2) if layout.version == 2 else (lambda r: r)
    cpus = [
        c for d in _ancestors(layout.bases[role("cpu")], layout.mounts[role("cpu")])
        if (c := _cpu_limit(layout.version, d)) is not None
    ]
    mems = [
        m for d in _ancestors(layout.bases[role("memory")], layout.mounts[role("memory")])
        if (m := _memory_limit(layout.version, d)) is not None
    ]
    return {"cpus": min(cpus, default=None), "memory": min(mems, default=None)}
