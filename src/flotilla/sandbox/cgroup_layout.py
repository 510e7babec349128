"""Where this machine lets flotilla create cgroups, and which limits already apply to it.

Finds the cpu and memory controllers (one hierarchy each on v1, the unified
tree on v2) from /proc/self/mountinfo and this process's own group in each
from /proc/self/cgroup; device groups are created below that group, never at
the root. Also answers, before anything is created, whether groups can be
made here (and what to do when not), and the tightest limits this process
already runs under (its own group and every ancestor): the capacity a host
or container really has.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from flotilla.sandbox.cgroupfs import (
    _V2,
    GROUP_ROOT,
    _cpu_limit,
    _memory_limit,
    _procs,
    _read,
    _role,
    _subtree_controllers,
)

_V1_ROLES = ("cpu", "cpuacct", "memory")  # cpuacct is optional (only for usage())


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

    def tightest(controller: str, limit_of):
        role = _role(layout.version, controller)
        limits = [lim for d in _ancestors(layout.bases[role], layout.mounts[role])
                  if (lim := limit_of(layout.version, d)) is not None]
        return min(limits, default=None)

    return {"cpus": tightest("cpu", _cpu_limit), "memory": tightest("memory", _memory_limit)}
