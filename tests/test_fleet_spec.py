"""Large fleets in a job file: a class's cpus/memory as a spread drawn per device (seeded), counts up to 1024,
and the refusals that come before anything starts (a spread on a per-class target, a fleet this machine
cannot hold)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import yaml
from rich.text import Text

from flotilla import capacity
from flotilla.job import JobError, load_job, parse_job
from flotilla.plan import make_plan
from flotilla.spread import Spread

FLOTILLA = [sys.executable, "-m", "flotilla.cli"]
MiB, GiB = 2**20, 2**30


def job(*classes, **top) -> dict:
    return {"name": "dense", **top, "devices": list(classes)}


def plan_of(doc: dict):
    return make_plan(parse_job(doc))


def limits(doc: dict, cls: str) -> tuple[list, list]:
    devs = [d for d in plan_of(doc).devices if d.device_class == cls]
    return [d.cpus for d in devs], [d.memory for d in devs]


def write(tmp_path: Path, doc: dict) -> Path:
    p = tmp_path / "job.yaml"
    p.write_text(yaml.safe_dump(doc, sort_keys=False))
    return p


# -- every existing form stays what it was ------------------------------------------------------------
def test_plain_limits_are_unchanged():
    cpus, mem = limits(job({"name": "pi", "count": 3, "cpus": 0.5, "memory": "768m"}), "pi")
    assert cpus == [0.5] * 3 and mem == [768 * MiB] * 3
    cpus, mem = limits(job({"name": "pi", "count": 2, "cpus": 2, "memory": 2**30}), "pi")
    assert cpus == [2.0, 2.0] and all(isinstance(c, float) for c in cpus) and mem == [GiB, GiB]
    cpus, mem = limits(job({"name": "pi", "count": 2}), "pi")
    assert cpus == [None, None] and mem == [None, None]
    doc = job({"name": "pi", "count": 2, "cpus": 0.5, "memory": "1g"})
    assert parse_job(doc).model_dump(mode="json", exclude_unset=True)["devices"][0] == {
        "name": "pi", "count": 2, "cpus": 0.5, "memory": GiB}


# -- each distribution: its bounds, its shape ------------------------------------------------------------
def test_uniform_stays_in_bounds_and_covers_them():
    cpus, mem = limits(job({"name": "phone", "count": 400, "cpus": {"uniform": [0.1, 1.0]},
                            "memory": {"uniform": ["512m", "2g"]}}), "phone")
    assert all(0.1 <= c <= 1.0 for c in cpus) and all(512 * MiB <= m <= 2 * GiB for m in mem)
    assert min(cpus) < 0.15 and max(cpus) > 0.95  # spread over the range, not bunched
    assert abs(sum(cpus) / len(cpus) - 0.55) < 0.05
    assert all(round(c, 3) == c for c in cpus)  # a quota the kernel can hold: 0.001 CPU steps
    assert all(m % MiB == 0 for m in mem) and len(set(mem)) > 100  # whole MiB, each device its own


def test_choice_takes_only_the_values_with_their_weights():
    cpus, mem = limits(job({"name": "pi", "count": 1000, "cpus": {"choice": [0.25, 0.5, 1.0], "weights": [2, 1, 1]},
                            "memory": {"choice": ["512m", "1g"]}}), "pi")
    n = Counter(cpus)
    assert set(n) == {0.25, 0.5, 1.0}
    assert 0.44 < n[0.25] / 1000 < 0.56 and 0.19 < n[1.0] / 1000 < 0.31
    assert set(mem) == {512 * MiB, GiB} and 400 < Counter(mem)[GiB] < 600
    only, _ = limits(job({"name": "pi", "count": 50, "cpus": {"choice": [0.25, 0.5], "weights": [0, 1]}}), "pi")
    assert set(only) == {0.5}  # a zero weight is never drawn


def test_lognormal_is_truncated_to_min_max_around_its_median():
    cpus, mem = limits(job({"name": "phone", "count": 1000,
                            "cpus": {"lognormal": {"median": 0.5, "sigma": 0.6, "min": 0.1, "max": 2.0}},
                            "memory": {"lognormal": {"median": "768m", "sigma": 0.4, "min": "256m", "max": "4g"}}}),
                       "phone")
    assert all(0.1 <= c <= 2.0 for c in cpus) and all(256 * MiB <= m <= 4 * GiB for m in mem)
    s = sorted(cpus)
    assert 0.46 < s[len(s) // 2] < 0.54  # the median is the median
    logs = [math.log(c) for c in cpus if 0.2 < c < 1.25]  # the untruncated middle: sigma shows
    assert 0.35 < (sum((x - math.log(0.5)) ** 2 for x in logs) / len(logs)) ** 0.5 < 0.6
    assert 720 * MiB < sorted(mem)[len(mem) // 2] < 816 * MiB
    assert sum(1 for c in cpus if c >= 1.999) < 20  # truncated, not clipped: no pile at the bound
    flat, _ = limits(job({"name": "pi", "count": 5, "cpus": {"lognormal": {"median": 0.3, "sigma": 0}}}), "pi")
    assert flat == [0.3] * 5
    far, _ = limits(job({"name": "pi", "count": 5,  # [min, max] far in a tail: values stay inside it
                         "cpus": {"lognormal": {"median": 0.01, "sigma": 0.1, "min": 3, "max": 4}}}), "pi")
    assert all(3 <= c <= 4 for c in far)


# -- reproducible ------------------------------------------------------------------------------------------
SPREAD = {"name": "phone", "count": 50, "cpus": {"lognormal": {"median": 0.5, "sigma": 0.6, "min": 0.1, "max": 2}},
          "memory": {"uniform": ["512m", "1g"]}}


def test_the_same_job_draws_the_same_fleet_and_the_seed_changes_it():
    a = limits(job(SPREAD), "phone")
    assert a == limits(job(SPREAD), "phone") == limits(job(SPREAD, fleet_seed=0), "phone")
    b = limits(job(SPREAD, fleet_seed=1), "phone")
    assert a[0] != b[0] and a[1] != b[1]
    assert limits(job(SPREAD | {"seed": 5}), "phone") == limits(job(SPREAD | {"seed": 5}, fleet_seed=9), "phone")
    assert limits(job(SPREAD | {"seed": 5}), "phone") != a


def test_draws_are_fixed_values_per_device():
    """Pinned: a change in how spreads draw would silently change every recorded fleet."""
    cpus, mem = limits(job(SPREAD), "phone")
    assert cpus[:4] == [0.282, 0.281, 0.338, 0.527]
    assert [m // MiB for m in mem[:4]] == [714, 866, 580, 616]


def test_draws_do_not_depend_on_other_classes_or_on_count():
    alone = limits(job(SPREAD), "phone")
    other = {"name": "pi", "count": 7, "cpus": {"uniform": [0.1, 0.2]}}
    assert limits(job(other, SPREAD), "phone") == alone
    more = limits(job(SPREAD | {"count": 80}), "phone")
    assert more[0][:50] == alone[0] and more[1][:50] == alone[1]  # a bigger class keeps its first devices


def test_the_record_round_trips_the_spread(tmp_path):
    """job.yaml keeps the spread as written (resume re-plans it), plan.json each device's draw."""
    from flotilla.submit import create_run

    doc = job(SPREAD, {"name": "pi", "count": 2, "cpus": {"choice": [0.25, 0.5], "weights": [1, 3]},
                       "memory": {"lognormal": {"median": "768m", "sigma": 0.3, "min": "512m"}}}, fleet_seed=3)
    first = parse_job(doc)
    rec = create_run(first, "local", tmp_path / "runs")
    written = yaml.safe_load((rec.dir / "job.yaml").read_text())
    assert written["devices"][0]["cpus"] == SPREAD["cpus"]
    assert written["devices"][0]["memory"] == {"uniform": ["512m", "1g"]}
    assert written["devices"][1]["cpus"] == {"choice": [0.25, 0.5], "weights": [1.0, 3.0]}
    again = parse_job(written)
    assert isinstance(again.devices[0].cpus, Spread)
    assert type(first).model_validate(first.model_dump()).devices == first.devices  # python-mode dump, too
    assert type(first.devices[0])(name="x", cpus=first.devices[0].cpus).cpus == first.devices[0].cpus
    plan = json.loads((rec.dir / "plan.json").read_text())
    assert [(d["cpus"], d["memory"]) for d in plan["devices"]] == [
        (d.cpus, d.memory) for d in make_plan(again).devices]
    assert plan["devices"][0]["node_config"]["cpus"] == plan["devices"][0]["cpus"]
    assert plan["job"]["devices"][0]["cpus"] == SPREAD["cpus"]


