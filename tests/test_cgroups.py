"""Device cgroups: real groups on this machine (root, cgroup v1 or v2) and v2 file logic on a fake tree."""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from flotilla.sandbox import cgroups
from flotilla.sandbox.cgroups import (
    UNLIMITED,
    CgroupError,
    DeviceCgroup,
    Layout,
    cgroups_available,
    cleanup_run,
    detect_layout,
    effective_limits_of_self,
    group_name,
    run_prefix,
)

MiB = 1024**2
SRC = str(Path(cgroups.__file__).resolve().parents[2])
BUSY_LOOP = "while True: pass"

_ok, _reason = cgroups_available() if os.geteuid() == 0 else (False, "not root")
real = pytest.mark.skipif(not _ok, reason=f"cgroups not writable here: {_reason}")


# -- fixtures: everything is killed and removed even when a test fails --------


@pytest.fixture
def run_id():
    rid = f"test-{os.getpid()}-{secrets.token_hex(3)}"
    yield rid
    cleanup_run(run_prefix(rid))


@pytest.fixture
def procs():
    started: list[subprocess.Popen] = []

    def start(code: str, **kw) -> subprocess.Popen:
        p = subprocess.Popen([sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": SRC}, **kw)
        started.append(p)
        return p

    yield start
    for p in started:
        if p.poll() is None:
            p.kill()
        p.wait(timeout=10)


@pytest.fixture
def device(run_id):
    cg = DeviceCgroup.create(group_name(run_id, "small-1"), cpus=0.25, memory=200 * MiB)
    assert cg is not None
    yield cg
    cg.destroy()


def cpu_used_over(groups: list[DeviceCgroup], seconds: float) -> list[float]:
    """CPU seconds each group used over the same wall-clock interval."""
    start = [g.usage()["cpu_seconds"] for g in groups]
    time.sleep(seconds)
    return [g.usage()["cpu_seconds"] - s for g, s in zip(groups, start)]


def wait_for(cond, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.05)


# -- real groups ---------------------------------------------------------------


@real
def test_limits_are_in_the_kernel_files(device):
    assert device.version in (1, 2)
    if device.version == 1:
        assert (device.dirs["cpu"] / "cpu.cfs_quota_us").read_text().strip() == "25000"
        assert (device.dirs["cpu"] / "cpu.cfs_period_us").read_text().strip() == "100000"
        # low weight on every level Flotilla made: a full host serves the SuperLink/ServerApp first
        for d in (device.dirs["cpu"], device.dirs["cpu"].parent):
            assert (d / "cpu.shares").read_text().strip() == "128"
        mem = device.dirs["memory"]
        assert (mem / "memory.limit_in_bytes").read_text().strip() == str(200 * MiB)
        if (mem / "memory.memsw.limit_in_bytes").exists():
            assert (mem / "memory.memsw.limit_in_bytes").read_text().strip() == str(200 * MiB)
        # The memory group hangs below this process's own memory group, not at the root.
        own = cgroups.parse_proc_cgroup(Path("/proc/self/cgroup").read_text())["memory"]
        assert str(mem).endswith(f"{own.rstrip('/')}/{device.name}")
    else:
        assert (device.dirs["unified"] / "cpu.max").read_text().split() == ["25000", "100000"]
        assert (device.dirs["unified"] / "memory.max").read_text().strip() == str(200 * MiB)
    assert device.read_limits() == {"cpus": 0.25, "memory": 200 * MiB}


@real
def test_busy_loop_gets_a_quarter_cpu_then_more_after_a_live_change(device, run_id, procs):
    # The machine may be busy with other work, so an unlimited busy loop runs alongside as the
    # yardstick of what a process could get: the lower bounds are checked only when it got enough.
    reference = DeviceCgroup.create(group_name(run_id, "reference-1"))
    procs(BUSY_LOOP, preexec_fn=reference.enter)
    p = procs(BUSY_LOOP)
    device.add_pid(p.pid)
    assert device.pids() == [p.pid]
    time.sleep(0.3)

    used, free = cpu_used_over([device, reference], 2.0)
    assert used <= 0.65, f"busy loop used {used:.2f} s of CPU in 2 s under a 0.25 CPU quota"
    if free >= 0.7:
        assert used >= 0.35, f"busy loop got {used:.2f} s under a 0.25 CPU quota, unlimited got {free:.2f} s"

    device.set_limits(cpus=1.0)
    assert device.read_limits()["cpus"] == 1.0
    quota_file = device.dirs["cpu"] / "cpu.cfs_quota_us" if device.version == 1 else device.dirs["unified"] / "cpu.max"
    assert quota_file.read_text().split()[0] == "100000"
    used, free = cpu_used_over([device, reference], 2.0)
    assert used <= 2.15
    if free < 1.0:
        pytest.skip(f"machine too busy to measure the raised quota: an unlimited loop got {free:.2f} s in 2 s")
    assert used >= min(1.3, 0.8 * free), f"after the change: {used:.2f} s under 1.0 CPU, unlimited got {free:.2f} s"


@real
def test_a_quota_under_a_hundredth_of_a_cpu_stretches_the_period(run_id, procs):
    # local.fit_cpus may scale a limit below 0.01 CPU, the kernel's 1 ms quota per 100 ms period
    cg = DeviceCgroup.create(group_name(run_id, "scaled-1"), cpus=0.005)
    quota_file = cg.dirs["cpu"] / "cpu.cfs_quota_us" if cg.version == 1 else cg.dirs["unified"] / "cpu.max"
    period = (cg.dirs["cpu"] / "cpu.cfs_period_us").read_text().split() if cg.version == 1 else \
        quota_file.read_text().split()[1:]
    assert quota_file.read_text().split()[0] == "1000" and period == ["200000"]
    assert cg.read_limits()["cpus"] == 0.005
    procs(BUSY_LOOP, preexec_fn=cg.enter)
    time.sleep(0.5)
    used, = cpu_used_over([cg], 3.0)
    assert used <= 0.05, f"busy loop used {used:.3f} s of CPU in 3 s under a 0.005 CPU quota"
    cg.set_limits(cpus=0.5)  # back to the usual period
    assert cg.read_limits()["cpus"] == 0.5 and quota_file.read_text().split()[0] == "50000"
    with pytest.raises(ValueError, match="use a number >= 0.001"):
        cg.set_limits(cpus=0.0005)


@real
def test_a_limit_can_be_removed_live(device):
    device.set_limits(cpus=UNLIMITED)
    assert device.read_limits() == {"cpus": None, "memory": 200 * MiB}
    device.set_limits(memory=UNLIMITED)
    assert device.read_limits() == {"cpus": None, "memory": None}


@real
def test_children_forked_later_inherit_the_group(device, procs):
    # Parent waits for a line on stdin, then forks a child that sleeps.
    code = "import subprocess,sys; sys.stdin.readline(); c=subprocess.Popen(['sleep','30']); print(c.pid, flush=True); c.wait()"
    p = procs(code, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    device.add_pid(p.pid)
    p.stdin.write("go\n")
    p.stdin.flush()
    child = int(p.stdout.readline())
    assert sorted(device.pids()) == sorted([p.pid, child])


@real
def test_process_started_with_enter_reports_its_limits(device, procs):
    code = "import json; from flotilla.sandbox import effective_limits_of_self as e; print(json.dumps(e()))"
    p = procs(code, stdout=subprocess.PIPE, text=True, preexec_fn=device.enter)
    out, _ = p.communicate(timeout=30)
    assert json.loads(out) == {"cpus": 0.25, "memory": 200 * MiB}
    assert effective_limits_of_self()["cpus"] != 0.25  # the test process itself is not limited by it


@real
def test_allocating_beyond_the_limit_is_oom_killed_and_counted(device, procs):
    assert device.oom_kills() == 0
    p = procs("import time; b = b'x' * (400 << 20); time.sleep(30)", preexec_fn=device.enter)
    assert p.wait(timeout=60) == -9
    assert device.oom_kills() >= 1
    peak = device.usage()["memory_peak_bytes"]
    assert 150 * MiB <= peak <= 200 * MiB


@real
def test_destroy_kills_everything_and_removes_the_dirs(run_id, procs):
    cg = DeviceCgroup.create(group_name(run_id, "dev-1"), cpus=0.5)
    p = procs(BUSY_LOOP, preexec_fn=cg.enter)
    q = procs("import subprocess; subprocess.run(['sleep', '60'])", preexec_fn=cg.enter)
    wait_for(lambda: len(cg.pids()) == 3)  # p, q and q's sleep
    dirs = list(cg.dirs.values())
    cg.destroy()
    assert p.wait(timeout=5) == -9 and q.wait(timeout=5) == -9
    assert not any(d.exists() for d in dirs)
    assert not any(d.parent.exists() for d in dirs)  # flotilla/<run-id> had no other device
    assert not cg.exists
    cg.destroy()  # idempotent


@real
def test_another_process_can_throttle_and_destroy_from_saved_state(device, procs):
    state = json.dumps(device.to_state())
    code = textwrap.dedent(f"""
        import json
        from flotilla.sandbox import DeviceCgroup
        cg = DeviceCgroup.from_state(json.loads({state!r}))
        cg.set_limits(cpus=0.5, memory=300 * 1024**2)
        print(json.dumps(cg.read_limits()))
    """)
    p = procs(code, stdout=subprocess.PIPE, text=True)
    out, _ = p.communicate(timeout=30)
    assert json.loads(out) == {"cpus": 0.5, "memory": 300 * MiB}
    assert device.read_limits() == {"cpus": 0.5, "memory": 300 * MiB}


@real
def test_cleanup_run_removes_every_group_of_a_run(run_id, procs):
    a = DeviceCgroup.create(group_name(run_id, "a-1"), cpus=0.5, memory=128 * MiB)
    b = DeviceCgroup.create(group_name(run_id, "b-1"))
    p = procs(BUSY_LOOP, preexec_fn=b.enter)
    removed = cleanup_run(run_prefix(run_id))
    assert len(removed) == len(set(a.dirs.values()))  # one run dir per hierarchy
    assert p.wait(timeout=5) == -9
    assert not a.exists and not b.exists
    assert not any(d.exists() for d in removed)
    assert cleanup_run(run_prefix(run_id)) == []


@real
def test_cleanup_run_from_a_process_in_another_memory_group(run_id, procs):
    # `flotilla stop` may run in another group than `flotilla run` did (a new shell or
    # service): the run's memory groups are then not below its own, and are searched for.
    device = DeviceCgroup.create(group_name(run_id, "dev-1"), memory=128 * MiB)
    elsewhere = DeviceCgroup.create(group_name(run_id + "-ctl", "stopper"))
    try:
        victim = procs(BUSY_LOOP, preexec_fn=device.enter)
        code = f"from flotilla.sandbox import cleanup_run; print(len(cleanup_run({run_prefix(run_id)!r})))"
        stopper = procs(code, stdout=subprocess.PIPE, text=True, preexec_fn=elsewhere.enter)
        out, _ = stopper.communicate(timeout=30)
        assert int(out) == len(set(device.dirs.values()))
        assert victim.wait(timeout=5) == -9
        assert not device.exists
    finally:
        elsewhere.destroy()


@real
def test_lowering_memory_below_usage_is_a_clear_error_or_a_kill(device, procs):
    p = procs("import time; b = b'x' * (120 << 20); time.sleep(30)", preexec_fn=device.enter)
    wait_for(lambda: device.usage()["memory_bytes"] > 100 * MiB)
    try:
        device.set_limits(memory=64 * MiB)
    except CgroupError as err:  # v1: the kernel refuses a limit it cannot reclaim down to
        assert "memory.limit_in_bytes" in str(err) and "\n" not in str(err)
        assert device.read_limits()["memory"] == 200 * MiB
        memsw = device.dirs["memory"] / "memory.memsw.limit_in_bytes"
        if memsw.exists():  # the swap cap is restored too
            assert memsw.read_text().strip() == str(200 * MiB)
    else:  # v2 (and some v1 kernels): the group is OOM-killed down to the new limit
        assert p.wait(timeout=10) == -9


# -- bad input -----------------------------------------------------------------


def test_bad_names_and_limits_are_rejected_before_touching_anything(tmp_path):
    layout = Layout(2, {"unified": tmp_path}, {"unified": tmp_path})
    with pytest.raises(ValueError, match="cgroup name"):
        DeviceCgroup.create("flotilla/../etc", layout=layout)
    with pytest.raises(ValueError, match="cpus"):
        DeviceCgroup.create("flotilla/r/d", cpus=0.0005, layout=layout)
    with pytest.raises(ValueError, match="memory"):
        DeviceCgroup.create("flotilla/r/d", memory=-5, layout=layout)
    with pytest.raises(ValueError, match="at least two"):
        cleanup_run("flotilla", layout=layout)
    assert list(tmp_path.iterdir()) == []


def test_from_state_rejects_incomplete_state():
    with pytest.raises(CgroupError, match="expected keys"):
        DeviceCgroup.from_state({"version": 1})
    with pytest.raises(CgroupError, match="needs dirs"):
        DeviceCgroup.from_state({"name": "flotilla/r/d", "version": 1, "dirs": {"cpu": "/x"}})


# -- cgroup v2 on a fake tree (this machine runs v1) ----------------------------


@pytest.fixture
def v2(tmp_path):
    """A unified mount at tmp_path/cg; this process lives in user.slice/ctl.scope."""
    mount = tmp_path / "cg"
    base = mount / "user.slice" / "ctl.scope"
    base.mkdir(parents=True)
    (mount / "cgroup.controllers").write_text("cpuset cpu io memory pids\n")
    (mount / "user.slice" / "cgroup.controllers").write_text("cpu io memory pids\n")
    (base / "cgroup.controllers").write_text("cpu io memory pids\n")
    (base / "cgroup.subtree_control").write_text("\n")
    return Layout(2, {"unified": base}, {"unified": mount})


def test_v2_create_enables_controllers_down_the_path_and_writes_limits(v2):
    cg = DeviceCgroup.create("flotilla/run-1/small-1", cpus=0.5, memory=256 * MiB, layout=v2)
    base = v2.bases["unified"]
    leaf = base / "flotilla" / "run-1" / "small-1"
    assert cg.dirs == {"unified": leaf}
    for parent in (base, base / "flotilla", base / "flotilla" / "run-1"):
        assert set((parent / "cgroup.subtree_control").read_text().split()) == {"+cpu", "+memory"}
    assert not (leaf / "cgroup.subtree_control").exists()  # a leaf holds processes, not children
    assert (leaf / "cpu.max").read_text() == "50000 100000"
    assert (leaf / "memory.max").read_text() == str(256 * MiB)
    assert cg.read_limits() == {"cpus": 0.5, "memory": 256 * MiB}


def test_v2_set_limits_live_and_unlimited(v2):
    cg = DeviceCgroup.create("flotilla/run-1/d-1", layout=v2)
    leaf = cg.dirs["unified"]
    assert (leaf / "cpu.max").read_text() == "max 100000"
    assert (leaf / "memory.max").read_text() == "max"
    assert cg.read_limits() == {"cpus": None, "memory": None}

    (leaf / "memory.swap.max").write_text("max")  # swap accounting on: limited devices get no swap
    cg.set_limits(cpus=2)
    cg.set_limits(memory=512 * MiB)
    assert (leaf / "cpu.max").read_text() == "200000 100000"
    assert (leaf / "memory.swap.max").read_text() == "0"
    assert cg.read_limits() == {"cpus": 2.0, "memory": 512 * MiB}
    cg.set_limits(memory=UNLIMITED)
    assert (leaf / "memory.max").read_text() == "max"
    assert (leaf / "memory.swap.max").read_text() == "max"
    assert cg.read_limits() == {"cpus": 2.0, "memory": None}


def test_v2_add_pid_usage_and_oom_counters(v2):
    cg = DeviceCgroup.create("flotilla/run-1/d-1", layout=v2)
    leaf = cg.dirs["unified"]
    cg.add_pid(4242)
    assert (leaf / "cgroup.procs").read_text() == "4242"
    assert cg.pids() == [4242]
    (leaf / "cpu.stat").write_text("usage_usec 1500000\nuser_usec 1000000\nsystem_usec 500000\n")
    (leaf / "memory.current").write_text("104857600\n")
    (leaf / "memory.peak").write_text("209715200\n")
    (leaf / "memory.events").write_text("low 0\nhigh 0\nmax 7\noom 2\noom_kill 2\noom_group_kill 0\n")
    assert cg.usage() == {"cpu_seconds": 1.5, "memory_bytes": 100 * MiB, "memory_peak_bytes": 200 * MiB}
    assert cg.oom_kills() == 2
    (leaf / "memory.peak").unlink()  # kernels before 5.19
    assert cg.usage()["memory_peak_bytes"] == 100 * MiB


def test_v2_state_round_trip(v2):
    cg = DeviceCgroup.create("flotilla/run-1/d-1", cpus=1.5, layout=v2)
    again = DeviceCgroup.from_state(json.loads(json.dumps(cg.to_state())))
    assert again == cg
    again.set_limits(cpus=0.25)
    assert cg.read_limits()["cpus"] == 0.25


def test_v2_effective_limits_are_the_tightest_ancestor(v2):
    base = v2.bases["unified"]
    (base.parent / "cpu.max").write_text("50000 100000\n")
    (base.parent / "memory.max").write_text("max\n")
    (base / "cpu.max").write_text("150000 100000\n")
    (base / "memory.max").write_text(f"{1024 * MiB}\n")
    assert effective_limits_of_self(v2) == {"cpus": 0.5, "memory": 1024 * MiB}


def test_v2_refuses_when_own_group_holds_processes(v2):
    base = v2.bases["unified"]
    (base / "cgroup.procs").write_text("100\n101\n")
    ok, reason = cgroups_available(v2)
    assert not ok and "delegated" in reason
    (base / "cgroup.subtree_control").write_text("cpu memory\n")  # already delegated with controllers on
    assert cgroups_available(v2)[0]


def test_unavailable_when_the_base_is_missing(tmp_path):
    gone = tmp_path / "nope"
    ok, reason = cgroups_available(Layout(2, {"unified": gone}, {"unified": tmp_path}))
    assert not ok and str(gone) in reason


# -- layout detection from /proc texts ------------------------------------------


def _mountinfo(*lines: str) -> str:
    return "".join(f"{i} 1 0:{i} {line}\n" for i, line in enumerate(lines, start=30))


def test_detect_pure_v2(v2, tmp_path):
    mount = v2.mounts["unified"]
    info = _mountinfo(f"/ {mount} rw,nosuid - cgroup2 cgroup2 rw,nsdelegate", "/ / rw - ext4 /dev/sda1 rw")
    layout, why = detect_layout(info, "0::/user.slice/ctl.scope\n")
    assert why == "cgroup v2" and layout == v2


def test_detect_v2_without_memory_controller(v2):
    (v2.bases["unified"] / "cgroup.controllers").write_text("cpu pids\n")
    info = _mountinfo(f"/ {v2.mounts['unified']} rw - cgroup2 cgroup2 rw")
    layout, why = detect_layout(info, "0::/user.slice/ctl.scope\n")
    assert layout is None and "lacks the cpu/memory controllers" in why


def test_detect_v1_with_comounted_cpu_cpuacct(tmp_path):
    cpu = tmp_path / "cpu,cpuacct"
    mem = tmp_path / "memory"
    (cpu / "user").mkdir(parents=True)
    (mem / "jobs" / "j1").mkdir(parents=True)
    info = _mountinfo(
        f"/ {cpu} rw - cgroup cgroup rw,cpu,cpuacct",
        f"/ {mem} rw - cgroup cgroup rw,memory",
        f"/ {tmp_path / 'systemd'} rw - cgroup cgroup rw,xattr,name=systemd",
    )
    layout, _ = detect_layout(info, "12:cpu,cpuacct:/user\n5:memory:/jobs/j1\n1:name=systemd:/\n")
    assert layout.version == 1
    assert layout.bases == {"cpu": cpu / "user", "cpuacct": cpu / "user", "memory": mem / "jobs" / "j1"}


def test_detect_v1_inside_a_container_uses_the_mount_root(tmp_path):
    # Docker without a cgroup namespace: the container's group is mounted as the view's root.
    (tmp_path / "cpu").mkdir()
    (tmp_path / "memory").mkdir()
    info = _mountinfo(
        f"/docker/abc {tmp_path / 'cpu'} ro - cgroup cgroup ro,cpu",
        f"/docker/abc {tmp_path / 'memory'} ro - cgroup cgroup ro,memory",
    )
    layout, _ = detect_layout(info, "4:cpu:/docker/abc\n3:memory:/docker/abc\n")
    assert layout.bases == {"cpu": tmp_path / "cpu", "memory": tmp_path / "memory"}
    (tmp_path / "memory" / "memory.limit_in_bytes").write_text(f"{512 * MiB}\n")
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("150000\n")
    (tmp_path / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert effective_limits_of_self(layout) == {"cpus": 1.5, "memory": 512 * MiB}


def test_detect_reports_missing_controllers():
    layout, why = detect_layout(_mountinfo("/ /proc rw - proc proc rw"), "0::/\n")
    assert layout is None and "no cgroup hierarchy" in why


@real
def test_the_local_targets_down_removes_a_device_group_its_state_never_listed(run_id, procs, tmp_path):
    """Ctrl-C while `up` starts the fleet: a device's group made, the device not yet recorded in state.json."""
    from flotilla.runs import RunRecord
    from flotilla.targets.local import LocalTarget

    run = RunRecord(tmp_path / run_id)
    run.dir.mkdir()
    run.write_state(groups={}, cgroups={})
    ghost = DeviceCgroup.create(group_name(run_id, "dev-7"), cpus=0.5, memory=256 * MiB)
    p = procs(BUSY_LOOP, preexec_fn=ghost.enter)
    wait_for(lambda: p.pid in ghost.pids())
    LocalTarget().down(run)
    assert p.wait(timeout=10) != 0  # killed with its group
    assert not any(d.exists() for d in ghost.dirs.values())
