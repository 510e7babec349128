"""The job file: one YAML document describing a federated-learning job.

Validated with pydantic. `load_job` is the one place that turns a validation
error into the one-line message users see (`JobError`, exit code 2).
"""

from __future__ import annotations

import re
from enum import Enum
from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, WithJsonSchema, field_validator, model_validator

from flotilla.errors import UserError
from flotilla.spread import Spread, parse_limit, spread_json_schema

BUILTIN_APPS = ("mnist",)
DATASETS = ("mnist-5k", "mnist", "digits")
TARGETS = ("local", "compose", "swarm", "k8s")

_MEM_UNITS = {
    "": 1, "b": 1,
    "k": 1024, "kb": 1024, "kib": 1024,
    "m": 1024**2, "mb": 1024**2, "mib": 1024**2,
    "g": 1024**3, "gb": 1024**3, "gib": 1024**3,
}
_NAME_RE = re.compile(r"^[a-z0-9]([a-z0-9-]{0,40}[a-z0-9])?$")


class JobError(UserError):
    """A bad job file; the message is one line naming the field or file."""


def parse_memory(value: str | int) -> int:
    """'512m', '1g', '1.5GiB' or a byte count -> bytes."""
    if isinstance(value, int):
        return value
    m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([a-zA-Z]*)\s*", str(value))
    if not m or m.group(2).lower() not in _MEM_UNITS:
        raise ValueError(f"{value!r} is not a memory size; use e.g. 512m or 2g")
    return int(float(m.group(1)) * _MEM_UNITS[m.group(2).lower()])


def format_memory(n: int) -> str:
    """Bytes -> the shortest exact docker-style size ('512m', '2g')."""
    for unit, size in (("g", 1024**3), ("m", 1024**2), ("k", 1024)):
        if n % size == 0:
            return f"{n // size}{unit}"
    return str(n)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Partition(_Strict):
    kind: Literal["iid", "dirichlet", "shards"] = "iid"
    alpha: float = Field(0.5, gt=0, description="Dirichlet concentration; smaller is more skewed.")
    shards_per_device: int = Field(2, ge=1, description="Label-sorted shards each device gets (kind: shards).")
    seed: int = 42


class Data(_Strict):
    dataset: Literal["mnist-5k", "mnist", "digits"] = "mnist-5k"
    path: Path | None = Field(None, description="Directory holding MNIST IDX files (dataset: mnist).")
    partition: Partition = Partition()
    test_fraction: float = Field(0.2, gt=0, lt=1, description="Held-out share for central evaluation.")

    @model_validator(mode="after")
    def _path_for_mnist(self) -> "Data":
        if self.dataset == "mnist" and self.path is None:
            raise ValueError("dataset 'mnist' needs data.path: a directory with the MNIST IDX files")
        return self


class Train(_Strict):
    batch_size: int = Field(32, ge=1, le=65536)
    lr: float = Field(0.02, gt=0, le=10)
    local_epochs: float = Field(1, gt=0, le=1000, description="Passes over the local data per round; may be fractional.")
    momentum: float = Field(0.9, ge=0, lt=1)


class TrainOverride(_Strict):
    batch_size: int | None = Field(None, ge=1, le=65536)
    lr: float | None = Field(None, gt=0, le=10)
    local_epochs: float | None = Field(None, gt=0, le=1000)
    momentum: float | None = Field(None, ge=0, lt=1)


class Strategy(_Strict):
    name: Literal["fedavg"] = "fedavg"
    fraction_train: float = Field(1.0, gt=0, le=1)
    min_devices: int = Field(2, ge=1, description="Fewest devices a round needs; the run fails below it.")
    start_timeout_s: float = Field(
        300, gt=0, le=86400,
        description="The app starts once every device is connected, or after this long with the devices that "
        "came (if at least min_devices did).")


class Metrics(_Strict):
    accuracy: str = Field("accuracy", min_length=1, description="The app's name for its accuracy metric.")
    loss: str = Field("loss", min_length=1, description="The app's name for its loss metric.")


class Placement(_Strict):
    hostname: str | None = Field(None, description="Swarm node.hostname / k8s kubernetes.io/hostname.")
    labels: dict[str, str] = Field({}, description="Node labels a device's host must carry.")
    arch: str | None = Field(None, description="CPU architecture, e.g. arm64 or amd64.")
    tolerations: list[dict] = Field([], description="k8s: tolerations for the device pods.")


MAX_CLASS_DEVICES = 1024