# -- bad spreads: one line naming the field ---------------------------------------------------------------
@pytest.mark.parametrize("cls, field, words", [
    ({"cpus": {"uniform": [1.0, 0.1]}}, "devices[1].cpus",
     "uniform needs two bounds, low and high with 0 < low <= high (e.g. {uniform: [0.1, 1.0]}), got [1.0, 0.1]"),
    ({"cpus": {"uniform": [0.5]}}, "devices[1].cpus", "uniform needs two bounds"),
    ({"cpus": {"uniform": [0, 1]}}, "devices[1].cpus", "0 < low <= high"),
    ({"cpus": {"uniform": [0.001, 1]}}, "devices[1].cpus", "smallest CPU quota"),
    ({"cpus": {"uniform": ["a", 1]}}, "devices[1].cpus", "not a number of CPUs"),
    ({"cpus": {"choice": []}}, "devices[1].cpus", "choice needs a non-empty list"),
    ({"cpus": {"choice": [0.5, 1], "weights": [1]}}, "devices[1].cpus", "one weight >= 0 per value (2 values)"),
    ({"cpus": {"choice": [0.5, 1], "weights": [0, 0]}}, "devices[1].cpus", "not all zero"),
    ({"cpus": {"choice": [0.5, 1], "weights": [1, -1]}}, "devices[1].cpus", "weight >= 0"),
    ({"cpus": {"uniform": [0.1, 1], "weights": [1, 1]}}, "devices[1].cpus", "weights go with choice"),
    ({"cpus": {"lognormal": {"median": 0.5}}}, "devices[1].cpus", "lognormal needs {median: m, sigma: s}"),
    ({"cpus": {"lognormal": {"median": -1, "sigma": 0.5}}}, "devices[1].cpus", "median > 0"),
    ({"cpus": {"lognormal": {"median": 0.5, "sigma": -1}}}, "devices[1].cpus", "0 <= sigma"),
    ({"cpus": {"lognormal": {"median": 0.5, "sigma": 0.5, "min": 2, "max": 1}}}, "devices[1].cpus",
     "0 < min <= max"),
    ({"cpus": {"lognormal": {"median": 0.5, "sigma": 0.5, "mean": 1}}}, "devices[1].cpus", "lognormal needs"),
    ({"cpus": {"normal": [0.1, 1]}}, "devices[1].cpus", "unknown key 'normal'"),
    ({"cpus": {"uniform": [0.1, 1], "choice": [1]}}, "devices[1].cpus", "give one distribution"),
    ({"cpus": {}}, "devices[1].cpus", "no distribution given"),
    ({"cpus": "lots"}, "devices[1].cpus", "not a number of CPUs"),
    ({"cpus": -1}, "devices[1].cpus", "must be > 0"),
    ({"memory": {"uniform": ["32m", "1g"]}}, "devices[1].memory", "at least 64m"),
    ({"memory": {"uniform": ["2g", "1g"]}}, "devices[1].memory", "0 < low <= high"),
    ({"memory": {"choice": ["512m", "lots"]}}, "devices[1].memory", "not a memory size"),
    ({"memory": {"lognormal": {"median": "1g", "sigma": 0.3, "min": "10m"}}}, "devices[1].memory", "at least 64m"),
    ({"memory": "32m"}, "devices[1].memory", "at least 64m"),
    ({"count": 1025}, "devices[1].count", "1024"),
])
def test_bad_spreads_are_one_line_naming_the_field(tmp_path, cls, field, words):
    doc = job({"name": "server", "count": 1, "cpus": 1}, {"name": "pi", "count": 2, **cls})
    with pytest.raises(JobError) as e:
        load_job(write(tmp_path, doc))
    msg = str(e.value)
    assert "\n" not in msg and f"{field}: " in msg and words in msg, msg
    assert Text.from_markup(msg).plain == msg  # the CLI prints it as rich markup: nothing may vanish


