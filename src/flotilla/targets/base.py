"""The one small interface every target implements.

A target turns a Plan into a running federation (SuperLink + one SuperNode
per device) and takes it down again. Submitting the Flower App, following
the run and writing the record is the driver's job (flotilla.driver), the
same for every target. Adding a target = one new module + one line in
flotilla.targets.REGISTRY.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path

from flotilla.errors import UserError
from flotilla.plan import Plan
from flotilla.runs import RunRecord


class TargetError(UserError):
    """A target cannot do what was asked; the message says what to do. Raised before a run (render,
    validation: exit 2) or while starting one (the driver records the run as failed)."""


@dataclass
class Federation:
    """What the driver needs to submit an app to a started federation."""

    control_address: str  # host:port of the SuperLink's Control API, as seen from this machine
    insecure: bool = True
    root_certificates: str | None = None  # path to the CA cert when TLS is on
    # Where the ServerApp writes its records, as seen by the ServerApp
    # (containers mount the run directory at another path).
    output_dir: str | None = None
    # Port the ServerApp serves Prometheus metrics on, inside its container (0: the driver serves them).
    serverapp_metrics_port: int = 0


class Target(ABC):
    name: str = ""
    # Devices write into the run record (their node ids, when they are warm): local processes, and
    # containers on one host with the record mounted. Elsewhere the driver only sees the nodes online.
    devices_share_record: bool = False
    # Its ServerApps wait for the driver's word that the fleet is connected (contracts.HOLD_FOR_FLEET_ENV), so
    # the driver submits the app as the fleet starts: the ServerApp's start-up (importing the app, torch) is
    # done by the time the last device connects. Elsewhere the driver submits once the fleet is connected.
    holds_app_for_fleet: bool = False
    # What a job may ask of this target (flotilla.targets.check_job refuses the rest, exit 2):
    # "throttle" (live limits), "gpus", "placement" (hostname/labels/arch), "tls", "restart" (a device
    # again after it died: restart_device), "faults" (inject).
    capabilities: frozenset[str] = frozenset()

    @abstractmethod
    def render(self, plan: Plan, out_dir: Path) -> list[Path]:
        """Write the artifacts that run `plan` on this target; return their paths."""

    @abstractmethod
    def up(self, plan: Plan, run: RunRecord) -> Federation:
        """Start the SuperLink and every device; return once the SuperLink answers.

        Must record in run.state() whatever `down` needs to clean up from
        another process (pids, process groups, cgroups, project names).
        """

    @abstractmethod
    def device_states(self, run: RunRecord) -> dict[str, str]:
        """Device name -> 'running' | 'exited' | 'starting' | 'stopped'."""

    def fleet_warm(self, run: RunRecord) -> None:
        """Every device is connected and warm (round 1 is next): where the target must, it settles limits now."""

    def probe_message(self, run: RunRecord, device: str, message: Path, out: Path):
        """Run one message of the app for a device of its class in a group without limits and write what it
        cost to `out` (flotilla.memory_check); returns a handle with destroy(), or None where it cannot."""
        return None

    @abstractmethod
    def down(self, run: RunRecord) -> None:
        """Stop and remove everything `up` started. Idempotent; safe from any process."""

    def explain_exit(self, run: RunRecord, device: str) -> str | None:
        """Why a device ended, when the target can tell (e.g. killed by its memory limit)."""
        return None

    def exit_code(self, run: RunRecord, device: str) -> int | None:
        """A device's exit code, once it has exited (None while it runs or when the target cannot tell)."""
        return None

    def device_health(self, run: RunRecord, device: str):
        """A flotilla.watchdog.Health sample of a running device (its processes, CPU, memory pressure), where
        the target can read the kernel's view; None where it cannot (then only exits are noticed)."""
        return None

    def stop_device(self, run: RunRecord, device: str) -> None:
        """End one device (it is stuck); the rest of the federation goes on."""

    def superlink_alive(self, run: RunRecord) -> bool | None:
        """Is the SuperLink's process up? None where the target cannot see it (the Control API then tells)."""
        return None

    def restart_device(self, plan: Plan, run: RunRecord, device: str) -> None:
        """Start a device again after it died or was stopped (capability "restart")."""
        raise TargetError(f"target {self.name!r} cannot restart a device")

    def inject(self, run: RunRecord, action: str, process: str) -> str:
        """A fault (capability "faults"): action kill | pause | resume, process a device name, "superlink" or
        "serverapp". Returns what was done, in words."""
        raise TargetError(f"target {self.name!r} cannot inject faults")

    def collect_outputs(self, run: RunRecord) -> None:
        """Bring the files the apps wrote (their working directories) into the record's outputs/.
        Targets whose working directories are the record's own (local, compose mounts) have nothing to do."""

    def resource_usage(self, run: RunRecord) -> list[dict]:
        """Per device: {"device", "device_class", "cpu_seconds_total", "memory_bytes", "memory_limit_bytes",
        "cpu_quota"}, for the metrics endpoint and the report. Targets whose engine exports it (cAdvisor) may
        return []."""
        return []

    def log_path(self, run: RunRecord, device: str | None) -> Path:
        """Log file of a device (or of the SuperLink when device is None)."""
        return run.log_path(device or "superlink")
