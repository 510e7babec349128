"""Isolation for simulated devices on one host: Linux cgroups (CPU quota, memory limit)."""

from flotilla.sandbox.cgroups import (
    UNLIMITED,
    CgroupError,
    DeviceCgroup,
    cgroups_available,
    cleanup_run,
    effective_limits_of_self,
    group_name,
    run_prefix,
)

__all__ = [
    "UNLIMITED",
    "CgroupError",
    "DeviceCgroup",
    "cgroups_available",
    "cleanup_run",
    "effective_limits_of_self",
    "group_name",
    "run_prefix",
]
