"""The Plan: a job expanded into concrete devices and the app's run config.

Every target consumes the same Plan, so "what runs" is decided once and can
be printed (`flotilla render`, `flotilla run --dry-run`).

What reaches the app:
- run config (`flwr run --run-config`): for the built-in app, its typed
  BuiltinConfig from the job; for a user's app, only what the job sets
  (`rounds` as num-server-rounds, `train` and `strategy.fraction_train` under
  Flower's usual key names, and `app_config`), each where the app declares it
  and with the type it declares; its own defaults stand for the rest;
- node config (each device's `--node-config`, `context.node_config`):
  partition-id, num-partitions, device, device-class, cpus, memory-bytes,
  and the device's training values (batch-size, lr, local-epochs, momentum)
  where the job sets them (`manual` per-class overrides).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from functools import cached_property

from flotilla.appspec import ROUNDS_KEY, AppSpec
from flotilla.contracts import BuiltinConfig
from flotilla.job import Job, Placement
from flotilla.spread import class_limits

TRAIN_KEYS = {"batch_size": "batch-size", "lr": "lr", "local_epochs": "local-epochs", "momentum": "momentum"}


@dataclass(frozen=True)
class TrainParams:
    batch_size: int
    lr: float
    local_epochs: float
    momentum: float


@dataclass(frozen=True)
class DevicePlan:
    name: str  # unique in the run: "<class>-<i>", i from 1
    device_class: str
    partition_id: int
    num_partitions: int
    cpus: float | None
    memory: int | None  # bytes
    train: TrainParams
    placement: Placement = field(default_factory=Placement)
    train_keys: tuple[str, ...] = tuple(TRAIN_KEYS)  # training values that go into the node config

    def node_config(self) -> dict[str, object]:
        """What the device's SuperNode gets as --node-config (the ClientApp's context.node_config)."""
        cfg: dict[str, object] = {
            "partition-id": self.partition_id,
            "num-partitions": self.num_partitions,
            "device": self.name,
            "device-class": self.device_class,
        }
        for k in self.train_keys:
            v = getattr(self.train, k)
            cfg[TRAIN_KEYS[k]] = int(v) if k == "local_epochs" and float(v).is_integer() else v
        if self.cpus is not None:
            cfg["cpus"] = float(self.cpus)
        if self.memory is not None:
            cfg["memory-bytes"] = self.memory
        return cfg


@dataclass(frozen=True)
class Plan:
    job: Job
    devices: list[DevicePlan]

    def device(self, name: str) -> DevicePlan:
        for d in self.devices:
            if d.name == name:
                return d
        raise KeyError(name)

    @cached_property
    def app(self) -> AppSpec:
        return self.job.app_spec()

    def builtin_config(self) -> BuiltinConfig:
        job = self.job
        return BuiltinConfig(
            num_server_rounds=job.rounds, dataset=job.data.dataset, data_path=str(job.data.path or ""),
            partition=job.data.partition.kind, alpha=job.data.partition.alpha,
            shards_per_device=job.data.partition.shards_per_device, partition_seed=job.data.partition.seed,
            test_fraction=job.data.test_fraction, fraction_train=job.strategy.fraction_train,
            min_devices=job.strategy.min_devices, expected_devices=len(self.devices),
            batch_size=job.train.batch_size, lr=job.train.lr, local_epochs=float(job.train.local_epochs),
            momentum=job.train.momentum, policy=job.heterogeneity.policy,
            deadline_factor=job.heterogeneity.deadline_factor, proximal_mu=job.heterogeneity.proximal_mu,
            train_ahead=int(job.heterogeneity.trains_ahead), seed=job.seed,
        )

    def run_config(self) -> dict[str, object]:
        """Run config handed to the Flower App (`flwr run --run-config`)."""
        if self.job.builtin_app:
            return self.builtin_config().to_flower()
        return self._user_run_config()[0]

    def run_config_notes(self) -> list[str]:
        """What the job asked for that the app's declaration does not let Flotilla apply."""
        return [] if self.job.builtin_app else self._user_run_config()[1]

    def target_rounds(self) -> int | None:
        """Rounds the app will run, when its config says (an app may fix its own in code)."""
        cfg = self.run_config()
        rounds = cfg.get(ROUNDS_KEY, self.app.config.get(ROUNDS_KEY))
        return int(rounds) if isinstance(rounds, int) and not isinstance(rounds, bool) else None

    def _user_run_config(self) -> tuple[dict, list[str]]:
        job, spec = self.job, self.app
        cfg, notes = {}, []
        wanted: list[tuple[str, tuple[str, ...], object]] = []  # (job field, the app's possible keys, value)
        if "rounds" in job.model_fields_set:
            wanted.append(("rounds", (ROUNDS_KEY,), job.rounds))
        for f in sorted(job.train.model_fields_set):
            wanted.append((f"train.{f}", (TRAIN_KEYS[f],), getattr(job.train, f)))
        if "fraction_train" in job.strategy.model_fields_set:
            wanted.append(("strategy.fraction_train", ("fraction-train", "fraction-fit"), job.strategy.fraction_train))
        for field_name, keys, value in wanted:
            key = next((k for k in keys if spec.declares(k)), None)
            if key is None:
                what = ("it fixes its own rounds; the run reports the rounds it ran" if field_name == "rounds"
                        else "the devices get it in their node config")
                notes.append(f"{field_name}: not applied to the run config: app {spec.name!r} declares no "
                             f"{' or '.join(keys)} ({what})")
                continue
            cfg[key] = spec.typed(key, value, field_name)
        for key, value in job.app_config.items():
            cfg[key] = spec.typed(key, value, f"app_config.{key}")
        return cfg, notes

    def to_dict(self) -> dict:
        return {
            "job": self.job.model_dump(mode="json"),
            "devices": [asdict(d) | {"placement": d.placement.model_dump(), "node_config": d.node_config()}
                        for d in self.devices],
        }