def test_cli_exit_2_and_one_line_for_a_bad_spread(tmp_path):
    p = write(tmp_path, job({"name": "pi", "count": 2, "cpus": {"uniform": [1.0, 0.1]}}))
    res = subprocess.run(FLOTILLA + ["validate", str(p)], capture_output=True, text=True)
    assert res.returncode == 2 and "Traceback" not in res.stderr
    lines = [x for x in res.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].endswith(
        "devices[0].cpus: uniform needs two bounds, low and high with 0 < low <= high (e.g. {uniform: [0.1, 1.0]}), "
        "got [1.0, 0.1]"), lines


def test_validate_shows_each_devices_draw_and_counts_reach_1024(tmp_path):
    doc = job({"name": "phone", "count": 1000, "cpus": {"uniform": [0.1, 1.0]}},
              {"name": "pi", "count": 4, "cpus": 0.5, "memory": {"choice": ["512m", "768m"]}}, fleet_seed=2)
    p = write(tmp_path, doc)
    res = subprocess.run(FLOTILLA + ["validate", str(p)], capture_output=True, text=True,
                         env=_env(capacity.SKIP_ENV, "1"))
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert len(lines) == 1004 and lines[0].startswith("phone-1: cpus=") and lines[-1].startswith("pi-4: cpus=0.5")
    want = make_plan(load_job(p)).devices
    assert all(line.startswith(f"{d.name}: cpus={d.cpus} memory={d.memory} ") for line, d in zip(lines, want))