class DeviceClass(_Strict):
    name: str
    count: int = Field(1, ge=1, le=MAX_CLASS_DEVICES)
    cpus: float | Annotated[Spread, WithJsonSchema(spread_json_schema("cpus"))] | None = Field(
        None, description="CPU quota; fractional allowed. Or a spread, drawn per device: {uniform: [0.1, 1.0]}, "
        "{choice: [0.25, 0.5, 1.0], weights: [2, 1, 1]}, {lognormal: {median: 0.5, sigma: 0.6, min: 0.1, max: 2}}.")
    memory: int | Annotated[Spread, WithJsonSchema(spread_json_schema("memory"))] | None = Field(
        None, description="Memory limit, e.g. 512m or 2g. Or a spread of sizes, drawn per device: "
        "{uniform: [512m, 2g]}, {choice: [512m, 1g]}, {lognormal: {median: 768m, sigma: 0.4, min: 256m, max: 4g}}.")
    seed: int | None = Field(None, description="Seed of this class's spreads (default: the job's fleet_seed).")
    gpus: int = Field(0, ge=0, le=16, description="nvidia.com/gpu per device (k8s; swarm/compose: GPU runtime).")
    train: TrainOverride = TrainOverride()
    placement: Placement = Placement()

    @field_validator("cpus", mode="before")
    @classmethod
    def _cpus(cls, v):
        return parse_limit(v, "cpus")

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not _NAME_RE.match(v):
            raise ValueError("use lower-case letters, digits and '-' (like a hostname)")
        return v

    @field_validator("memory", mode="before")
    @classmethod
    def _memory(cls, v):
        return parse_limit(v, "memory", parse_memory)


class ThrottleStep(_Strict):
    device: str
    at_s: float | None = Field(None, ge=0, description="Seconds after the first round starts.")
    at_round: int | None = Field(None, ge=1)
    cpus: float | None = Field(None, gt=0)
    memory: int | None = None

    @field_validator("memory", mode="before")
    @classmethod
    def _memory(cls, v):
        return None if v is None else parse_memory(v)

    @model_validator(mode="after")
    def _when(self) -> "ThrottleStep":
        if (self.at_s is None) == (self.at_round is None):
            raise ValueError("give exactly one of at_s or at_round")
        if self.cpus is None and self.memory is None:
            raise ValueError("give cpus or memory (or both)")
        return self


class Heterogeneity(_Strict):
    # manual with no per-class overrides is plain FedAvg with one parameter set.
    policy: Literal["none", "manual", "auto"] = "manual"
    deadline_factor: float = Field(1.5, gt=1, description="auto: round deadline = factor x median device time.")
    proximal_mu: float = Field(0.0, ge=0, description="auto: FedProx proximal term weight (0 = off).")
    train_ahead: bool | None = Field(
        None,
        description="auto (on unless false): devices keep training while their reply travels and the server "
        "aggregates; the progress is carried onto the next global model (no idle time between rounds).",
    )

    @property
    def trains_ahead(self) -> bool:
        """The built-in app's devices train ahead (a user's app trains in its own ClientApp)."""
        return self.policy == "auto" and self.train_ahead is not False
    throttle: list[ThrottleStep] = []


class Recovery(_Strict):
    max_restarts: int = Field(
        3, ge=0, le=100, description="Times the federation or the ServerApp is restarted after a crash (the run "
        "resumes from its last checkpoint) before the run fails; 0: no automatic recovery.")
    device_restarts: int = Field(
        5, ge=0, le=1000, description="Times each device is restarted (with back-off) after it dies or hangs before "
        "it counts as lost for good; 0: never.")


FAULT_PROCESSES = ("superlink", "serverapp")


class Fault(_Strict):
    """One fault to inject, for tests and demos: what and when."""

    at_round: int | None = Field(None, ge=1, description="When this round starts.")
    at_s: float | None = Field(None, ge=0, description="Seconds after round 1 starts.")
    kill: str | None = Field(None, description="SIGKILL a device, the superlink or the serverapp.")
    pause: str | None = Field(None, description="SIGSTOP a device, the superlink or the serverapp (a hang).")
    for_s: float | None = Field(None, gt=0, description="pause: resume it after this long (default: never).")

    @model_validator(mode="after")
    def _one(self) -> "Fault":
        if (self.at_s is None) == (self.at_round is None):
            raise ValueError("give exactly one of at_s or at_round")
        if (self.kill is None) == (self.pause is None):
            raise ValueError("give exactly one of kill or pause")
        if self.for_s is not None and self.pause is None:
            raise ValueError("for_s goes with pause")
        return self

    @property
    def action(self) -> str:
        return "kill" if self.kill else "pause"

    @property
    def process(self) -> str:
        return self.kill or self.pause or ""


