"""Can this fleet run here? Checked where the CLI validates a job, before anything starts.

- A spread of limits (flotilla.spread) gives each device its own value; targets that give a whole class
  one set of limits (k8s: a StatefulSet per class; swarm: each class checked against its nodes) refuse it.
- Target local: the fleet's memory must fit this machine. Every device's memory limit (its drawn value
  for a spread) is summed; a device without a limit counts as what a device measurably needs at least
  (UNLIMITED_DEVICE, or UNLIMITED_SHARED_DEVICE in a shared fleet); SERVER_HEADROOM is added for the
  SuperLink and the ServerApp, and SHARED_RUNTIME for the shared fleet's warm process (its pages are
  charged to it, not to the devices). The total must fit in what the machine has: MemAvailable
  (/proc/meminfo), or what this process's cgroup still allows if that is less. Containers (compose, swarm,
  k8s) are not checked: their engine may be another host, or a VM with memory of its own.
  FLOTILLA_SKIP_MEMORY_CHECK=1 turns the check off (e.g. limits set high on purpose, well above use).
- Target local, CPUs: a fleet whose CPU limits add up to more than the cores runs, with a note (cpu_note);
  local.fit_cpus scales every limit by one factor (cpu_scale) so that they fit, refused when a device has no
  limit or the smallest scaled one is under the kernel's smallest quota.
"""

from __future__ import annotations

import os
from pathlib import Path

from flotilla.job import Job, JobError
from flotilla.sandbox.cgroupfs import MIN_SCALED_CPUS
from flotilla.spread import Spread

GiB = 1024**3
MiB = 1024**2
SERVER_HEADROOM = 1 * GiB  # the SuperLink and the ServerApp (model, central evaluation)
# A device without a memory limit uses what it uses; it counts as what one measurably needs: a SuperNode,
# its SuperExec, the warm ClientApp process and a running ClientApp (README, "What a device costs":
# ~500 MB of PSS for the PyTorch quickstart app). In a shared fleet the imports are the zygote's pages.
UNLIMITED_DEVICE = 512 * MiB
UNLIMITED_SHARED_DEVICE = 128 * MiB
SHARED_RUNTIME = 512 * MiB  # the shared fleet's warm process (flwr, the app, torch)
# A shared device's limit counts what it would hold at rest with its own copies (targets.shared_fleet), which the
# zygote holds once for all: at least this much of each limit is never the host's (measured at rest: 222 MiB for
# a NumPy app's device, 455 for the built-in app's). The rest of the limit is what the device may hold itself.
SHARED_AT_REST = 200 * MiB
SHARED_AT_REST_BUILTIN = 400 * MiB
MIN_SHARED_DEVICE = 64 * MiB
SKIP_ENV = "FLOTILLA_SKIP_MEMORY_CHECK"
SERVER_CPUS = 0.5  # what local.fit_cpus leaves of the machine's cores to the SuperLink and the ServerApp
PER_CLASS_TARGETS = {"k8s": "a class is one StatefulSet with one set of limits",
                     "swarm": "each class's limits are checked against its nodes as one value"}


def check_fleet(job: Job, target: str) -> None:
    """Refuse (JobError, exit 2, one line) a fleet this target cannot run, or that cannot fit this machine."""
    check_spreads(job, target)
    if target == "local":
        check_cpus_fit(job)
    if target == "local" and os.environ.get(SKIP_ENV, "") in ("", "0"):
        check_memory_fits(job)


def cpu_limits(job: Job, plan=None) -> list[float]:
    """Every device's CPU limit (its drawn value for a spread; from `plan` if the caller has it)."""
    from flotilla.plan import make_plan

    return [d.cpus for d in (plan or make_plan(job)).devices if d.cpus is not None]


def cpu_scale(job: Job, cores: float | None = None, plan=None) -> float:
    """local.fit_cpus: the one factor every device's CPU limit is scaled by so that the limits add up to at most
    this machine's cores less SERVER_CPUS; 1.0 when it is off or the fleet fits as declared."""
    if not job.local.fit_cpus or not (limits := cpu_limits(job, plan)):
        return 1.0
    cores = cores or machine_cores()
    return min(1.0, max(cores - SERVER_CPUS, cores / 2) / sum(limits))


