"""The Plan: a job expanded into concrete devices.

Every target consumes the same Plan, so "what runs" is decided once and can
be printed (`flotilla render`, `flotilla run --dry-run`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from flotilla.job import Job, Placement


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

    def node_config(self) -> dict[str, object]:
        """What the device's SuperNode gets as --node-config (read by the ClientApp)."""
        cfg: dict[str, object] = {
            "partition-id": self.partition_id,
            "num-partitions": self.num_partitions,
            "device": self.name,
            "device-class": self.device_class,
            "batch-size": self.train.batch_size,
            "lr": self.train.lr,
            "local-epochs": float(self.train.local_epochs),
            "momentum": self.train.momentum,
        }
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

    def run_config(self) -> dict[str, object]:
        """Run config handed to the Flower App (`flwr run --run-config`)."""
        job = self.job
        return {
            "num-server-rounds": job.rounds,
            "dataset": job.data.dataset,
            "data-path": str(job.data.path or ""),
            "partition": job.data.partition.kind,
            "alpha": job.data.partition.alpha,
            "shards-per-device": job.data.partition.shards_per_device,
            "partition-seed": job.data.partition.seed,
            "test-fraction": job.data.test_fraction,
            "fraction-train": job.strategy.fraction_train,
            "min-devices": job.strategy.min_devices,
            "batch-size": job.train.batch_size,
            "lr": job.train.lr,
            "local-epochs": float(job.train.local_epochs),
            "momentum": job.train.momentum,
            "policy": job.heterogeneity.policy,
            "deadline-factor": job.heterogeneity.deadline_factor,
            "proximal-mu": job.heterogeneity.proximal_mu,
            "train-ahead": int(job.heterogeneity.trains_ahead),
            "seed": job.seed,
        }

    def to_dict(self) -> dict:
        return {
            "job": self.job.model_dump(mode="json"),
            "devices": [asdict(d) | {"placement": d.placement.model_dump()} for d in self.devices],
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


def make_plan(job: Job) -> Plan:
    total = job.device_count
    devices: list[DevicePlan] = []
    for cls in job.devices:
        params = _train_for(job, cls)
        for i in range(1, cls.count + 1):
            devices.append(
                DevicePlan(
                    name=f"{cls.name}-{i}",
                    device_class=cls.name,
                    partition_id=len(devices),
                    num_partitions=total,
                    cpus=cls.cpus,
                    memory=cls.memory,
                    train=params,
                    placement=cls.placement,
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
