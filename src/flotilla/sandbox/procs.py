"""Processes and process groups, read from /proc: start-up waits, liveness, states, ending groups.

Every local device (and the SuperLink) leads its own process group, so one
signal reaches the whole tree (SuperNode, SuperExec, fork server, ClientApps).
Groups are ended all at once, with one grace period for the lot.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from pathlib import Path

from flotilla.errors import FlotillaError


class ProcessError(FlotillaError):
    pass


LISTEN_PORTS_FLOOR = 20000  # listening ports are drawn from here up to the kernel's ephemeral range
# the last ports this process handed out: their servers may not have bound them yet (a bounded memory: one
# handed out thousands of draws ago is bound by now, or was let go)
_HANDED_OUT: dict[int, None] = {}
_REMEMBER = 4096


def _ephemeral_range() -> tuple[int, int]:
    try:
        lo, hi = (int(x) for x in Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
        return lo, hi
    except (OSError, ValueError):
        return 32768, 60999  # Linux's default


def _bindable(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def _hand_out(port: int) -> int:
    _HANDED_OUT[port] = None
    while len(_HANDED_OUT) > _REMEMBER:
        del _HANDED_OUT[next(iter(_HANDED_OUT))]
    return port


def free_port() -> int:
    """A loopback port free now, for a server that binds it a moment later; never the same one twice.

    Not from the kernel's ephemeral range (what `bind(0)` hands out): every
    outgoing connection also takes a port from there, and a fleet of a hundred
    devices makes thousands of them, so a port found free could be taken
    before its server bound it (seen: a SuperNode's runtime API failed with
    "address already in use"). Below that range only listeners take ports,
    and the ones this process handed out are remembered: a hundred random
    draws would otherwise repeat one about a third of the time (seen too).
    """
    import random

    lo, _ = _ephemeral_range()
    if lo - 1 > LISTEN_PORTS_FLOOR:
        for _ in range(256):
            port = random.randint(LISTEN_PORTS_FLOOR, lo - 1)
            if port not in _HANDED_OUT and _bindable(port):
                return _hand_out(port)
    for _ in range(64):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in _HANDED_OUT:
            return _hand_out(port)
    raise ProcessError("no free loopback port found for a server of the fleet")


def wait_port(port: int, proc: subprocess.Popen | None, timeout: float, what: str, log: Path) -> None:
    end = time.time() + timeout
    while time.time() < end:
        if proc is not None and proc.poll() is not None:
            raise ProcessError(f"{what} exited with code {proc.returncode} at start-up; see {log}")
        with socket.socket() as s:
            s.settimeout(0.2)
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise ProcessError(f"{what} did not open port {port} within {timeout:.0f} s; see {log}")


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie is not alive
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def kill_group(pgid: int, grace_s: float = 5.0) -> None:
    """SIGTERM a process group, then SIGKILL what is left after the grace period."""
    kill_groups([pgid], grace_s)


def kill_groups(pgids: list[int], grace_s: float = 5.0) -> None:
    """End many process groups at once: SIGCONT (a stopped group cannot act on SIGTERM) and SIGTERM to all,
    one grace period for all, then SIGKILL to what is left. A fleet stops in one grace period, not one each.
    grace_s 0: SIGCONT and SIGKILL only (nothing to save)."""
    live = []
    first = (signal.SIGCONT, signal.SIGTERM) if grace_s > 0 else (signal.SIGCONT, signal.SIGKILL)  # 0: no grace
    for pgid in pgids:
        for sig in first:
            try:
                os.killpg(pgid, sig)
            except (ProcessLookupError, PermissionError):
                break
        else:
            live.append(pgid)
    end = time.time() + grace_s
    while live and time.time() < end:
        members = _pgrp_members()
        live = [g for g in live if members.get(g)]
        if live:
            time.sleep(0.1)
    for pgid in live:
        try:
            os.killpg(pgid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


def signal_group(pgid: int, sig: int) -> bool:
    try:
        os.killpg(pgid, sig)
        return True
    except (ProcessLookupError, PermissionError):
        return False


def _group_alive(pgid: int) -> bool:
    return bool(group_pids(pgid))


def _pgrp_members() -> dict[int, set[int]]:
    """Every live (non-zombie) process by process group: one pass over /proc."""
    out: dict[int, set[int]] = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            f = _stat_fields(int(entry.name))
            if f and len(f) > 2 and f[0] != "Z":
                out.setdefault(int(f[2]), set()).add(int(entry.name))
    return out


def _stat_fields(pid: int) -> list[str] | None:
    """/proc/<pid>/stat after the command name: [state, ppid, pgrp, ...]."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def group_pids(pgid: int) -> set[int]:
    """Live (non-zombie) members of a process group."""
    out = set()
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            f = _stat_fields(int(entry.name))
            if f and len(f) > 2 and f[2] == str(pgid) and f[0] != "Z":
                out.add(int(entry.name))
    return out


def proc_state(pid: int) -> str | None:
    f = _stat_fields(pid)
    return f[0] if f else None


def proc_cpu_s(pid: int) -> float:
    f = _stat_fields(pid)
    return (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK") if f and len(f) > 12 else 0.0