def test_schema_describes_the_spread_syntax():
    res = subprocess.run(FLOTILLA + ["schema"], capture_output=True, text=True, check=True)
    props = json.loads(res.stdout)["$defs"]["DeviceClass"]["properties"]
    text = json.dumps(props["cpus"])
    assert all(k in text for k in ("uniform", "choice", "weights", "lognormal", "median", "sigma"))
    assert "fleet_seed" in res.stdout and "seed" in props


# -- targets that give a class one set of limits ----------------------------------------------------------------
@pytest.mark.parametrize("target", ["k8s", "swarm"])
def test_per_class_targets_refuse_a_spread(target):
    doc = job({"name": "pi", "count": 2, "cpus": 0.5},
              {"name": "phone", "count": 3, "memory": {"uniform": ["512m", "1g"]}})
    with pytest.raises(JobError, match=rf"^devices\[1\]\.memory: target '{target}' gives every device of a class"):
        capacity.check_fleet(parse_job(doc), target)
    capacity.check_spreads(parse_job(job({"name": "pi", "count": 2, "cpus": 0.5})), target)  # numbers are fine


# -- the fleet's memory must fit this machine ------------------------------------------------------------------------
def _machine(monkeypatch, free: int, source: str = "MemAvailable in /proc/meminfo") -> None:
    monkeypatch.setattr(capacity, "machine_memory", lambda: (free, source))


def test_fleet_memory_sums_limits_counts_unlimited_devices_and_headroom():
    doc = job({"name": "phone", "count": 100, "memory": {"uniform": ["512m", "1g"]}}, {"name": "pi", "count": 20})
    need = capacity.fleet_memory(parse_job(doc | {"local": {"shared": False}}))
    drawn = sum(d.memory for d in plan_of(doc).devices if d.memory)
    assert need["devices"] == drawn + 20 * capacity.UNLIMITED_DEVICE
    assert need["total"] == need["devices"] + capacity.SERVER_HEADROOM and need["unlimited"] == 20
    # shared (the default): each limit less what the zygote holds for every device (the built-in app's, here)
    shared = capacity.fleet_memory(parse_job(doc))
    assert shared["devices"] == drawn - 100 * capacity.SHARED_AT_REST_BUILTIN + 20 * capacity.UNLIMITED_SHARED_DEVICE
    assert shared["headroom"] == capacity.SERVER_HEADROOM + capacity.SHARED_RUNTIME


def test_a_fleet_that_fits_passes(monkeypatch):
    _machine(monkeypatch, 16 * GiB)
    capacity.check_fleet(parse_job(job({"name": "pi", "count": 10, "memory": "1g"})), "local")  # 11 GiB


