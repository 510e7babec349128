"""Targets: where a Plan runs. One module each; this registry names them."""

from __future__ import annotations

import importlib

from flotilla.targets.base import Federation, Target, TargetError

# name -> "module:Class"; imported lazily so `local` never imports docker or kubernetes.
REGISTRY: dict[str, str] = {
    "local": "flotilla.targets.local:LocalTarget",
    "compose": "flotilla.targets.compose.target:ComposeTarget",
    "swarm": "flotilla.targets.swarm.target:SwarmTarget",
    "k8s": "flotilla.targets.k8s.target:K8sTarget",
}


def target_class(name: str) -> type[Target]:
    try:
        spec = REGISTRY[name]
    except KeyError:
        raise TargetError(f"target {name!r} is not available; choose one of {', '.join(REGISTRY)}") from None
    mod, cls_name = spec.split(":")
    return getattr(importlib.import_module(mod), cls_name)


def check_job(job, name: str) -> None:
    """Refuse (exit 2, one line naming the field) what the job asks and the target cannot do."""
    caps = target_class(name).capabilities
    able = lambda cap: ", ".join(t for t in REGISTRY if cap in target_class(t).capabilities)  # noqa: E731
    if job.faults and "faults" not in caps:
        raise TargetError(f"faults: target {name!r} cannot inject faults (targets that can: {able('faults')}); "
                          "remove them or use one of those")
    if job.heterogeneity.throttle and "throttle" not in caps:
        raise TargetError(f"heterogeneity.throttle: target {name!r} cannot change a running device's limits "
                          f"(targets that can: {able('throttle')}); remove the schedule or use one of those")
    for i, d in enumerate(job.devices):
        if d.gpus and "gpus" not in caps:
            raise TargetError(f"devices[{i}].gpus: target {name!r} does not give devices GPUs (targets that do: "
                              f"{able('gpus')}); remove it or use one of those")
        p = d.placement
        if (p.hostname or p.labels or p.arch or p.tolerations) and "placement" not in caps:
            raise TargetError(f"devices[{i}].placement: target {name!r} runs every device on this host "
                              f"(targets that place devices: {able('placement')}); remove it or use one of those")


def get_target(name: str, **options) -> Target:
    """A target by name, with its target-specific options (e.g. swarm's subnet, k8s's namespace)."""
    cls = target_class(name)
    try:
        return cls(**options)
    except TypeError as err:
        bad = ", ".join(sorted(options)) or "(none)"
        raise TargetError(f"--target-opt: target {name!r} does not take the option(s) {bad} ({err})") from None


__all__ = ["REGISTRY", "Federation", "Target", "TargetError", "check_job", "get_target", "target_class"]
