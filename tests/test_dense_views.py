"""`flotilla status`, the live view and the report stay readable at 120 devices in 6 classes, some lost."""

from __future__ import annotations

import json
import os
import re
import struct
import subprocess
import sys
import time
from io import StringIO
from pathlib import Path
from types import SimpleNamespace

import pytest
from dense_run import CLASSES, DOWN, LOST, SLOWEST, make_dense_run
from rich.console import Console

from flotilla.classes import class_of, class_summary, worst_first
from flotilla.monitor.report import write_report
from flotilla.progress import EXITED_SHOWN, _devices_table
from flotilla.runs import RunRecord
from flotilla.status import run_status, show_status

FLOTILLA = [sys.executable, "-m", "flotilla.cli"]
SRC = Path(__file__).resolve().parents[1] / "src"
MAX_STATUS_LINES = 45


def render(fn, *args, width: int = 150, **kw) -> str:
    buf = StringIO()
    fn(Console(file=buf, width=width, color_system=None), *args, **kw)
    return buf.getvalue()


def device_lines(text: str) -> list[str]:
    """Names in a device table (rows starting with '<class>-<n> ', boxed or not)."""
    return re.findall(r"^(?:│ )?([a-z]+-\d+) ", text, flags=re.M)


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    return struct.unpack(">II", data[16:24])


# -- status ----------------------------------------------------------------------------------------
def test_status_shows_classes_then_lost_down_and_the_slowest(tmp_path):
    run = make_dense_run(tmp_path)
    s = run_status(RunRecord(run))
    text = render(show_status, s)
    lines = text.splitlines()
    assert len(lines) <= MAX_STATUS_LINES, text
    assert "120 devices in 6 classes: 115 up, 1 down, 4 lost" in text
    for cls, (n, _, _) in CLASSES.items():  # a row per class, with its device count
        assert re.search(rf"^{cls} +{n} ", text, flags=re.M), cls
    listed = device_lines(text)
    assert listed[:5] == sorted(LOST) + list(DOWN)  # lost, then down, then the slowest
    assert listed[5] == SLOWEST and len(listed) == 5 + 10
    assert all(class_of(n) == "watch" for n in listed[5:8])  # the slow class shows up
    assert "--devices all" in text
    narrow = render(show_status, s, width=80)  # a pipe, a small terminal: a compact class table, nothing cut
    assert "…" not in narrow and device_lines(narrow) == listed
    assert re.search(r"^watch +15 +13/-/2 ", narrow, flags=re.M), narrow


def test_status_devices_option_all_and_n(tmp_path):
    run = make_dense_run(tmp_path)
    s = run_status(RunRecord(run))
    every = render(show_status, s, devices="all")
    assert len(device_lines(every)) == 120 and "devices in 6 classes" not in every
    three = render(show_status, s, devices=3)
    assert len(device_lines(three)) == 5 + 3 and device_lines(three)[5] == SLOWEST
    res = subprocess.run(FLOTILLA + ["status", run.name, "--runs-dir", str(tmp_path), "--devices", "2"],
                         capture_output=True, text=True, env={**os.environ, "COLUMNS": "160"})
    assert res.returncode == 0, res.stderr
    assert len(device_lines(res.stdout)) == 5 + 2
    res = subprocess.run(FLOTILLA + ["status", run.name, "--runs-dir", str(tmp_path), "--devices", "some"],
                         capture_output=True, text=True)
    assert res.returncode == 2 and "--devices" in res.stderr and "Traceback" not in res.stderr


def test_status_json_keeps_every_device_and_adds_classes(tmp_path):
    run = make_dense_run(tmp_path)
    res = subprocess.run(FLOTILLA + ["status", run.name, "--runs-dir", str(tmp_path), "--json"],
                         capture_output=True, text=True, check=True)
    s = json.loads(res.stdout)
    assert len(s["devices"]) == 120 and set(s["devices"][0]) >= {
        "name", "class", "cpus", "memory", "effective_cpus", "effective_memory", "throughput_sps", "train_s", "lost"}
    classes = {c["class"]: c for c in s["classes"]}
    assert list(classes) == list(CLASSES)
    watch = classes["watch"]
    assert (watch["devices"], watch["lost"], watch["down"], watch["up"]) == (15, 2, 0, 13)
    assert watch["slowest_device"] == SLOWEST and watch["cpus_min"] == 0.01
    assert classes["tablet"]["down"] == 1
    assert watch["throughput_min_sps"] <= watch["throughput_median_sps"]
    assert watch["train_s_total"] == pytest.approx(sum(d["train_s"] for d in s["devices"] if d["class"] == "watch"))


def test_small_fleets_keep_a_row_per_device(tmp_path):
    run = make_dense_run(tmp_path)
    s = run_status(RunRecord(run))
    s["devices"] = s["devices"][:12]
    text = render(show_status, s)
    assert len(device_lines(text)) == 12 and "classes:" not in text