class LocalOptions(_Strict):
    shared: bool = Field(
        True, description="Devices fork from one warm process per run (flwr, the app and torch imported once) "
        "and share its read-only memory: start-up in seconds and a fraction of the host memory per device. Each "
        "device is still held to its class's memory limit as if its processes held their own copies: the kernel "
        "holds its group to the limit less what they would have held (measured by the warm process). False: each "
        "device's processes start Python and import everything themselves.")
    fit_cpus: bool = Field(
        False, description="Scale every device's CPU limit by one factor so that the fleet's limits fit this "
        "machine's cores (less 0.5 for the SuperLink and the ServerApp). Devices then never compete for a core, so "
        "their relative speeds hold as declared; their work takes 1/factor as long. Off: a fleet whose limits add "
        "up to more than the cores shares them, and its devices differ in speed less than declared.")


AppConfigValue = bool | int | float | str


class MemoryCheck(str, Enum):
    """What a run does when a class's memory cannot hold one message of the app (measured before round 1)."""

    REFUSE = "refuse"  # stop the run, exit 2, saying which class needs how much
    NOTE = "note"  # go on (its devices' messages fail at once) with a note in the output and the summary
    OFF = "off"  # do not measure


class Job(_Strict):
    name: str
    app: str = Field("mnist", description="A built-in app (mnist) or a path to a Flower App directory "
                     "(relative paths are taken from the job file's folder).")
    app_config: dict[str, AppConfigValue] = Field(
        {}, description="Run-config overrides for the app, like `flwr run --run-config` (keys the app declares).")
    metrics: Metrics = Metrics()
    data: Data = Data()
    rounds: int = Field(5, ge=1, le=10000)
    strategy: Strategy = Strategy()
    train: Train = Train()
    heterogeneity: Heterogeneity = Heterogeneity()
    recovery: Recovery = Recovery()
    local: LocalOptions = LocalOptions()
    memory_check: MemoryCheck = Field(
        MemoryCheck.REFUSE, description="Before round 1 the app's ClientApp runs once on round 1's message for each "
        "class (local target, shared fleet) and its memory is measured: refuse stops a run where a class cannot "
        "hold it (exit 2, naming the class and the memory it needs); note goes on with a note; off skips it.")
    faults: list[Fault] = Field([], description="Faults to inject (tests, demos): kill or pause a process.")
    devices: list[DeviceClass] = Field(min_length=1)
    target: Literal["local", "compose", "swarm", "k8s"] = "local"
    runs_dir: Path = Path("runs")
    seed: int = 0
    fleet_seed: int = Field(0, description="Seed of the devices' spreads of limits (a class's cpus/memory drawn per "
                            "device); the same job file always draws the same fleet.")

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not _NAME_RE.match(v):
            raise ValueError("use lower-case letters, digits and '-'")
        return v

    @model_validator(mode="after")
    def _fleet(self) -> "Job":
        names = [d.name for d in self.devices]
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise ValueError(f"device class names must be unique; repeated: {', '.join(sorted(dup))}")
        if self.heterogeneity.policy == "none":
            for i, d in enumerate(self.devices):
                if d.train.model_dump(exclude_none=True):
                    raise ValueError(
                        f"devices[{i}].train overrides are ignored under heterogeneity.policy 'none'; "
                        "remove them or use policy 'manual'"
                    )
        if self.heterogeneity.train_ahead and self.heterogeneity.policy != "auto":
            raise ValueError(
                f"heterogeneity.train_ahead works under policy 'auto' only (policy is "
                f"{self.heterogeneity.policy!r}); remove it or use policy 'auto'"
            )
        known = {f"{d.name}-{i}" for d in self.devices for i in range(1, d.count + 1)}
        for i, step in enumerate(self.heterogeneity.throttle):
            if step.device not in known:
                raise ValueError(
                    f"heterogeneity.throttle[{i}].device {step.device!r} is not a device of this job "
                    f"(devices are named <class>-<n>, e.g. {sorted(known)[0]})"
                )
        for i, f in enumerate(self.faults):
            if f.process not in known and f.process not in FAULT_PROCESSES:
                raise ValueError(f"faults[{i}].{f.action} {f.process!r} is neither a device of this job nor one of "
                                 f"{', '.join(FAULT_PROCESSES)} (devices are named <class>-<n>, e.g. {sorted(known)[0]})")
        total = sum(d.count for d in self.devices)
        if self.strategy.min_devices > total:
            raise ValueError(
                f"strategy.min_devices is {self.strategy.min_devices} but the fleet has only {total} devices"
            )
        return self

    @property
    def device_count(self) -> int:
        return sum(d.count for d in self.devices)

    @property
    def builtin_app(self) -> bool:
        return self.app in BUILTIN_APPS

    def app_spec(self):
        """The app's declaration (its pyproject.toml)."""
        from flotilla.appspec import AppSpec, builtin_app

        return builtin_app() if self.builtin_app else AppSpec.load(self.app)