def _train_for(job: Job, cls) -> TrainParams:
    base = job.train
    over = cls.train
    # `none` is the seeds' baseline: one set of parameters for everyone.
    use_over = job.heterogeneity.policy != "none"
    pick = lambda name: (getattr(over, name) if use_over and getattr(over, name) is not None else getattr(base, name))  # noqa: E731
    return TrainParams(
        batch_size=pick("batch_size"), lr=pick("lr"), local_epochs=pick("local_epochs"), momentum=pick("momentum")
    )


def _train_keys(job: Job, cls) -> tuple[str, ...]:
    """Every training value for the built-in app; for a user's app, those the job sets (job-wide or per class)."""
    if job.builtin_app:
        return tuple(TRAIN_KEYS)
    set_here = set(job.train.model_fields_set)
    if job.heterogeneity.policy != "none":
        set_here |= set(cls.train.model_dump(exclude_none=True))
    return tuple(k for k in TRAIN_KEYS if k in set_here)


def make_plan(job: Job) -> Plan:
    total = job.device_count
    devices: list[DevicePlan] = []
    for cls in job.devices:
        params = _train_for(job, cls)
        cpus, memory = class_limits(job, cls)  # the class's values, or each device's draw from its spread
        for i in range(1, cls.count + 1):
            devices.append(
                DevicePlan(
                    name=f"{cls.name}-{i}",
                    device_class=cls.name,
                    partition_id=len(devices),
                    num_partitions=total,
                    cpus=cpus[i - 1],
                    memory=memory[i - 1],
                    train=params,
                    placement=cls.placement,
                    train_keys=_train_keys(job, cls),
                )
            )
    return Plan(job=job, devices=devices)


def format_node_config(cfg: dict[str, object]) -> str:
    """A dict as flwr's --node-config / --run-config string: `k=v` pairs, strings quoted (TOML values)."""
    parts = []
    for k, v in cfg.items():
        if isinstance(v, bool):
            val = "true" if v else "false"
        elif isinstance(v, (int, float)):
            val = repr(v)
        else:
            val = '"' + str(v).replace("\\", "\\\\").replace('"', '\\"') + '"'
        parts.append(f"{k}={val}")
    return " ".join(parts)