def check_cpus_fit(job: Job, cores: float | None = None) -> None:
    """local.fit_cpus needs every device limited (an unlimited one would compete for the cores) and the
    smallest scaled limit within the kernel's smallest quota."""
    if not job.local.fit_cpus:
        return
    for i, cls in enumerate(job.devices):
        if cls.cpus is None:
            raise JobError(f"devices[{i}].cpus: local.fit_cpus scales every device's CPU limit and class "
                           f"{cls.name!r} has none: give it cpus, or turn local.fit_cpus off")
    from flotilla.plan import make_plan

    plan = make_plan(job)
    scale, limits = cpu_scale(job, cores, plan), cpu_limits(job, plan)
    if (low := min(limits, default=1.0)) * scale < MIN_SCALED_CPUS:
        raise JobError(f"local.fit_cpus: the fleet's CPU limits add up to {sum(limits):g} CPUs; scaled "
                       f"by {scale:.3g} to fit this machine, the smallest ({low:g}) would be under the kernel's "
                       f"smallest quota ({MIN_SCALED_CPUS:g} CPU): fewer devices, or a higher smallest limit")


def cpu_note(job: Job, target: str, cores: float | None = None) -> str | None:
    """Target local: a note when the devices' CPU limits add up to more than this machine's cores. Scaled
    (local.fit_cpus): by how much. Not scaled: the fleet still runs, but when every device is busy they share
    the cores (equal weights): each gets about cores / devices, not its limit, so their speeds differ less than
    declared (bench/fleet_density.py measures it: speed_spread; why weights do not follow the quotas:
    DeviceCgroup._yield_cpu_to_the_server)."""
    from flotilla.plan import make_plan
    from flotilla.sandbox.cgroups import cgroups_available

    if target != "local" or not cgroups_available()[0]:  # no groups: the target warns that limits do not hold
        return None
    plan = make_plan(job)
    limits = cpu_limits(job, plan)
    cores = cores or machine_cores()
    if job.local.fit_cpus:  # scaled as soon as they leave the server less than SERVER_CPUS
        if (scale := cpu_scale(job, cores, plan)) >= 1.0:
            return None
        return (f"devices: CPU limits scaled by {scale:.3g} to fit this machine's {cores:g} cores (local.fit_cpus; "
                f"they add up to {sum(limits):g} CPUs): relative speeds hold, a device's work takes "
                f"{1 / scale:.1f}x as long as on the fleet declared")
    if sum(limits) <= cores:
        return None
    return (f"devices: the fleet's CPU limits add up to {sum(limits):g} CPUs on this machine's {cores:g}: when every "
            f"device is busy each gets ~{cores / len(limits):.2g} CPU, not its limit ({min(limits):g}-{max(limits):g}),"
            f" so devices differ in speed less than declared; limits that add up to at most {cores:g} CPUs hold "
            "(local: {fit_cpus: true} scales them to fit)")


def machine_cores() -> float:
    """The CPUs this process may use: its affinity, or its cgroup's quota if that is less."""
    from flotilla.sandbox.cgroups import effective_limits_of_self

    cores = float(len(os.sched_getaffinity(0)))
    quota = effective_limits_of_self().get("cpus")
    return min(cores, quota) if quota else cores


def check_spreads(job: Job, target: str) -> None:
    if target not in PER_CLASS_TARGETS:
        return
    for i, cls in enumerate(job.devices):
        for field in ("cpus", "memory"):
            if isinstance(getattr(cls, field), Spread):
                raise JobError(f"devices[{i}].{field}: target {target!r} gives every device of a class the same "
                               f"limits ({PER_CLASS_TARGETS[target]}); a spread runs on local or compose: "
                               "give a number, or split the class into classes with one value each")


def fleet_memory(job: Job) -> dict:
    """What the fleet declares: total bytes (devices + headroom) and its parts."""
    from flotilla.plan import make_plan

    shared = job.local.shared
    unlimited_each = UNLIMITED_SHARED_DEVICE if shared else UNLIMITED_DEVICE
    at_rest = (SHARED_AT_REST_BUILTIN if job.app_spec().builtin else SHARED_AT_REST) if shared else 0
    by_class: dict[str, int] = {}
    unlimited = 0
    for d in make_plan(job).devices:
        if d.memory is None:
            unlimited += 1
        host = max(d.memory - at_rest, MIN_SHARED_DEVICE) if d.memory and shared else (d.memory or unlimited_each)
        by_class[d.device_class] = by_class.get(d.device_class, 0) + host
    devices = sum(by_class.values())
    headroom = SERVER_HEADROOM + (SHARED_RUNTIME if shared else 0)
    return {"total": devices + headroom, "devices": devices, "headroom": headroom, "unlimited": unlimited,
            "unlimited_each": unlimited_each, "by_class": by_class, "count": job.device_count}