def test_worst_first_orders_lost_down_unmeasured_then_slowest():
    devs = [{"name": "a-1", "throughput_sps": 5}, {"name": "a-2", "throughput_sps": None},
            {"name": "a-3", "throughput_sps": 1, "down": True}, {"name": "a-4", "throughput_sps": 50, "lost": True},
            {"name": "a-5", "throughput_sps": 2}]
    assert [d["name"] for d in worst_first(devs, 2)] == ["a-4", "a-3", "a-2", "a-5"]
    rows = class_summary([d | {"class": "a", "cpus": 0.5, "memory": None, "train_s": 1.0} for d in devs])
    assert rows[0]["up"] == 3 and rows[0]["lost"] == 1 and rows[0]["down"] == 1 and rows[0]["memory_min"] is None


# -- the live view -------------------------------------------------------------------------------------
def test_live_view_aggregates_by_class_at_120_devices(tmp_path):
    devices = {}
    for cls, (n, _, per_cpu) in CLASSES.items():
        for i in range(1, n + 1):
            devices[f"{cls}-{i}"] = {"state": "running", "train_s": 1.0, "throughput_sps": per_cpu * (1 + i / 10)}
    for name in LOST:
        devices[name]["state"] = "exited"
    devices["pi-3"] = {"state": "starting"}
    devices[SLOWEST]["throughput_sps"] = 1.0
    text = render(lambda c: c.print(_devices_table(SimpleNamespace(devices=devices))), width=80)
    assert len(text.splitlines()) <= 1 + 6 + 1 + 1 + len(LOST) + 5, text
    assert "…" not in text
    assert re.search(r"^pi +25 +23 +1 +1 ", text, flags=re.M), text  # 23 running, 1 starting, 1 exited
    names = re.findall(r"^([a-z]+-\d+) +(running|exited|starting)", text, flags=re.M)
    assert [n for n, st in names if st == "exited"] == sorted(LOST)
    assert names[len(LOST)][0] == SLOWEST
    small = render(lambda c: c.print(_devices_table(SimpleNamespace(devices=dict(list(devices.items())[:8])))))
    assert len(re.findall(r"^phone-\d+ ", small, flags=re.M)) == 8  # a small fleet: a row per device


def test_live_view_caps_the_exited_rows():
    devices = {f"phone-{i}": {"state": "exited"} for i in range(1, 41)}
    text = render(lambda c: c.print(_devices_table(SimpleNamespace(devices=devices))))
    assert len(re.findall(r"^phone-\d+ ", text, flags=re.M)) == EXITED_SHOWN
    assert f"+{40 - EXITED_SHOWN} more exited" in text


# -- the report --------------------------------------------------------------------------------------------
def test_report_at_120_devices_draws_per_class_plots_and_sorts_devices(tmp_path):
    run = make_dense_run(tmp_path)
    page = write_report(run).read_text()
    imgs = re.findall(r'<img src="([^"]+)" alt="([^"]+)"', page)
    assert [src for src, _ in imgs] == ["accuracy_loss.png", "rounds_heatmap.png", "classes.png", "limits.png",
                                        "usage_by_class.png"]
    for src, _ in imgs:
        w, h = png_size(run / "report" / src)
        assert 600 <= w <= 1200 and 200 <= h <= 1300, (src, w, h)  # legible, not a mile-long strip
    assert not (run / "report" / "timeline.png").exists()  # no row per device at this size
    classes = re.search(r"<h2>Classes</h2>\s*<table>.*?</table>", page, flags=re.S)
    assert classes and classes.group(0).count("<tr>") == 1 + 6
    assert re.search(r"<tr><td>watch</td><td>15</td><td>2</td><td>0.01-", classes.group(0))
    devices = page.split("<h2>Devices</h2>")[1]
    order = re.findall(r"<tr><td>([a-z]+-\d+)</td>", devices)
    assert len(order) == 120
    assert set(order[:5]) == set(LOST) | set(DOWN) and order[5] == SLOWEST  # lost first, then the slowest
    assert "lost: killed by SIGKILL" in devices


def test_report_at_120_devices_is_fast(tmp_path):
    run = make_dense_run(tmp_path, rounds=20)
    code = ("import sys,time; c=time.process_time(); "
            "from flotilla.monitor.report import write_report; write_report(sys.argv[1]); "
            "print(time.process_time()-c)")
    out = subprocess.run([sys.executable, "-c", code, str(run)], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": str(SRC)}, timeout=120)
    cpu = float(out.stdout.split()[-1])
    print(f"write_report 20 rounds x 120 devices (cold import): cpu {cpu:.2f} s")
    assert cpu < 10.0


def test_report_of_a_dense_run_still_running_or_without_usage(tmp_path):
    run = make_dense_run(tmp_path, finished=False, usage=False, rounds=2)
    page = write_report(run).read_text()
    assert 'src="rounds_heatmap.png"' in page and "usage_by_class.png" not in page
    devices = page.split("<h2>Devices</h2>")[1]
    assert re.search(r"<td>tablet-5</td>.*?<td>down: exited with code 1</td>", devices)
    t = time.time()
    one = make_dense_run(tmp_path, rounds=0, run_id="no-rounds")
    page = write_report(one).read_text()
    assert "No training rounds were recorded" in page and time.time() - t < 30
