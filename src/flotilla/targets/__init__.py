"""Targets: where a Plan runs. One module each; this registry names them."""

from __future__ import annotations

import importlib

from flotilla.targets.base import Federation, Target, TargetError

# name -> "module:Class"; imported lazily so `local` never imports docker or kubernetes.
REGISTRY: dict[str, str] = {
    "local": "flotilla.targets.local:LocalTarget",
    "compose": "flotilla.targets.compose:ComposeTarget",
    "swarm": "flotilla.targets.swarm:SwarmTarget",
    "k8s": "flotilla.targets.k8s:K8sTarget",
}


def get_target(name: str, **options) -> Target:
    """A target by name, with its target-specific options (e.g. swarm's subnet, k8s's namespace)."""
    try:
        spec = REGISTRY[name]
    except KeyError:
        raise TargetError(f"target {name!r} is not available; choose one of {', '.join(REGISTRY)}") from None
    mod, cls_name = spec.split(":")
    cls = getattr(importlib.import_module(mod), cls_name)
    try:
        return cls(**options)
    except TypeError as err:
        bad = ", ".join(sorted(options)) or "(none)"
        raise TargetError(f"--target-opt: target {name!r} does not take the option(s) {bad} ({err})") from None


__all__ = ["REGISTRY", "Federation", "Target", "TargetError", "get_target"]
