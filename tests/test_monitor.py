"""Monitoring layer: exporter, Prometheus/Grafana provisioning, HTML report.

These consume run-record files only, so a run record written here in the
documented format (HELPERS.md) is the real input, not a mock.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from flotilla.monitor import (
    DATASOURCE_UID,
    FlotillaExporter,
    follow_run,
    grafana_dashboard,
    prometheus_config,
    write_monitoring,
    write_report,
)

SRC = Path(__file__).resolve().parents[1] / "src"
CHROMIUM = Path("/usr/bin/chromium")
# name -> (class, samples per second, samples per round); pi-2 is the straggler.
DEVICES = {"laptop-1": ("laptop", 1500.0, 2000), "pi-1": ("pi", 400.0, 1000), "pi-2": ("pi", 250.0, 1000)}
CADVISOR_METRICS = {"container_cpu_usage_seconds_total", "container_memory_usage_bytes"}


def make_run(root: Path, *, rounds: int = 5, devices: dict = DEVICES, status: str = "completed",
             usage: bool = True, run_id: str = "mnist-20250101-120000-ab12",
             absent: frozenset = frozenset()) -> Path:
    """Write a run record as the ServerApp and driver do: metrics.jsonl, devices.jsonl, state, summary, usage."""
    d = root / run_id
    (d / "logs").mkdir(parents=True)
    t0 = 1_700_000_000.0
    records = [{"round": 0, "accuracy": 0.098, "loss": 2.303, "t_start": t0 + 2.0, "t_end": t0 + 2.4,
                "wall_s": 0, "devices": [], "failures": 0}]
    t = t0 + 2.4
    for r in range(1, rounds + 1):
        entries = []
        for i, (name, (cls, sps, samples)) in enumerate(devices.items()):
            if (r, name) in absent:  # the server got no reply from it this round
                continue
            started = t + 0.05 + 0.03 * i
            train_s = samples / sps
            entries.append({"name": name, "class": cls, "train_s": round(train_s, 3), "samples": samples,
                            "steps": samples // 32, "batch_size": 32, "lr": 0.05, "throughput_sps": sps,
                            "started": started, "ended": started + train_s, "status": "ok"})
        t_end = max(e["ended"] for e in entries) + 0.3  # aggregation + central evaluation
        records.append({"round": r, "accuracy": round(0.98 - 0.85 * 0.55 ** r, 4), "loss": round(2.0 * 0.6 ** r, 4),
                        "t_start": t, "t_end": t_end, "wall_s": round(t_end - t, 3), "devices": entries,
                        "failures": sum((r, n) in absent for n in devices)})
        t = t_end
    (d / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in records))
    (d / "devices.jsonl").write_text("".join(
        json.dumps({"name": n, "class": c, "cpus": 1 if c == "pi" else 4, "memory": "1g", "throughput_sps": s,
                    "t": t0 + 1}) + "\n" for n, (c, s, _) in devices.items()))
    (d / "state.json").write_text(json.dumps({"status": status, "target": "local", "created": t0}))
    final = records[-1]["accuracy"] if rounds else None
    (d / "summary.json").write_text(json.dumps({
        "run_id": run_id, "status": status, "final_accuracy": final,
        "rounds": [{k: x[k] for k in ("round", "accuracy", "loss", "wall_s")} for x in records],
        "devices": [{"name": n, "class": c, "train_s": s2 / s * rounds} for n, (c, s, s2) in devices.items()],
        "wall_s": t - t0, "target": "local", "started": t0, "ended": t,
        "error": None if status == "completed" else "device pi-2 exited with code 137"}))
    if usage:
        lines = []
        cpu = dict.fromkeys(devices, 0.0)
        for k in range(int((t - t0) / 0.5)):
            ts = t0 + 0.5 * k
            for name in devices:
                busy = any(e["name"] == name and e["started"] <= ts <= e["ended"]
                           for rec in records for e in rec["devices"])
                cpu[name] += 0.5 * (0.95 if busy else 0.05)
                lines.append({"t": ts, "device": name, "cpu_seconds_total": round(cpu[name], 3),
                              "memory_bytes": (180 + (120 if busy else 0)) * 2**20})
        (d / "usage.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    return d


def rounds_of(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def scrape(port: int) -> dict:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    return {f.name: f for f in text_string_to_metric_families(text)}


def fed_exporter(run_dir: Path) -> FlotillaExporter:
    ex = FlotillaExporter(run_dir.name, "mnist", target_rounds=5)
    for record in rounds_of(run_dir):
        ex.observe_round(record)
    for name, (cls, _, _) in DEVICES.items():
        ex.observe_device_usage(name, cls, 12.5, 300 * 2**20, 2**30 if cls == "pi" else None,
                                1.0 if cls == "pi" else None)
    ex.observe_failure("pi-2", "exited")
    ex.set_status("completed")
    return ex


# -- exporter -------------------------------------------------------------------
def test_exporter_serves_round_and_device_metrics(tmp_path):
    run = make_run(tmp_path)
    records = rounds_of(run)
    ex = fed_exporter(run)
    port = ex.serve(0, addr="127.0.0.1")
    try:
        assert port > 0
        fams = scrape(port)
    finally:
        ex.close()

    run_label = {"run": run.name}
    acc = fams["flotilla_global_accuracy_ratio"].samples
    assert [(s.labels, s.value) for s in acc] == [(run_label, records[-1]["accuracy"])]
    assert fams["flotilla_round"].samples[0].value == 5
    assert fams["flotilla_rounds_target"].samples[0].value == 5
    assert fams["flotilla_global_loss"].samples[0].value == records[-1]["loss"]

    samples = {s.labels["device"]: s for s in fams["flotilla_device_samples"].samples
               if s.name == "flotilla_device_samples_total"}
    assert {d: (s.labels["device_class"], s.value) for d, s in samples.items()} == {
        n: (c, float(per_round * 5)) for n, (c, _, per_round) in DEVICES.items()}
    train_total = {s.labels["device"]: s.value for s in fams["flotilla_device_train_seconds"].samples
                   if s.name == "flotilla_device_train_seconds_total"}
    assert train_total["pi-2"] == pytest.approx(sum(
        e["train_s"] for r in records for e in r["devices"] if e["name"] == "pi-2"))
    last = {s.labels["device"]: s.value for s in fams["flotilla_device_round_train_seconds"].samples}
    assert last["pi-2"] == max(last.values())  # the straggler

    hist = {s.name: s.value for s in fams["flotilla_round_duration_seconds"].samples if not s.labels.get("le")}
    assert hist["flotilla_round_duration_seconds_count"] == 5  # round 0 is no training round
    assert hist["flotilla_round_duration_seconds_sum"] == pytest.approx(sum(r["wall_s"] for r in records))

    cpu = {s.labels["device"]: s for s in fams["flotilla_device_cpu_seconds"].samples}
    assert fams["flotilla_device_cpu_seconds"].type == "counter"
    assert cpu["pi-1"].value == 12.5 and cpu["pi-1"].labels["device_class"] == "pi"
    limits = {s.labels["device"]: s.value for s in fams["flotilla_device_memory_limit_bytes"].samples}
    assert limits == {"pi-1": 2**30, "pi-2": 2**30}  # the laptop has no limit: no series
    quota = {s.labels["device"] for s in fams["flotilla_device_cpu_quota_cores"].samples}
    assert quota == {"pi-1", "pi-2"}

    failures = [s for s in fams["flotilla_device_failures"].samples if s.name.endswith("_total")]
    assert [(s.labels["device"], s.labels["device_class"], s.labels["reason"], s.value) for s in failures] == [
        ("pi-2", "pi", "exited", 1.0)]
    info = fams["flotilla_run_info"].samples[0]
    assert info.labels == {"run": run.name, "flotilla_job": "mnist"}
    status = {s.labels["flotilla_run_status"]: s.value for s in fams["flotilla_run_status"].samples}
    assert status["completed"] == 1 and status["running"] == 0

    with pytest.raises(urllib.error.URLError):  # close() really stops serving
        scrape(port)


def test_observe_round_counts_each_round_once(tmp_path):
    run = make_run(tmp_path, rounds=2)
    ex = FlotillaExporter(run.name, "mnist")
    records = rounds_of(run)
    assert all(ex.observe_round(r) for r in records)
    assert not any(ex.observe_round(r) for r in records)  # re-read after a follower restart
    value = ex.registry.get_sample_value(
        "flotilla_device_samples_total", {"run": run.name, "device": "pi-1", "device_class": "pi"})
    assert value == 2 * DEVICES["pi-1"][2]


def test_set_status_and_serve_errors_name_the_problem(tmp_path):
    ex = FlotillaExporter("r1", "mnist")
    with pytest.raises(ValueError, match="status: 'done' is not one of"):
        ex.set_status("done")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        with pytest.raises(OSError, match=f"metrics port 127.0.0.1:{busy.getsockname()[1]}"):
            ex.serve(busy.getsockname()[1], addr="127.0.0.1")
    ex.close()  # nothing served: still fine


def wait_for(predicate, timeout=5.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return False


def test_follow_run_tails_a_growing_record(tmp_path):
    src = make_run(tmp_path / "src", rounds=2, usage=False)
    run = tmp_path / "live"
    run.mkdir()
    (run / "state.json").write_text(json.dumps({"status": "running"}))
    lines = (src / "metrics.jsonl").read_text().splitlines(keepends=True)
    ex = FlotillaExporter("live", "mnist")
    stop = threading.Event()
    calls = []

    def usage():
        calls.append(1)
        return [{"device": "pi-1", "device_class": "pi", "cpu_seconds_total": 0.5 * len(calls),
                 "memory_bytes": 200 * 2**20, "memory_limit_bytes": 2**30, "cpu_quota": 1.0}]

    def rnd():
        return ex.registry.get_sample_value("flotilla_round", {"run": "live"})

    def status(name):
        return ex.registry.get_sample_value("flotilla_run_status", {"run": "live", "flotilla_run_status": name})

    result = {}
    th = threading.Thread(target=lambda: result.setdefault("n", follow_run(run, ex, stop, usage, interval=0.05)))
    th.start()
    try:
        with open(run / "metrics.jsonl", "w") as fh:
            fh.write(lines[0] + lines[1][:40])  # round 0, and round 1 half written
            fh.flush()
            assert wait_for(lambda: rnd() == 0)
            time.sleep(0.2)
            assert rnd() == 0  # the half line is not read
            fh.write(lines[1][40:])
            fh.flush()
            assert wait_for(lambda: rnd() == 1)
            fh.write(lines[2])
        assert status("running") == 1
        assert wait_for(lambda: len(calls) >= 3)
        (run / "state.json").write_text(json.dumps({"status": "completed"}))
    finally:
        stop.set()
        th.join(timeout=5)
    assert not th.is_alive()
    assert result["n"] == 3 and rnd() == 2  # the final read after stop caught the last round
    assert status("completed") == 1
    assert ex.registry.get_sample_value(
        "flotilla_device_cpu_seconds_total", {"run": "live", "device": "pi-1", "device_class": "pi"}) > 0
    logged = [json.loads(x) for x in (run / "usage.jsonl").read_text().splitlines()]
    assert len(logged) == len(calls) and {"t", "device", "cpu_seconds_total", "memory_bytes"} <= set(logged[0])


# -- Prometheus / Grafana provisioning -------------------------------------------
def test_prometheus_config_scrapes_every_target():
    text = prometheus_config({"flotilla": ["127.0.0.1:9464"], "devices": ["pi-1:9100", "pi-2:9100"]},
                             cadvisor="cadvisor:8080", interval="2s")
    doc = yaml.safe_load(text)
    assert doc["global"]["scrape_interval"] == "2s"
    jobs = {c["job_name"]: c["static_configs"][0]["targets"] for c in doc["scrape_configs"]}
    assert jobs == {"flotilla": ["127.0.0.1:9464"], "devices": ["pi-1:9100", "pi-2:9100"],
                    "cadvisor": ["cadvisor:8080"]}
    assert "cadvisor" not in {c["job_name"] for c in yaml.safe_load(
        prometheus_config({"flotilla": ["h:1"]}, None))["scrape_configs"]}
    with pytest.raises(ValueError, match=r"scrape_targets\['flotilla'\]: 'nohost' is not host:port"):
        prometheus_config({"flotilla": ["nohost"]}, None)
    with pytest.raises(ValueError, match="interval"):
        prometheus_config({"flotilla": ["h:1"]}, None, interval="5 seconds")


def test_write_monitoring_provisions_grafana(tmp_path):
    paths = write_monitoring(tmp_path, {"mnist": ["host.docker.internal:9464"]}, "cadvisor:8080")
    rel = sorted(str(p.relative_to(tmp_path)) for p in paths)
    assert rel == ["grafana/dashboards/flotilla.json", "grafana/provisioning/dashboards/dashboards.yml",
                   "grafana/provisioning/datasources/datasource.yml", "prometheus/prometheus.yml"]
    ds = yaml.safe_load((tmp_path / "grafana/provisioning/datasources/datasource.yml").read_text())
    assert ds["datasources"][0]["uid"] == DATASOURCE_UID and ds["datasources"][0]["type"] == "prometheus"
    prov = yaml.safe_load((tmp_path / "grafana/provisioning/dashboards/dashboards.yml").read_text())
    assert prov["providers"][0]["type"] == "file" and prov["providers"][0]["options"]["path"]
    dash = json.loads((tmp_path / "grafana/dashboards/flotilla.json").read_text())
    assert dash["title"] == "Flotilla: mnist"
    prom = yaml.safe_load((tmp_path / "prometheus/prometheus.yml").read_text())
    assert {c["job_name"] for c in prom["scrape_configs"]} == {"mnist", "cadvisor"}


METRIC_IN_EXPR = re.compile(r"([a-zA-Z_:][a-zA-Z0-9_:]*)\s*\{")


def test_dashboard_is_valid_and_queries_what_the_exporter_exports(tmp_path):
    dash = grafana_dashboard("mnist")
    assert 38 <= dash["schemaVersion"] <= 41 and dash["uid"] and len(dash["uid"]) <= 40
    panels = dash["panels"]
    assert len({p["id"] for p in panels}) == len(panels)
    exporter = fed_exporter(make_run(tmp_path))
    exported = exporter.metric_names()
    used = set()
    for p in panels:
        assert p["title"] and p["type"] in {"timeseries", "stat", "bargauge"}
        assert p["datasource"]["uid"] == DATASOURCE_UID
        assert {"x", "y", "w", "h"} <= set(p["gridPos"]) and p["gridPos"]["x"] + p["gridPos"]["w"] <= 24
        refs = [t["refId"] for t in p["targets"]]
        assert p["targets"] and len(set(refs)) == len(refs)
        for t in p["targets"]:
            assert t["datasource"]["uid"] == DATASOURCE_UID and t["expr"]
            assert t["expr"].count("(") == t["expr"].count(")") and t["expr"].count("{") == t["expr"].count("}")
            used.update(METRIC_IN_EXPR.findall(t["expr"]))
    flotilla_used = {m for m in used if m.startswith("flotilla_")}
    assert used - flotilla_used == CADVISOR_METRICS
    assert flotilla_used <= exported, f"dashboard queries metrics nobody exports: {flotilla_used - exported}"
    for needed in ("flotilla_global_accuracy_ratio", "flotilla_global_loss", "flotilla_device_cpu_seconds_total",
                   "flotilla_device_memory_bytes", "flotilla_device_round_train_seconds",
                   "flotilla_device_failures_total", "flotilla_last_round_duration_seconds"):
        assert needed in flotilla_used

    # Every exported flotilla series has the `run` label the panels filter on,
    # and the run variable's query matches the info metric's labels.
    for family in exporter.registry.collect():
        for s in family.samples:
            assert s.labels.get("run") == exporter.run_id, s
    var = {v["name"]: v for v in dash["templating"]["list"]}["run"]
    assert var["query"]["query"] == 'label_values(flotilla_run_info{flotilla_job="mnist"}, run)'
    assert exporter.registry.get_sample_value("flotilla_run_info", {"run": exporter.run_id, "flotilla_job": "mnist"})


PROMETHEUS = Path("/usr/bin/prometheus")
PROMTOOL = Path("/usr/bin/promtool")


@pytest.mark.skipif(not PROMTOOL.exists(), reason="needs Debian's prometheus package (apt-get install -y prometheus)")
def test_prometheus_config_passes_promtool(tmp_path):
    write_monitoring(tmp_path, {"mnist": ["127.0.0.1:9464"]}, "cadvisor:8080")
    res = subprocess.run([str(PROMTOOL), "check", "config", str(tmp_path / "prometheus/prometheus.yml")],
                         capture_output=True, text=True, timeout=60, check=False)
    assert res.returncode == 0, res.stdout + res.stderr


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def prom_get(port: int, path: str, **params) -> dict:
    url = f"http://127.0.0.1:{port}{path}?{urllib.parse.urlencode(params, doseq=True)}"
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return json.loads(resp.read())
    except urllib.error.HTTPError as e:  # a bad query answers 400 with a JSON error; not ready: 503 text
        body = e.read()
        try:
            return json.loads(body)
        except ValueError:
            return {"status": f"http {e.code}", "error": body.decode(errors="replace")}


@pytest.mark.skipif(not PROMETHEUS.exists(), reason="needs Debian's prometheus package (apt-get install -y prometheus)")
def test_dashboard_queries_work_on_a_real_prometheus(tmp_path):
    """Prometheus scrapes the exporter; every panel query must parse, and Flotilla's return series."""
    run = make_run(tmp_path / "runs")
    exporter = fed_exporter(run)
    metrics_port = exporter.serve(0, addr="127.0.0.1")
    write_monitoring(tmp_path / "mon", {"mnist": [f"127.0.0.1:{metrics_port}"]}, "127.0.0.1:1", interval="1s")
    web_port = free_port()
    prom_log = open(tmp_path / "prometheus.log", "w")  # noqa: SIM115 - closed in finally, after the process
    prom = subprocess.Popen(
        [str(PROMETHEUS), f"--config.file={tmp_path / 'mon/prometheus/prometheus.yml'}",
         f"--storage.tsdb.path={tmp_path / 'tsdb'}", f"--web.listen-address=127.0.0.1:{web_port}"],
        stdout=subprocess.DEVNULL, stderr=prom_log)
    try:
        def scraped_twice():
            try:
                res = prom_get(web_port, "/api/v1/query", query="count_over_time(flotilla_round[1m])")
            except OSError:
                return False
            return bool(res.get("data", {}).get("result")) and float(res["data"]["result"][0]["value"][1]) >= 2

        assert wait_for(scraped_twice, timeout=60), (tmp_path / "prometheus.log").read_text()[-3000:]
        dash = json.loads((tmp_path / "mon/grafana/dashboards/flotilla.json").read_text())
        for panel in dash["panels"]:
            for target in panel["targets"]:
                expr = (target["expr"].replace("$run", run.name).replace("$container", ".+")
                        .replace("$__rate_interval", "1m"))
                res = prom_get(web_port, "/api/v1/query", query=expr)
                assert res["status"] == "success", (panel["title"], expr, res.get("error"))
                if "flotilla_" in expr:
                    assert res["data"]["result"], f"{panel['title']}: no series for {expr}"
        var = {v["name"]: v for v in dash["templating"]["list"]}["run"]
        match = re.fullmatch(r"label_values\((.+), run\)", var["query"]["query"]).group(1)
        values = prom_get(web_port, "/api/v1/label/run/values", **{"match[]": match})
        assert values["data"] == [run.name]
    finally:
        prom.terminate()
        prom.wait(timeout=30)
        prom_log.close()
        exporter.close()