def _field_path(loc: tuple) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out


def _first_error(err: ValidationError, source: str) -> str:
    e = err.errors()[0]
    loc = tuple(p for p in e["loc"] if not (isinstance(p, str) and p.startswith(("function-", "literal["))))
    field = _field_path(loc)
    msg = e["msg"].removeprefix("Value error, ")
    if e["type"] == "extra_forbidden":
        msg = "unknown field; check its spelling (flotilla schema lists the fields)"
    elif e["type"] == "missing":
        msg = "required field is missing"
    more = f" (and {len(err.errors()) - 1} more)" if len(err.errors()) > 1 else ""
    return f"{source}: {field}: {msg}{more}" if field else f"{source}: {msg}{more}"  # job-wide checks name it


def parse_job(doc: object, source: str = "job") -> Job:
    if not isinstance(doc, dict):
        raise JobError(f"{source}: expected a mapping of job fields at the top level")
    try:
        return Job.model_validate(doc)
    except ValidationError as err:
        raise JobError(_first_error(err, source)) from None


def load_job(path: str | Path, check_paths: bool = True) -> Job:
    """Read, validate and resolve a job file. Relative paths are taken from the file's folder."""
    path = Path(path)
    if not path.is_file():
        raise JobError(f"{path}: job file not found")
    try:
        doc = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise JobError(f"{path}: not valid YAML{where}") from None
    job = parse_job(doc, str(path))
    resolve_paths(job, path.resolve().parent)
    if check_paths:
        check_job_paths(job, str(path))
    return job


def resolve_paths(job: Job, base: Path) -> None:
    """Relative paths in a job are taken from the job file's folder (as a user reading the file expects)."""
    if job.data.path is not None and not job.data.path.is_absolute():
        job.data.path = base / job.data.path
    if not job.builtin_app and not Path(job.app).is_absolute():
        job.app = str((base / job.app).resolve())
    if "runs_dir" in job.model_fields_set and not job.runs_dir.is_absolute():
        job.runs_dir = base / job.runs_dir


def check_job_paths(job: Job, source: str = "job") -> None:
    """What needs the file system: the data directory and the app (its config keys and types)."""
    from flotilla.appspec import AppError

    if job.data.path is not None and not job.data.path.is_dir():
        raise JobError(f"{source}: data.path: {job.data.path} is not a directory; point it at the MNIST IDX files")
    if job.data.dataset == "mnist":  # read the files now: garbage fails here, not in the ServerApp minutes later
        from flotilla.data.datasets import DataError, load_mnist_idx

        try:
            x, _, _, _ = load_mnist_idx(job.data.path)
        except DataError as err:
            raise JobError(f"{source}: data.path: {err}") from None
        if len(x) < job.device_count:
            raise JobError(f"{source}: data.path: {len(x)} images for {job.device_count} devices; give each at least one")
    if not job.builtin_app and not (Path(job.app) / "pyproject.toml").is_file():
        raise JobError(
            f"{source}: app: {job.app!r} is neither a built-in app ({', '.join(BUILTIN_APPS)}) "
            "nor a Flower App directory with a pyproject.toml"
        )
    try:
        spec = job.app_spec()
    except AppError as err:
        raise JobError(f"{source}: app: {err}") from None
    try:
        for key, value in job.app_config.items():
            spec.typed(key, value, f"{source}: app_config.{key}")
    except AppError as err:
        raise JobError(str(err)) from None
    if not spec.builtin and job.heterogeneity.train_ahead:
        raise JobError(f"{source}: heterogeneity.train_ahead: training ahead is the built-in app's trainer's; "
                       f"app {spec.name!r} trains in its own ClientApp: remove it")
    if not spec.builtin and job.heterogeneity.policy == "auto" and not spec.imports_flotilla():
        raise JobError(
            f"{source}: heterogeneity.policy: 'auto' sizes each device's work inside the ServerApp's strategy, and "
            f"app {spec.name!r} does not use Flotilla's (flotilla.strategy); wrap your strategy with it "
            "(see the README) or use policy 'manual' or 'none'")


def job_schema() -> dict:
    return Job.model_json_schema()
