"""The local target: the real Flower deployment engine as local processes.

One SuperLink (`python -m flotilla.runtime.superlink`, flwr's own with its
ServerApps hosted and observed) and one device per plan entry (`python -m
flotilla.runtime.device`: a SuperNode, plus the warm trainer for the
built-in app), each in its own process group and, where the machine allows,
its own cgroup holding the device's CPU and memory limits. Everything is on
loopback with free ports; FLWR_HOME is the run's own. Each process works in
the record's outputs/<process> directory, so files an app writes land in the
record. `down` works from any process from what `up` wrote to state.json.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from flotilla.contracts import DEVICE_MEMORY_ENV, MEMORY_PROBE_ENV, OWNER_LEASE_ENV, SOCKETS_DIR_ENV, RecordPaths
from flotilla.job import MemoryCheck
from flotilla.plan import Plan, format_node_config
from flotilla.runs import STATE_FILE, RunRecord
from flotilla.runtime.commands import device_command, device_threads, flower_env, record_env, superlink_command
from flotilla.runtime.engine_tuning import WAKE_ENV
from flotilla.runtime.superexec import SERVER_ZYGOTE_ENV
from flotilla.sandbox.procs import (
    ProcessError,
    free_port,
    group_pids,
    kill_groups,
    pid_alive,
    proc_cpu_s,
    proc_state,
    signal_group,
    wait_port,
)
from flotilla.targets.base import Federation, Target, TargetError
from flotilla.targets.shared_fleet import starting_shared

TEARDOWN_GRACE_S = 1.5  # the SuperLink's and zygote's time to exit on SIGTERM before SIGKILL
LIMIT_READ_S = 5.0  # device_health re-reads a device's memory limit this often


class LocalTarget(Target):
    name = "local"
    devices_share_record = True
    holds_app_for_fleet = True
    capabilities = frozenset({"throttle", "restart", "faults"})

    def __init__(self) -> None:
        self.procs: dict[str, subprocess.Popen] = {}  # held by the driver's process only
        self._state_cache: tuple | None = None  # (state.json's bytes, their parsed content): _state_snapshot
        self._health_seen: dict[str, tuple] = {}  # device -> (cpu_s, limits, when read): device_health

    def _state_snapshot(self, run: RunRecord) -> dict:
        """run.state() for reading only, parsed again only when state.json's bytes changed (compared whole: a
        file's times and inode can repeat within a few ms). The health check asks once per device every
        second: at 100 devices, parsing it each time was a third of the driver's CPU."""
        try:
            raw = (run.dir / STATE_FILE).read_bytes()
        except FileNotFoundError:
            return {}
        cached = self._state_cache
        if cached is None or cached[0] != raw:
            try:
                cached = self._state_cache = (raw, json.loads(raw))
            except json.JSONDecodeError:
                return {}
        return cached[1]

    # -- render: the commands, as a script a user could run by hand --------
    def render(self, plan: Plan, out_dir: Path) -> list[Path]:
        out_dir.mkdir(parents=True, exist_ok=True)
        job = plan.job
        env = " ".join(f"{k}={v}" for k, v in record_env("./run", run_id="", job_name=job.name,
                                                          policy=job.heterogeneity.policy,
                                                          accuracy_metric=job.metrics.accuracy,
                                                          loss_metric=job.metrics.loss).items())
        lines = [
            "#!/usr/bin/env bash",
            f"# Flotilla job {job.name!r} on the local target, as plain commands.",
            "set -euo pipefail",
            "export FLWR_TELEMETRY_ENABLED=0 FLWR_DISABLE_UPDATE_CHECK=1 FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1",
            f"{env} {' '.join(superlink_command('python', host='127.0.0.1', port=8000))} &",
        ]
        for i, d in enumerate(plan.devices):
            limits = f" (limits: cpus={d.cpus}, memory={d.memory})" if d.cpus or d.memory else ""
            lines.append(f"# {d.name}{limits}")
            cmd = self._device_command(plan, d, "127.0.0.1:8000", 9100 + i, "./run", python="python")
            lines.append(" ".join(cmd[:-1]) + f" '{cmd[-1]}' &")
        lines.append("wait")
        path = out_dir / "run-local.sh"
        path.write_text("\n".join(lines) + "\n")
        path.chmod(0o755)
        return [path]

    @staticmethod
    def _device_command(plan: Plan, d, superlink: str, port: int, record: str, python: str) -> list[str]:
        app = plan.app
        return device_command(
            python, name=d.name, device_class=d.device_class, superlink=superlink, port=port,
            node_config=format_node_config(d.node_config()), threads=device_threads(d.cpus, len(plan.devices)),
            trainer=app.builtin, preload_app=None if app.builtin else f"{record}/app", record_dir=record)

    # -- up ----------------------------------------------------------------
    def up(self, plan: Plan, run: RunRecord) -> Federation:
        from flotilla.capacity import cpu_scale
        from flotilla.sandbox.cgroups import DeviceCgroup, cgroups_available, group_name

        job = plan.job
        # the fleet stops itself when the driver's lease goes stale (the driver was killed): no orphans
        import tempfile

        port = free_port()
        # the run's sockets (zygote, trainers): AF_UNIX paths are short, so not in the record; removed by down()
        run.write_state(superlink_port=port, groups={}, cgroups={}, device_pids={},
                        sockets_dir=tempfile.mkdtemp(prefix="flotilla-run-"))
        env = self._fleet_env(run)
        # No --database: the state lives as long as this run, in memory (sqlite's locking failed runs
        # under heavy load here: "database is locked").
        server_env = env | record_env(str(run.dir), run_id=run.run_id, job_name=job.name,
                                      policy=job.heterogeneity.policy, accuracy_metric=job.metrics.accuracy,
                                      loss_metric=job.metrics.loss, hold_for_fleet=self.holds_app_for_fleet)
        if job.local.shared and not plan.app.builtin and job.memory_check != MemoryCheck.OFF:
            server_env[MEMORY_PROBE_ENV] = "1"  # round 1's messages measured first (flotilla.memory_check)
        # the zygote warms up (imports flwr, torch, the app: seconds) while the SuperLink starts
        zygote = self._start_zygote(plan, run, env) if job.local.shared else None
        if zygote is not None:  # the ServerApp forks from it too: torch, the app's imports and data are loaded there
            server_env[SERVER_ZYGOTE_ENV] = zygote[1]
        self._start_superlink(run, server_env, port)
        if zygote is not None:
            self._wait_zygote(run, *zygote)

        want_limits = any(d.cpus is not None or d.memory is not None for d in plan.devices)
        enforce, reason = cgroups_available() if want_limits else (False, "no limits asked for")
        scale = cpu_scale(job, plan=plan) if enforce else 1.0  # local.fit_cpus: the fleet's limits fit the cores
        run.write_state(limits_enforced=bool(enforce and want_limits), limits_note=reason, cpu_scale=scale)
        if want_limits and not enforce:
            print(f"flotilla: warning: devices run without their CPU/memory limits ({reason})", file=sys.stderr)
        shared = self._shared_bytes(plan, run) if zygote is not None and enforce else 0
        for d in plan.devices:
            cg = None
            if enforce and (d.cpus is not None or d.memory is not None):
                cg = DeviceCgroup.create(group_name(run.run_id, d.name), None if d.cpus is None else d.cpus * scale,
                                         d.memory, shared_bytes=starting_shared(shared) if d.memory is not None else 0)
            self._start_device(plan, run, d.name, env, cg)
        return Federation(control_address=f"127.0.0.1:{port}", output_dir=str(run.dir))

    @staticmethod
    def _shared_bytes(plan: Plan, run: RunRecord) -> int:
        from flotilla.targets.shared_fleet import measure_fleet

        return measure_fleet(plan, run)

    def fleet_warm(self, run: RunRecord) -> None:
        from flotilla.targets.shared_fleet import settle_fleet

        settle_fleet(run)

    def probe_message(self, run: RunRecord, device: str, message: Path, out: Path):
        """Run one message of the app on a fork of the zygote in a group without limits (targets.shared_fleet);
        the group to remove when done, or None where this fleet cannot (not shared, no cgroups)."""
        from flotilla.targets.shared_fleet import start_probe

        st = run.state()
        if not st.get("zygote_socket") or not st.get("limits_enforced"):
            return None
        return start_probe(run, st["zygote_socket"], device, message, out, _workdir(run, f"probe-{device}"),
                           run.log_path("probe"), self._fleet_env(run))

    @staticmethod
    def _fleet_env(run: RunRecord) -> dict:
        """Every local Flower process: its own FLWR_HOME; the fleet stops itself when the driver's lease goes
        stale (no orphans); the SuperLink wakes idle SuperNodes by UDP on loopback (no busy polling)."""
        env = flower_env() | {"FLWR_HOME": str(run.dir / "flwr"), OWNER_LEASE_ENV: str(RecordPaths(run.dir).owner),
                              WAKE_ENV: "1"}
        if sockets := run.state().get("sockets_dir"):
            env[SOCKETS_DIR_ENV] = sockets
        return env

    def _start_superlink(self, run: RunRecord, env: dict, port: int) -> None:
        log = run.log_path("superlink")
        cmd = superlink_command(sys.executable, host="127.0.0.1", port=port)
        self.procs["superlink"] = self._spawn(cmd, env, log, None, _workdir(run, "superlink"))
        self._record(run, "superlink", self.procs["superlink"].pid, None)
        try:
            wait_port(port, self.procs["superlink"], 60, "flower-superlink", log)
        except ProcessError as err:
            raise TargetError(str(err)) from None

    def _start_device(self, plan: Plan, run: RunRecord, name: str, env: dict, cg) -> None:
        st = run.state()
        if cg is not None and cg.shared_bytes and plan.device(name).memory is not None:
            env = env | {DEVICE_MEMORY_ENV: str(plan.device(name).memory)}  # its processes report the declared limit
        cmd = self._device_command(plan, plan.device(name), f"127.0.0.1:{st['superlink_port']}", free_port(),
                                   str(run.dir), sys.executable)
        if st.get("zygote_socket"):  # a shared fleet: the device is a fork of the run's warm zygote
            from flotilla.runtime.zygote import request

            pid = request(st["zygote_socket"], cmd, env, str(_workdir(run, name)), str(run.log_path(name)),
                          cg.procs_files() if cg else [])
            self.procs.pop(name, None)
        else:
            proc = self._spawn(cmd, env, run.log_path(name), cg, _workdir(run, name))
            self.procs[name] = proc
            pid = proc.pid
        self._record(run, name, pid, cg)

    def _start_zygote(self, plan: Plan, run: RunRecord, env: dict) -> tuple[subprocess.Popen, str]:
        """The run's warm process (flotilla.runtime.zygote): every device forks from it and shares its pages."""
        sock = os.path.join(run.state()["sockets_dir"], "zygote.sock")
        cmd = [sys.executable, "-m", "flotilla.runtime.zygote", "--socket", sock, "--exits", str(run.dir / "exits"),
               "--measure", str(run.dir / "zygote.json")]
        cmd += ["--builtin"] if plan.app.builtin else ["--preload-app", str(run.dir / "app")]
        proc = self.procs["zygote"] = self._spawn(cmd, env, run.log_path("zygote"), None, _workdir(run, "zygote"))
        self._record(run, "zygote", proc.pid, None)
        return proc, sock

    @staticmethod
    def _wait_zygote(run: RunRecord, proc: subprocess.Popen, sock: str) -> None:
        log = run.log_path("zygote")
        end = time.time() + 300
        while not os.path.exists(sock):
            if proc.poll() is not None:
                raise TargetError(f"the run's zygote exited with code {proc.returncode} at start-up; see {log}")
            if time.time() > end:
                raise TargetError(f"the run's zygote was not warm within 300 s; see {log}")
            time.sleep(0.1)
        run.write_state(zygote_socket=sock)

    # -- recovery and faults ---------------------------------------------------
    def restart_device(self, plan: Plan, run: RunRecord, device: str) -> None:
        """Start a dead (or stopped) device again, in its own cgroup, as `up` did."""
        from flotilla.sandbox.cgroups import CgroupError, DeviceCgroup

        pgid = run.state().get("groups", {}).get(device)
        if pgid is not None:
            kill_groups([pgid], grace_s=2.0)
        cstate = run.state().get("cgroups", {}).get(device)
        try:
            cg = DeviceCgroup.from_state(cstate) if cstate else None
        except CgroupError:
            cg = None
        self._start_device(plan, run, device, self._fleet_env(run), cg)  # (the same group: its limit holds)

    def superlink_alive(self, run: RunRecord) -> bool | None:
        proc = self.procs.get("superlink")
        if proc is not None:
            return proc.poll() is None
        pgid = run.state().get("groups", {}).get("superlink")
        return pid_alive(pgid) if pgid else None

    def inject(self, run: RunRecord, action: str, process: str) -> str:
        """kill | pause | resume a device, the superlink (its whole group) or the serverapp process."""
        sig = {"kill": signal.SIGKILL, "pause": signal.SIGSTOP, "resume": signal.SIGCONT}[action]
        if process == "serverapp":
            try:
                pid = int((run.dir / "serverapp.pid").read_text())
                os.kill(pid, sig)
                return f"{action} serverapp (pid {pid})"
            except (OSError, ValueError) as err:
                raise TargetError(f"no ServerApp process to {action} ({err})") from None
        pgid = run.state().get("groups", {}).get(process)
        if pgid is None or not signal_group(pgid, sig):
            raise TargetError(f"no process {process!r} running in run {run.run_id} to {action}")
        return f"{action} {process} (process group {pgid})"

    @staticmethod
    def _spawn(cmd, env, log: Path, cg, cwd: Path) -> subprocess.Popen:
        with open(log, "ab") as fh:
            # own session: the whole tree (superexec, ClientApps) can be ended as a group;
            # preexec enters the cgroup before exec, so no child escapes the limits.
            return subprocess.Popen(cmd, env=env, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    start_new_session=True, preexec_fn=cg.enter if cg else None, cwd=cwd)

    @staticmethod
    def _record(run: RunRecord, name: str, pid: int, cg) -> None:
        st = run.state()
        groups = st.get("groups", {}) | {name: pid}
        cgroups = st.get("cgroups", {}) | ({name: cg.to_state()} if cg else {})
        run.write_state(groups=groups, cgroups=cgroups)

    # -- status --------------------------------------------------------------
    def device_states(self, run: RunRecord) -> dict[str, str]:
        out = {}
        for name, pid in self._state_snapshot(run).get("groups", {}).items():
            if name in ("superlink", "zygote"):
                continue
            proc = self.procs.get(name)
            alive = proc.poll() is None if proc is not None else pid_alive(pid)
            out[name] = "running" if alive else "exited"
        return out

    def exit_code(self, run: RunRecord, device: str) -> int | None:
        proc = self.procs.get(device)
        if proc is not None:
            return proc.poll()
        from flotilla.runtime.zygote import exit_code

        pid = run.state().get("groups", {}).get(device)
        return exit_code(run.dir / "exits", pid) if pid else None

    def device_health(self, run: RunRecord, device: str):
        from flotilla.sandbox.cgroups import CgroupError, DeviceCgroup
        from flotilla.watchdog import Health

        st = self._state_snapshot(run)
        pgid = st.get("groups", {}).get(device)
        if pgid is None:
            return None
        cstate = st.get("cgroups", {}).get(device)
        cpu_s = memory = None
        limits: dict = {}
        pressure = {"limit_hits": 0, "major_faults": 0}
        pids: set[int] = set()
        ran = False  # it used CPU since the last sample: not every process of it is stopped (no /proc reads)
        now = time.time()
        if cstate:  # the kernel's own accounting of the device (no /proc scan: cheap for big fleets)
            try:
                cg = DeviceCgroup.from_state(cstate)
                pids = set(cg.pids())
                use = cg.usage()
                cpu_s, memory = use["cpu_seconds"], use["memory_bytes"]
                seen = self._health_seen.get(device)
                # its limit changes only when throttled: read every LIMIT_READ_S (at 100 devices the driver's
                # once-a-second health pass was a tenth of a core, most of it file reads)
                read_at = seen[2] if seen and now - seen[2] < LIMIT_READ_S else None
                limits = seen[1] if read_at else cg.read_limits()
                pressure = cg.memory_pressure() | {"oom_kills": cg.oom_kills()}
            except (CgroupError, OSError):
                return None
            self._health_seen[device] = (cpu_s, limits, read_at or now)
            ran = bool(pids and seen and cpu_s is not None and seen[0] is not None and cpu_s > seen[0])
        else:
            pids = group_pids(pgid)
        if ran:
            stopped = False
        else:
            states = [s for s in (proc_state(p) for p in pids) if s and s != "Z"]
            if not states:
                return None
            stopped = all(s in "Tt" for s in states)
        if cpu_s is None:
            cpu_s = sum(proc_cpu_s(p) for p in pids)
        return Health(t=now, stopped=stopped, cpu_s=cpu_s, memory=memory, limit=limits.get("memory"),
                      cpus=limits.get("cpus"), **pressure)

    def stop_device(self, run: RunRecord, device: str) -> None:
        pgid = run.state().get("groups", {}).get(device)
        if pgid is not None:
            kill_groups([pgid], grace_s=2.0)

    def resource_usage(self, run: RunRecord) -> list[dict]:
        from flotilla.sandbox.cgroups import CgroupError, DeviceCgroup

        st = self._state_snapshot(run)
        classes = {d["name"]: d["device_class"] for d in run.plan()["devices"]}
        out = []
        for name, cstate in st.get("cgroups", {}).items():
            try:
                cg = DeviceCgroup.from_state(cstate)
                use, lim = cg.usage(), cg.read_limits()
            except (CgroupError, OSError):
                continue  # removed at the end of the run
            out.append({"device": name, "device_class": classes.get(name, ""),
                        "cpu_seconds_total": use["cpu_seconds"], "memory_bytes": use["memory_bytes"],
                        "memory_limit_bytes": lim.get("memory"), "cpu_quota": lim.get("cpus")})
        return out

    def explain_exit(self, run: RunRecord, device: str) -> str | None:
        from flotilla.job import format_memory
        from flotilla.sandbox.cgroups import CgroupError, DeviceCgroup

        cstate = run.state().get("cgroups", {}).get(device)
        if not cstate:
            return None
        try:
            cg = DeviceCgroup.from_state(cstate)
            if cg.oom_kills() == 0:
                return None
            limit = cg.read_limits().get("memory")
        except (CgroupError, OSError):
            return None
        plan = run.plan()
        dev = next(d for d in plan["devices"] if d["name"] == device)
        idx = next(i for i, c in enumerate(plan["job"]["devices"]) if c["name"] == dev["device_class"])
        return (f"killed by its memory limit ({format_memory(limit) if limit else '?'}) while training with batch size "
                f"{dev['train']['batch_size']}; raise devices[{idx}].memory or lower its train.batch_size")

    # -- down ----------------------------------------------------------------
    def down(self, run: RunRecord) -> None:
        from flotilla.sandbox.cgroups import CgroupError, DeviceCgroup, cleanup_run, run_prefix

        st = run.state()
        groups = st.get("groups", {})
        # Devices at once and without a grace period: a finished (or stopped) run's devices have nothing to
        # save (outputs are written as they go, sockets live in sockets_dir), and 100 SuperNodes ending
        # gracefully took ~3.7 s of 2 busy cores. Then the SuperLink and the zygote, which may deregister.
        kill_groups([g for n, g in groups.items() if n not in ("superlink", "zygote")], grace_s=0)
        kill_groups([groups[n] for n in ("superlink", "zygote") if n in groups], grace_s=TEARDOWN_GRACE_S)
        for d in (st.get("sockets_dir"), st.get("zygote_dir")):  # (zygote_dir: records of earlier versions)
            if d:
                import shutil

                shutil.rmtree(d, ignore_errors=True)
        for proc in self.procs.values():
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
        for name, cstate in st.get("cgroups", {}).items():
            try:
                DeviceCgroup.from_state(cstate).destroy()
            except CgroupError as err:
                print(f"flotilla: could not remove the cgroup of {name}: {err}", file=sys.stderr)
        try:  # and any the state does not list: a device's, made as Ctrl-C stopped `up` before it was recorded
            cleanup_run(run_prefix(run.run_id))
        except (CgroupError, ValueError) as err:
            print(f"flotilla: could not remove the run's cgroups: {err}", file=sys.stderr)
        self._sweep(run)

    @staticmethod
    def _sweep(run: RunRecord) -> None:
        """Kill any Flower process still holding this run's paths (e.g. a ServerApp that left its group)."""
        marker = str(run.dir)
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit() or int(entry.name) == os.getpid():
                continue
            try:
                with open(f"/proc/{entry.name}/environ", "rb") as fh:
                    if f"FLWR_HOME={marker}/flwr".encode() not in fh.read():
                        continue
                os.kill(int(entry.name), signal.SIGKILL)
            except (OSError, ValueError):
                continue


def _workdir(run: RunRecord, process: str) -> Path:
    """A process's working directory: the record's outputs/<process> (what an app writes there is kept)."""
    d = run.dir / "outputs" / process
    d.mkdir(parents=True, exist_ok=True)
    return d