# -- report ---------------------------------------------------------------------
def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR", f"{path} is not a PNG"
    return struct.unpack(">II", data[16:24])


def test_report_writes_html_and_plots(tmp_path):
    run = make_run(tmp_path)
    index = write_report(run)
    assert index == run / "report" / "index.html"
    page = index.read_text()
    imgs = re.findall(r'<img src="([^"]+)" alt="([^"]+)"', page)
    assert [src for src, _ in imgs] == ["accuracy_loss.png", "timeline.png", "training.png", "usage.png"]
    for src, alt in imgs:
        w, h = png_size(run / "report" / src)
        assert w >= 600 and h >= 200 and alt
    assert run.name in page and "completed" in page
    assert f"{rounds_of(run)[-1]['accuracy'] * 100:.2f}%" in page  # final accuracy
    assert page.count("<tr>") == 1 + 6 + 1 + 3  # header + rounds 0..5, header + 3 devices
    assert "pi-2 (" in page  # the straggler is named in the rounds table
    assert not re.search(r'(src|href)="(https?:)?//', page)  # self-contained
    assert "Note:" not in page

    summary = json.loads((run / "summary.json").read_text())
    note = "devices: the fleet's CPU limits add up to 3 CPUs on this machine's 2: <each> gets ~0.5 CPU"
    (run / "summary.json").write_text(json.dumps(summary | {"notes": [note]}))
    page = write_report(run).read_text()
    assert '<div class="notice info">Note: devices: the fleet&#x27;s CPU limits add up to 3 CPUs' in page
    assert "&lt;each&gt;" in page  # escaped


