"""What the parts of Flotilla hand each other: record files and the words in them.

Every writer and reader of a run record uses these names, so the driver,
`status`, the live view, Prometheus, the report and the benchmarks count a
device's round the same way.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from pathlib import Path

RUN_CONFIG_FILE = "run_config.toml"


class DeviceStatus:
    """A device's part in one round (the `status` of a metrics.jsonl device row)."""

    OK = "ok"  # replied with its work
    PARTIAL = "partial"  # auto: stopped at its deadline with fewer steps than planned (its work still counts)
    STALE = "stale"  # auto: a late reply from an earlier round, applied now
    LATE = "late"  # the round stopped waiting for it (deadline, or the app's timeout)
    BUSY = "busy"  # auto: still working on an earlier round's message, not sent one
    ASYNC = "async"  # auto: sent work the round did not wait for (its reply comes as stale)
    LOST = "lost"  # its process died or it stopped answering
    FAILED = "failed"  # replied with an error (the ClientApp raised)
    IDLE = "idle"  # took no part in training this round (e.g. evaluation only)

    TRAINED = (OK, PARTIAL, STALE)  # its training reached the server this round
    PROBLEMS = (LATE, LOST, FAILED)  # worth counting as failures (busy/async are by design)


def trained(row: dict) -> bool:
    return row.get("status", DeviceStatus.OK) in DeviceStatus.TRAINED


@dataclass(frozen=True)
class RecordPaths:
    """The files of a run record, for processes that hold only its directory (the ServerApp, devices)."""

    dir: Path

    @property
    def metrics(self) -> Path:  # one line per round
        return self.dir / "metrics.jsonl"

    @property
    def messages(self) -> Path:  # one line per message sent and per reply (observed)
        return self.dir / "messages.jsonl"

    @property
    def round_starts(self) -> Path:  # one line per round as it begins
        return self.dir / "round_starts.jsonl"

    @property
    def devices(self) -> Path:  # capability reports
        return self.dir / "devices.jsonl"

    @property
    def lost_devices(self) -> Path:  # written by the driver: devices the server must not wait for
        return self.dir / "lost_devices.json"

    @property
    def nodes(self) -> Path:  # <device>.json: the Flower node id each device got; <device>.ready: it is warm
        return self.dir / "nodes"

    @property
    def fleet(self) -> Path:  # written by the driver once the fleet is connected (a held ServerApp then starts)
        return self.dir / "fleet_connected.json"

    @property
    def run_config(self) -> Path:  # what the Plan gives the app (flwr run --run-config), written before the fleet
        return self.dir / RUN_CONFIG_FILE

    @property
    def weights(self) -> Path:  # the final global model
        return self.dir / "weights.npz"

    @property
    def observed(self) -> Path:  # what the ServerApp's observer saw, written when the app ends
        return self.dir / "observed.json"

    @property
    def checkpoints(self) -> Path:  # round-<r>.npz: the global model after round r (the last few)
        return self.dir / "checkpoints"

    @property
    def checkpoint(self) -> Path:  # the newest checkpoint: round, model file, the strategy's state
        return self.dir / "checkpoint.json"

    @property
    def resume(self) -> Path:  # written by the driver: the next ServerApp continues from this checkpoint
        return self.dir / "resume.json"

    @property
    def owner(self) -> Path:  # the driver's lease: its fleet stops itself when this goes stale
        return self.dir / "owner.lease"

    @property
    def outputs(self) -> Path:  # files the apps wrote in their working directories
        return self.dir / "outputs"

    @property
    def logs(self) -> Path:
        return self.dir / "logs"

    @property
    def probe(self) -> Path:  # round 1's messages measured before they are sent (flotilla.memory_check)
        return self.dir / "probe"


STAMP_KEY = "flotilla.observed"  # the ConfigRecord a Flotilla device adds to each reply (removed on the server)

# Environment of Flotilla's Flower processes (set by every target).
RECORD_DIR_ENV = "FLOTILLA_RECORD_DIR"  # the run record as the process sees it
ACCURACY_KEY_ENV = "FLOTILLA_ACCURACY_METRIC"
LOSS_KEY_ENV = "FLOTILLA_LOSS_METRIC"
POLICY_ENV = "FLOTILLA_POLICY"
METRICS_PORT_ENV = "FLOTILLA_METRICS_PORT"  # the ServerApp serves Prometheus metrics here (containers)
RUN_ID_ENV = "FLOTILLA_RUN_ID"
JOB_NAME_ENV = "FLOTILLA_JOB_NAME"
OWNER_LEASE_ENV = "FLOTILLA_OWNER_LEASE"  # the driver's lease file: the fleet stops itself when it goes stale
# "1": the hosted ServerApp waits for the driver's word that the fleet is connected (RecordPaths.fleet) before
# running the app; the driver then submits the app while the fleet still starts (Target.holds_app_for_fleet)
HOLD_FOR_FLEET_ENV = "FLOTILLA_HOLD_FOR_FLEET"
# "1": the hosted ServerApp leaves round 1's first train messages for the driver to measure (memory_check)
# and sends them once it has its verdict
MEMORY_PROBE_ENV = "FLOTILLA_MEMORY_PROBE"
SOCKETS_DIR_ENV = "FLOTILLA_SOCKETS_DIR"  # where a local device makes its sockets (the run's sockets_dir)
# a shared fleet's device: its memory limit as the job declares it, in bytes (the kernel holds its group to less:
# what it shares with the run's zygote is counted as its own; targets.shared_fleet). Its processes report this.
DEVICE_MEMORY_ENV = "FLOTILLA_DEVICE_MEMORY_BYTES"
OWNER_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class BuiltinConfig:
    """The built-in app's run config, typed. Its FAB's pyproject declares the same keys and defaults
    (tests/test_contracts.py holds them together); Flower's keys are these names with '-' for '_'."""

    num_server_rounds: int = 5
    dataset: str = "mnist-5k"
    data_path: str = ""
    partition: str = "iid"
    alpha: float = 0.5
    shards_per_device: int = 2
    partition_seed: int = 42
    test_fraction: float = 0.2
    fraction_train: float = 1.0
    min_devices: int = 2
    expected_devices: int = 0
    fleet_wait_s: float = 60.0
    round_timeout_s: float = 600.0
    batch_size: int = 32
    lr: float = 0.02
    local_epochs: float = 1.0
    momentum: float = 0.9
    policy: str = "manual"
    deadline_factor: float = 1.5
    proximal_mu: float = 0.0
    train_ahead: int = 0
    seed: int = 0

    def to_flower(self) -> dict:
        return {k.replace("_", "-"): v for k, v in asdict(self).items()}

    @classmethod
    def from_flower(cls, cfg) -> "BuiltinConfig":
        """From a Context.run_config: each value as its field's type; missing keys take the defaults."""
        out = {}
        for f in fields(cls):
            key = f.name.replace("_", "-")
            if key in cfg and cfg[key] not in (None, ""):
                out[f.name] = type(getattr(cls, f.name))(cfg[key])
        return cls(**out)