def check_memory_fits(job: Job) -> None:
    have = machine_memory()
    if have is None:  # not Linux, or /proc unreadable: nothing to compare with
        return
    available, source = have
    need = fleet_memory(job)
    if need["total"] <= available:
        return
    big = max(need["by_class"], key=need["by_class"].get)
    idx = next(i for i, c in enumerate(job.devices) if c.name == big)
    parts = [f"{_size(need['devices'] - need['unlimited'] * need['unlimited_each'])} of memory limits"]
    if need["unlimited"]:
        parts.append(f"{need['unlimited']} devices without a limit at {_size(need['unlimited_each'])} each")
    parts.append(f"{_size(need['headroom'])} for the SuperLink and ServerApp"
                 + (" and the shared runtime" if job.local.shared else ""))
    shared = ("(a shared device holds on this machine its limit less what its processes share, at least "
              f"{_size(SHARED_AT_REST)})" if job.local.shared
              else "or local: {shared: true} (devices share the runtime's pages, ~5x less memory each; "
              "then lower the limits)")
    raise JobError(
        f"devices: {need['count']} devices need {_size(need['total'])} ({', '.join(parts)}) but this machine has "
        f"{_size(available)} available ({source}); use fewer devices, smaller memory limits (the largest class "
        f"is devices[{idx}] {big!r}, {_size(need['by_class'][big])}) {shared}; {SKIP_ENV}=1 runs it anyway")


def _size(n: int) -> str:
    return f"{n / GiB:.1f} GiB" if n >= GiB else f"{n / MiB:.0f} MiB"


# -- what this machine has ------------------------------------------------------------
def machine_memory() -> tuple[int, str] | None:
    """(bytes this process can still use, where that comes from), or None where it cannot be read."""
    found = []
    avail = _meminfo_available()
    if avail is not None:
        found.append((avail, "MemAvailable in /proc/meminfo"))
    cg = _cgroup_headroom()
    if cg is not None:
        found.append(cg)
    return min(found, key=lambda f: f[0]) if found else None


def _meminfo_available(path: Path = Path("/proc/meminfo")) -> int | None:
    try:
        for line in path.read_text().splitlines():
            key, _, rest = line.partition(":")
            if key == "MemAvailable":
                return int(rest.split()[0]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def _cgroup_headroom() -> tuple[int, str] | None:
    """The least memory left under this process's cgroup and its ancestors' limits (limit - working set)."""
    try:
        from flotilla.sandbox.cgroups import detect_layout

        layout, _ = detect_layout()
    except Exception:  # noqa: BLE001 - no cgroups to read: no limit from them
        return None
    if layout is None:
        return None
    role = "memory" if layout.version == 1 else next(iter(layout.bases))
    d, top = layout.bases.get(role), layout.mounts.get(role)
    if d is None or top is None:
        return None
    best = None
    while True:
        left = _group_left(d, layout.version)
        if left is not None and (best is None or left < best[0]):
            best = (left, f"the memory limit of cgroup {d}")
        if d == top or top not in d.parents:
            break
        d = d.parent
    return best


def _group_left(d: Path, version: int) -> int | None:
    limit_f, usage_f, cache_key = (("memory.limit_in_bytes", "memory.usage_in_bytes", "total_inactive_file")
                                   if version == 1 else ("memory.max", "memory.current", "inactive_file"))
    try:
        raw = (d / limit_f).read_text().strip()
        if raw == "max" or int(raw) >= 2**62:
            return None
        usage = int((d / usage_f).read_text().strip())
        stat = dict(line.split() for line in (d / "memory.stat").read_text().splitlines() if " " in line)
        return max(0, int(raw) - usage + int(stat.get(cache_key, 0)))
    except (OSError, ValueError):
        return None