def test_report_handles_failed_run_without_rounds(tmp_path):
    run = make_run(tmp_path, rounds=0, status="failed", usage=False)
    (run / "metrics.jsonl").unlink()
    page = write_report(run).read_text()
    assert "This run failed" in page and "exited with code 137" in page
    assert "No training rounds were recorded" in page and "<img" not in page

    run0 = make_run(tmp_path, rounds=0, status="stopped", usage=False, run_id="only-round-0")
    page0 = write_report(run0).read_text()
    assert "only the initial evaluation" in page0 and 'src="accuracy_loss.png"' in page0
    assert not (run0 / "report" / "timeline.png").exists()


def test_device_missing_from_a_round_is_reported(tmp_path):
    run = make_run(tmp_path, rounds=4, absent=frozenset({(3, "pi-2")}))
    page = write_report(run).read_text()
    rows = {m[0]: m[1:] for m in re.findall(
        r"<tr><td>(\d+)</td><td>[^<]*</td><td>[^<]*</td><td>[^<]*</td><td>(\d+)</td><td>(\d+)</td>", page)}
    assert rows["3"] == ("2", "1") and rows["2"] == ("3", "0")  # devices that replied, failures
    assert re.search(r"<td>pi-2</td><td>pi</td><td>3</td>", page)  # pi-2 trained in 3 of 4 rounds
    ex = FlotillaExporter(run.name, "mnist")
    for record in rounds_of(run):
        ex.observe_round(record)
    assert ex.registry.get_sample_value("flotilla_round_failures_total", {"run": run.name}) == 1
    assert ex.registry.get_sample_value(
        "flotilla_device_rounds_total", {"run": run.name, "device": "pi-2", "device_class": "pi"}) == 3