def test_a_fleet_too_big_for_this_machine_is_refused_in_one_line(monkeypatch):
    _machine(monkeypatch, 8 * GiB)
    doc = job({"name": "server", "count": 2, "memory": "1g"}, {"name": "phone", "count": 120, "memory": "768m"},
              local={"shared": False})
    with pytest.raises(JobError) as e:
        capacity.check_fleet(parse_job(doc), "local")
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("devices: 122 devices need 93.0 GiB")
    assert Text.from_markup(msg).plain == msg  # printed as rich markup by the CLI
    assert "8.0 GiB available (MemAvailable in /proc/meminfo)" in msg
    assert "devices[1] 'phone'" in msg and "fewer devices" in msg and "local: {shared: true}" in msg
    _machine(monkeypatch, 4 * GiB)
    with pytest.raises(JobError, match="smaller memory limits") as e:  # already shared: it says what that means
        capacity.check_fleet(parse_job(doc | {"local": {"shared": True}}), "local")
    assert "local: {shared: true}" not in str(e.value) and "shared runtime" in str(e.value)
    assert "a shared device holds on this machine its limit less what its processes share" in str(e.value)


def test_devices_without_limits_count_too(monkeypatch):
    _machine(monkeypatch, 20 * GiB)
    with pytest.raises(JobError, match="50 devices without a limit at 512 MiB each"):
        capacity.check_fleet(parse_job(job({"name": "pi", "count": 50}, local={"shared": False})), "local")
    capacity.check_fleet(parse_job(job({"name": "pi", "count": 50}, local={"shared": True})), "local")


def test_only_the_local_target_is_checked_and_it_can_be_skipped(monkeypatch):
    _machine(monkeypatch, 1 * GiB)
    doc = parse_job(job({"name": "pi", "count": 100, "memory": "1g"}))
    for target in ("compose", "swarm", "k8s"):
        capacity.check_fleet(doc, target)
    monkeypatch.setenv(capacity.SKIP_ENV, "1")
    capacity.check_fleet(doc, "local")


def test_run_refuses_before_starting_anything(tmp_path):
    """The real CLI, the real machine: a fleet far larger than any test machine's memory."""
    p = write(tmp_path, job({"name": "pi", "count": 1024, "memory": "64g"}))
    for cmd in ("run", "submit", "validate"):
        res = subprocess.run(FLOTILLA + [cmd, str(p)], capture_output=True, text=True, cwd=tmp_path,
                             env=_env(capacity.SKIP_ENV, ""))
        assert res.returncode == 2, (cmd, res.stderr)
        lines = [x for x in res.stderr.splitlines() if x.strip()]
        assert len(lines) == 1 and "Traceback" not in res.stderr, lines
        assert "devices: 1024 devices need" in lines[0] and "available" in lines[0], lines
    assert not (tmp_path / "runs").exists()  # nothing started, nothing written


def test_machine_memory_reads_meminfo_and_the_cgroup(tmp_path, monkeypatch):
    info = tmp_path / "meminfo"
    info.write_text("MemTotal:       24683584 kB\nMemFree: 1 kB\nMemAvailable:   2097152 kB\n")
    assert capacity._meminfo_available(info) == 2 * GiB
    assert capacity._meminfo_available(tmp_path / "missing") is None
    group = tmp_path / "cg"
    group.mkdir()
    (group / "memory.max").write_text(f"{4 * GiB}\n")
    (group / "memory.current").write_text(f"{3 * GiB}\n")
    (group / "memory.stat").write_text(f"anon 1\ninactive_file {GiB // 2}\n")
    assert capacity._group_left(group, 2) == GiB + GiB // 2  # the limit less what cannot be reclaimed
    (group / "memory.max").write_text("max\n")
    assert capacity._group_left(group, 2) is None
    monkeypatch.setattr(capacity, "_meminfo_available", lambda: 8 * GiB)
    monkeypatch.setattr(capacity, "_cgroup_headroom", lambda: (2 * GiB, "the memory limit of cgroup /x"))
    assert capacity.machine_memory() == (2 * GiB, "the memory limit of cgroup /x")  # the lower one
    monkeypatch.setattr(capacity, "_cgroup_headroom", lambda: None)
    assert capacity.machine_memory() == (8 * GiB, "MemAvailable in /proc/meminfo")
    monkeypatch.undo()
    free, source = capacity.machine_memory()  # this machine, for real
    assert 0 < free and source


def _env(key: str, value: str) -> dict:
    import os

    env = dict(os.environ)
    env[key] = value
    return env


