"""A shared fleet's memory accounting, and the measuring of one message of the app (local target).

In a shared fleet every device's processes are forks of the run's zygote:
the imports (flwr, the app, torch) are resident once, charged to the zygote.
A device holding only what it adds on top would fit into far less memory
than a real device of its class, whose processes each import what they need.
So each device is held to its class's limit as if its processes held their
own copies: `unshared_at_rest` estimates what a device that imports
everything itself holds at rest, from the zygote's own measurement, and the
device's group is held to (limit - that + what the device itself holds at
rest), so its headroom above rest is a real device's headroom.

Measured (fresh processes, cgroup v1, flwr 1.42, runtime.lean_imports on): a
device's charge at rest is its processes' anonymous memory (memory.stat rss
is the sum of their RssAnon within 0.3 MiB; file pages 0-14 MiB, shared
through the page cache): the agent, the SuperNode, the SuperExec and its
resource tracker, the warm ClientApp process (flwr's ClientApp runtime and
the app's imports) and, for the built-in app, a trainer with torch and the
data. Against the zygote's runtime stage R (65 MiB anon) and its app stage A
(what the app's imports added): devices of tests/apps/msg_numpy (A = 1 MiB)
held 222 MiB at rest, of tests/apps/torch_quickstart (A = 190) 424, of the
built-in app (A = 190) 455. RUNTIME_PROCESSES = 3.45 runtimes plus A is
within +4 and -9 MiB of the first two; the built-in app's trainer, a Python
of its own beside the warm process, adds BUILTIN_TRAINER = 40 MiB.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

RUNTIME_PROCESSES = 3.45  # a device's flwr processes, in units of the zygote's runtime stage (fitted, see above)
BUILTIN_TRAINER = 40 * 2**20  # the built-in app's trainer: its own interpreter and numpy beside the app stage


# A starting device's own pages (its Python heap, pages it copies from the zygote) are no extra memory a device
# holding its own copies would have: until settle() knows them (measured 35-110 MiB once warm), a starting device
# is allowed this much of them.
STARTING_OWN = 128 * 2**20


def starting_shared(at_rest: int) -> int:
    """What a starting device's group counts as shared: what it would hold at rest, less its own pages' allowance."""
    return max(at_rest - STARTING_OWN, 0)


def settle(cg, declared: int, at_rest: int) -> None:
    """Once a device is warm: hold its group to (declared - at_rest + what it holds now), so its headroom above
    rest is that of a device holding its own copies, and read it back as at_rest + what it adds."""
    from flotilla.sandbox.device_cgroup import page_floor

    own = cg.usage()["memory_bytes"] - cg.shared_bytes
    cg.shared_bytes = page_floor(max(at_rest - own, 0))
    cg.set_limits(memory=declared)


def unshared_at_rest(measured: dict, builtin: bool = False) -> int | None:
    """What a device whose processes import everything themselves holds at rest (bytes), from the zygote's
    measurement of itself (runtime.zygote.memory_now at its stages); None where it was not measured."""
    try:
        runtime = measured["runtime"]["anon"]
        app = max(measured["warm"]["anon"] - runtime, 0)
    except (KeyError, TypeError):
        return None
    return int(RUNTIME_PROCESSES * runtime + app + (BUILTIN_TRAINER if builtin else 0))


def read_measure(path: Path) -> dict:
    try:
        doc = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return {}
    return doc if isinstance(doc, dict) else {}


def start_probe(run, zygote_socket: str, device: str, message: Path, out: Path, cwd: Path, log: Path, env: dict):
    """Fork the zygote into a memory group of its own, without limits, to run one message (runtime.probe).
    Returns the probe's DeviceCgroup (the caller removes it), or None where cgroups cannot be made."""
    from flotilla.runtime.zygote import request
    from flotilla.sandbox.cgroups import CgroupError, DeviceCgroup, group_name

    try:
        cg = DeviceCgroup.create(group_name(run.run_id, f"probe-{device}"))
    except CgroupError as err:
        print(f"flotilla: cannot measure a message of the app on {device}: {err}", file=sys.stderr)
        return None
    if cg is None:
        return None
    argv = [sys.executable, "-m", "flotilla.runtime.probe", "--record", str(run.dir), "--device", device,
            "--message", str(message), "--group", json.dumps(cg.to_state()), "--out", str(out)]
    request(zygote_socket, argv, env, str(cwd), str(log), cg.procs_files())
    return cg


def measure_fleet(plan, run) -> int:
    """What a device holding its own copies holds at rest, from the zygote's measurement (0: not measured); a
    class whose memory limit cannot hold that is refused here, before any device starts."""
    from flotilla.errors import UserError
    from flotilla.job import format_memory
    from flotilla.sandbox.device_cgroup import MIN_PRIVATE_BYTES

    measured = read_measure(run.dir / "zygote.json")
    shared = unshared_at_rest(measured, plan.app.builtin) or 0
    run.write_state(shared_memory_bytes=shared, zygote_memory=measured)
    for idx, cls in enumerate(plan.job.devices):
        small = [d for d in plan.devices if d.device_class == cls.name and d.memory is not None
                 and d.memory - shared < MIN_PRIVATE_BYTES]
        if small:
            raise UserError(
                f"devices[{idx}].memory: {format_memory(min(d.memory for d in small))} cannot hold a device of "
                f"this app: its processes (SuperNode, SuperExec, the app's warm process) need "
                f"~{format_memory(shared + MIN_PRIVATE_BYTES)} before any message (measured); raise it")
    return shared


def settle_fleet(run) -> None:
    """The fleet is warm: each device of a shared fleet is held to its limit less what a device holding its own
    copies holds at rest, plus what it holds itself now (settle)."""
    from flotilla.sandbox.cgroups import CgroupError, DeviceCgroup

    st = run.state()
    at_rest = st.get("shared_memory_bytes")
    if not at_rest:
        return
    memory = {d["name"]: d["memory"] for d in run.plan()["devices"]}
    cgroups = dict(st.get("cgroups", {}))
    for name, cstate in cgroups.items():
        if not memory.get(name) or not cstate.get("shared_bytes"):
            continue
        try:
            cg = DeviceCgroup.from_state(cstate)
            settle(cg, memory[name], at_rest)
        except (CgroupError, OSError) as err:
            print(f"flotilla: could not settle the memory limit of {name}: {err}", file=sys.stderr)
            continue
        cgroups[name] = cg.to_state()
    run.write_state(cgroups=cgroups)
