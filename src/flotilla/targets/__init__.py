"""Targets: where a Plan runs. One module each; this registry names them."""

from __future__ import annotations

import importlib

from flotilla.targets.base import Federation, Target, TargetError

# name -> "module:Class"; imported lazily so `local` never imports docker or kubernetes.
REGISTRY: dict[str, str] = {
    "local": "flotilla.targets.local:LocalTarget",
}


def get_target(name: str) -> Target:
    try:
        spec = REGISTRY[name]
    except KeyError:
        raise TargetError(f"target {name!r} is not available; choose one of {', '.join(REGISTRY)}") from None
    mod, cls = spec.split(":")
    return getattr(importlib.import_module(mod), cls)()


__all__ = ["REGISTRY", "Federation", "Target", "TargetError", "get_target"]