# -- a fleet declaring more CPUs than this machine has runs, with a note ----------------------------------------------
def test_a_fleet_declaring_more_cpus_than_the_machine_gets_a_note(monkeypatch):
    monkeypatch.setattr("flotilla.sandbox.cgroups.cgroups_available", lambda: (True, ""))
    doc = job({"name": "pi", "count": 20, "cpus": 0.25}, {"name": "phone", "count": 20, "cpus": 0.05})
    note = capacity.cpu_note(parse_job(doc), "local", cores=2)
    assert note == ("devices: the fleet's CPU limits add up to 6 CPUs on this machine's 2: when every device is "
                    "busy each gets ~0.05 CPU, not its limit (0.05-0.25), so devices differ in speed less than "
                    "declared; limits that add up to at most 2 CPUs hold (local: {fit_cpus: true} scales them "
                    "to fit)")
    assert capacity.cpu_note(parse_job(doc), "local", cores=8) is None
    assert capacity.cpu_note(parse_job(doc), "compose", cores=2) is None  # its engine may be another host
    assert capacity.cpu_note(parse_job(job({"name": "pc", "count": 50})), "local", cores=2) is None  # no limits


def test_fit_cpus_scales_every_limit_by_one_factor_to_fit_the_cores(monkeypatch):
    monkeypatch.setattr("flotilla.sandbox.cgroups.cgroups_available", lambda: (True, ""))
    doc = job({"name": "pi", "count": 20, "cpus": 0.25}, {"name": "phone", "count": 20, "cpus": 0.05},
              local={"fit_cpus": True})
    fit = parse_job(doc)
    assert capacity.cpu_scale(fit, cores=2) == pytest.approx(1.5 / 6)  # 2 cores less 0.5 for the server
    assert capacity.cpu_scale(fit, cores=8) == 1.0  # fits as declared
    assert capacity.cpu_scale(parse_job(job(*doc["devices"])), cores=2) == 1.0  # off by default
    assert capacity.cpu_note(fit, "local", cores=2) == (
        "devices: CPU limits scaled by 0.25 to fit this machine's 2 cores (local.fit_cpus; they add up to 6 "
        "CPUs): relative speeds hold, a device's work takes 4.0x as long as on the fleet declared")
    capacity.check_cpus_fit(fit, cores=2)  # 0.05 x 0.25 is above the kernel's smallest quota
    # limits within the cores but leaving the server less than 0.5 CPU are scaled too, and said so
    near = parse_job(job({"name": "pi", "count": 4, "cpus": 0.45}, local={"fit_cpus": True}))
    assert capacity.cpu_note(near, "local", cores=2).startswith("devices: CPU limits scaled by 0.833")


def test_fit_cpus_refuses_an_unlimited_class_and_a_limit_scaled_below_the_kernels_quota():
    doc = job({"name": "pi", "count": 4, "cpus": 0.5}, {"name": "pc", "count": 2}, local={"fit_cpus": True})
    with pytest.raises(JobError, match=r"^devices\[1\]\.cpus: local.fit_cpus scales every device's CPU limit and "
                                       r"class 'pc' has none"):
        capacity.check_cpus_fit(parse_job(doc), cores=2)
    doc = job({"name": "big", "count": 1000, "cpus": 2.0}, {"name": "tiny", "count": 10, "cpus": 0.01},
              local={"fit_cpus": True})
    with pytest.raises(JobError) as e:
        capacity.check_cpus_fit(parse_job(doc), cores=2)
    assert str(e.value).startswith("local.fit_cpus: the fleet's CPU limits add up to 2000.1 CPUs; scaled by "
                                   "0.00075 to fit this machine, the smallest (0.01) would be under the kernel's "
                                   "smallest quota (0.001 CPU)")


def test_cli_refuses_fit_cpus_with_an_unlimited_class_in_one_line(tmp_path):
    p = write(tmp_path, job({"name": "pi", "count": 2, "cpus": 0.5}, {"name": "pc", "count": 1},
                            local={"fit_cpus": True}))
    res = subprocess.run(FLOTILLA + ["validate", str(p)], capture_output=True, text=True)
    assert res.returncode == 2 and "Traceback" not in res.stderr
    lines = [x for x in res.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and "devices[1].cpus: local.fit_cpus scales every device's CPU limit" in lines[0], lines
