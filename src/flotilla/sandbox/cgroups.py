"""Per-device Linux cgroups: a CPU quota and a memory limit for one simulated device.

A device's SuperNode is put in its own group; everything it forks (superexec,
each ClientApp) inherits the group, so the whole device is capped, throttled
live, measured and killed as one.

Both cgroup layouts are supported:
  v1  one hierarchy per controller (/sys/fs/cgroup/{cpu,cpuacct,memory}); the
      limits are cpu.cfs_quota_us/cpu.cfs_period_us and memory.limit_in_bytes.
  v2  one unified tree (/sys/fs/cgroup with cgroup.controllers); the limits are
      cpu.max and memory.max, and each parent must list +cpu +memory in its
      cgroup.subtree_control for its children to get those files.

Groups are created below THIS process's own group in each hierarchy (read from
/proc/self/cgroup), never at the root: a sandboxed or delegated process may
only manage its own subtree, and limits of its ancestors still apply.

This is the entry module; import from here. The code lives in:
  cgroup_layout.py  what this machine allows: the layout, whether groups can be
                    made, the limits this process already runs under
  device_cgroup.py  one device's group (create, limit, measure, destroy) and
                    removing every group of a run
  cgroupfs.py       the control-file helpers, names and errors both share
"""

from flotilla.sandbox.cgroup_layout import (
    Layout,
    Mount,
    cgroups_available,
    detect_layout,
    effective_limits_of_self,
    parse_mountinfo,
    parse_proc_cgroup,
)
from flotilla.sandbox.cgroupfs import (
    GROUP_ROOT,
    MIN_CPUS,
    PERIOD_US,
    UNLIMITED,
    CgroupError,
    group_name,
    run_prefix,
)
from flotilla.sandbox.device_cgroup import DeviceCgroup, cleanup_run

__all__ = [
    "GROUP_ROOT",
    "MIN_CPUS",
    "PERIOD_US",
    "UNLIMITED",
    "CgroupError",
    "DeviceCgroup",
    "Layout",
    "Mount",
    "cgroups_available",
    "cleanup_run",
    "detect_layout",
    "effective_limits_of_self",
    "group_name",
    "parse_mountinfo",
    "parse_proc_cgroup",
    "run_prefix",
]