def test_report_is_fast_for_20_rounds_of_8_devices(tmp_path):
    devices = {f"dev-{i}": (("pi", "laptop", "phone")[i % 3], 200.0 + 150 * i, 800) for i in range(8)}
    run = make_run(tmp_path, rounds=20, devices=devices)
    # A fresh interpreter, so matplotlib's import is part of the measurement, as in `flotilla report`.
    # CPU time is asserted: wall time on a loaded CI machine measures the neighbours too.
    code = ("import sys,time; w=time.perf_counter(); c=time.process_time(); "
            "from flotilla.monitor.report import write_report; write_report(sys.argv[1]); "
            "print(time.perf_counter()-w, time.process_time()-c)")
    out = subprocess.run([sys.executable, "-c", code, str(run)], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": str(SRC)}, timeout=60)
    wall, cpu = map(float, out.stdout.split())
    print(f"write_report 20 rounds x 8 devices (cold import): wall {wall:.2f} s, cpu {cpu:.2f} s")
    assert cpu < 3.0
    assert len(list((run / "report").glob("*.png"))) == 4


# -- headless browser ----------------------------------------------------------------
def chromium(*args: str, profile: Path) -> subprocess.CompletedProcess:
    cmd = [str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           "--disable-dev-shm-usage", f"--user-data-dir={profile}", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)


@pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium at /usr/bin/chromium "
                                                  "(apt-get install -y chromium)")
def test_report_renders_in_headless_chromium(tmp_path):
    run = make_run(tmp_path / "runs")
    index = write_report(run)
    dom = chromium("--virtual-time-budget=5000", "--dump-dom", index.as_uri(), profile=tmp_path / "profile")
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert len(re.findall(r"<img ", dom.stdout)) == 4
    # Set by the page's own script once every image decoded (naturalWidth > 0).
    assert 'data-images-loaded="all"' in dom.stdout, re.findall(r"data-images-loaded=\"[^\"]*\"", dom.stdout)

    shot = tmp_path / "report.png"
    res = chromium(f"--screenshot={shot}", "--window-size=1200,1800", "--hide-scrollbars",
                   "--virtual-time-budget=5000", index.as_uri(), profile=tmp_path / "profile")
    assert res.returncode == 0 and shot.exists(), res.stderr[-2000:]
    assert png_size(shot) == (1200, 1800)
    import matplotlib.image

    pixels = matplotlib.image.imread(shot)
    assert pixels[..., :3].std() > 0.05  # not a blank page
    keep = os.environ.get("FLOTILLA_KEEP_SCREENSHOT")
    if keep:
        shutil.copy(shot, keep)
