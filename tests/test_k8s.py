"""Kubernetes target: rendered manifests are valid for the API and say what the job says.

No cluster can run here, so every manifest is validated offline against the
Kubernetes 1.30 API schemas (kubernetes-validate, strict: unknown fields fail),
and the device entrypoint is executed with a real `sh` to show each pod becomes
the Plan's device. Talking to a cluster is checked for its failure mode: a
clear one-line error when none is reachable.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import yaml

kv = pytest.importorskip("kubernetes_validate")

from flotilla.job import Job, load_job, parse_memory  # noqa: E402
from flotilla.plan import format_node_config, make_plan  # noqa: E402
from flotilla.runs import RunRecord  # noqa: E402
from flotilla.security import load_bundle, private_key_markers  # noqa: E402
from flotilla.targets.base import TargetError  # noqa: E402
from flotilla.targets.k8s.render import pod_device_name  # noqa: E402
from flotilla.targets.k8s.target import K8sTarget  # noqa: E402

K8S_VERSION = "1.30"


def _cpu(q: str) -> float:
    return int(q[:-1]) / 1000 if q.endswith("m") else float(q)


def _mem(q: str) -> int:
    units = {"Ki": 1024, "Mi": 1024**2, "Gi": 1024**3}
    for u, f in units.items():
        if q.endswith(u):
            return int(q[: -len(u)]) * f
    return int(q)


def write_job(tmp_path: Path, doc: dict) -> Path:
    p = tmp_path / f"{doc['name']}.yaml"
    p.write_text(yaml.safe_dump(doc))
    return p




def gpu_job(tmp_path: Path) -> Job:
    doc = {"name": "gpufleet", "rounds": 2, "devices": [
        {"name": "jetson", "count": 2, "cpus": 1.5, "memory": "2g", "gpus": 1,
         "placement": {"arch": "aarch64", "labels": {"accelerator": "nvidia"}}},
        {"name": "cpu", "count": 1, "cpus": 0.25, "memory": "256m"},
    ]}
    return load_job(write_job(tmp_path, doc))


def render(tmp_path: Path, job: Job, **opts) -> tuple[list[Path], dict[str, list[dict]]]:
    out = tmp_path / f"render-{job.name}"
    paths = K8sTarget(cert_dir=tmp_path / "certs" / job.name, **opts).render(make_plan(job), out)
    docs = {p.name: list(yaml.safe_load_all(p.read_text())) for p in paths if p.suffix == ".yaml"}
    return paths, docs


def objects(docs: dict[str, list[dict]], kind: str) -> list[dict]:
    return [o for objs in docs.values() for o in objs if o["kind"] == kind]


def by_name(docs, kind: str, name: str) -> dict:
    (obj,) = [o for o in objects(docs, kind) if o["metadata"]["name"] == name]
    return obj


def pod_spec(obj: dict) -> dict:
    return obj["spec"]["template"]["spec"]


@pytest.fixture
def jobs(tmp_path) -> dict[str, Job]:
    data = tmp_path / "mnist-idx"
    data.mkdir()
    edge = {"name": "edge", "rounds": 3, "devices": [
        {"name": "pi", "count": 3, "cpus": 0.5, "memory": "512m",
         "placement": {"arch": "arm64", "labels": {"zone": "edge", "site": "lab-2"}}},
        {"name": "laptop", "count": 1, "cpus": 2, "memory": "2g", "placement": {"hostname": "laptop-7"}},
    ]}
    hostdata = {"name": "hostdata", "data": {"dataset": "mnist", "path": str(data)}, "devices": [
        {"name": "box", "count": 2, "cpus": 1, "memory": "1g", "placement": {"hostname": "worker-node-1"}}]}
    return {
        "edge": load_job(write_job(tmp_path, edge)),
        "hostdata": load_job(write_job(tmp_path, hostdata), check_paths=False),  # renders only: not read
        "gpu": gpu_job(tmp_path),
    }


VARIANTS = [
    ("edge", {}),
    ("edge", {"insecure": True, "service_type": "NodePort"}),
    ("hostdata", {"data": "hostpath"}),
    ("hostdata", {"data": "pvc", "storage_class": "nfs-client", "data_size": "5Gi"}),
    ("hostdata", {"data": "pvc", "data_claim": "mnist-shared", "insecure": True}),
    ("gpu", {"tolerations": [{"key": "edge", "operator": "Equal", "value": "true", "effect": "NoSchedule"}]}),
]


@pytest.mark.parametrize("job_key,opts", VARIANTS, ids=[f"{j}-{'-'.join(o) or 'default'}" for j, o in VARIANTS])
def test_every_manifest_validates_against_the_api_schema(tmp_path, jobs, job_key, opts):
    _, docs = render(tmp_path, jobs[job_key], **opts)
    count = 0
    for name, objs in docs.items():
        for obj in objs:
            try:
                kv.validate(obj, K8S_VERSION, strict=True)
            except kv.ValidationError as err:
                pytest.fail(f"{name}: {obj['kind']} {obj['metadata']['name']}: {str(err).splitlines()[0]}")
            count += 1
    kinds = {o["kind"] for objs in docs.values() for o in objs}
    assert {"Namespace", "ConfigMap", "Deployment", "Service", "StatefulSet"} <= kinds
    assert "Secret" not in kinds  # secrets are made from files by `up`, never rendered
    assert count >= 6


def test_a_manifest_the_api_would_refuse_fails_validation(tmp_path, jobs):
    """The validator is not a rubber stamp: a typo in a pod spec is caught."""
    _, docs = render(tmp_path, jobs["edge"])
    sts = by_name(docs, "StatefulSet", "pi")
    pod_spec(sts)["nodeSelecter"] = {"zone": "edge"}
    with pytest.raises(kv.ValidationError):
        kv.validate(sts, K8S_VERSION, strict=True)


def test_limits_selectors_and_replicas_follow_the_job(tmp_path, jobs):
    job = jobs["edge"]
    _, docs = render(tmp_path, job)
    assert by_name(docs, "Namespace", "flotilla-edge")
    for cls in job.devices:
        sts = by_name(docs, "StatefulSet", cls.name)
        assert sts["metadata"]["namespace"] == "flotilla-edge"
        assert sts["spec"]["replicas"] == cls.count
        (c,) = pod_spec(sts)["containers"]
        for part in ("limits", "requests"):
            assert _cpu(c["resources"][part]["cpu"]) == cls.cpus
            assert _mem(c["resources"][part]["memory"]) == cls.memory
    pi = pod_spec(by_name(docs, "StatefulSet", "pi"))
    assert pi["nodeSelector"] == {"zone": "edge", "site": "lab-2", "kubernetes.io/arch": "arm64"}
    laptop = pod_spec(by_name(docs, "StatefulSet", "laptop"))
    assert laptop["nodeSelector"] == {"kubernetes.io/hostname": "laptop-7"}
    assert _mem("2Gi") == parse_memory("2g")


def test_superlink_service_port_and_prometheus_annotations(tmp_path, jobs):
    _, docs = render(tmp_path, jobs["edge"])
    svc = by_name(docs, "Service", "superlink")
    assert {p["port"] for p in svc["spec"]["ports"]} == {8000, 9400}
    dep = by_name(docs, "Deployment", "superlink")
    ann = dep["spec"]["template"]["metadata"]["annotations"]
    assert ann == {"prometheus.io/scrape": "true", "prometheus.io/port": "9400", "prometheus.io/path": "/metrics"}
    labels = dep["spec"]["template"]["metadata"]["labels"]
    assert all(labels[k] == v for k, v in svc["spec"]["selector"].items())  # the Service selects the pod
    cmd = pod_spec(dep)["containers"][0]["command"]
    assert cmd[:3] == ["python", "-m", "flotilla.runtime.superlink"]  # flwr's SuperLink, its ServerApps observed
    assert "--disable-runtime-dependency-installation" in cmd
    assert cmd[cmd.index("--port") + 1] == "8000" and cmd[cmd.index("--host") + 1] == "0.0.0.0"
    cm = by_name(docs, "ConfigMap", "job")
    assert yaml.safe_load(cm["data"]["job.yaml"])["name"] == "edge"


def test_each_pod_becomes_the_plans_device(tmp_path, jobs):
    """Run the StatefulSet entrypoint with sh for every ordinal: name, partition and node config match the Plan."""
    job = jobs["edge"]
    plan = make_plan(job)
    _, docs = render(tmp_path, job)
    seen = {}
    for cls in job.devices:
        (c,) = pod_spec(by_name(docs, "StatefulSet", cls.name))["containers"]
        script = c["command"][2].replace("exec python -m flotilla.runtime.device", "exec printf '%s\\n'")
        env = {e["name"]: e["value"] for e in c["env"] if "value" in e}
        for ordinal in range(cls.count):
            pod = f"{cls.name}-{ordinal}"
            out = subprocess.run(["sh", "-c", script], env=env | {"POD_NAME": pod}, capture_output=True,
                                 text=True, check=True).stdout.splitlines()
            name = out[out.index("--name") + 1]
            assert name == pod_device_name(pod)
            dev = plan.device(name)
            got = out[out.index("--node-config") + 1]
            assert dict(kv_.split("=", 1) for kv_ in got.split(" ")) == dict(
                kv_.split("=", 1) for kv_ in format_node_config(dev.node_config()).split(" "))
            assert out[out.index("--auth-private-key") + 1] == f"/etc/flotilla/supernode/{name}.key"
            seen[name] = dev.partition_id
    assert sorted(seen.values()) == list(range(job.device_count))


def test_gpu_class_gets_nvidia_limit_and_toleration(tmp_path, jobs):
    _, docs = render(tmp_path, jobs["gpu"], tolerations=[{"key": "edge", "operator": "Exists"}])
    jetson = pod_spec(by_name(docs, "StatefulSet", "jetson"))
    res = jetson["containers"][0]["resources"]
    assert res["limits"]["nvidia.com/gpu"] == "1"
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in jetson["tolerations"]
    assert {"key": "edge", "operator": "Exists"} in jetson["tolerations"]
    assert jetson["nodeSelector"]["kubernetes.io/arch"] == "arm64"  # aarch64 spelled the Kubernetes way
    cpu = pod_spec(by_name(docs, "StatefulSet", "cpu"))
    assert "nvidia.com/gpu" not in cpu["containers"][0]["resources"]["limits"]
    assert cpu["containers"][0]["resources"]["limits"]["cpu"] == "250m"


@pytest.mark.parametrize("mode", ["hostpath", "pvc"])
def test_data_by_hostpath_or_pvc_at_the_jobs_path(tmp_path, jobs, mode):
    job = jobs["hostdata"]
    _, docs = render(tmp_path, job, data=mode)
    path = str(job.data.path)
    for kind, name in (("Deployment", "superlink"), ("StatefulSet", "box")):
        spec = pod_spec(by_name(docs, kind, name))
        vol = {v["name"]: v for v in spec["volumes"]}["data"]
        mount = {m["name"]: m for m in spec["containers"][0]["volumeMounts"]}["data"]
        assert mount["mountPath"] == path and mount["readOnly"] is True
        if mode == "hostpath":
            assert vol["hostPath"] == {"path": path, "type": "Directory"}
        else:
            assert vol["persistentVolumeClaim"]["claimName"] == "hostdata-data"
    pvcs = objects(docs, "PersistentVolumeClaim")
    assert len(pvcs) == (1 if mode == "pvc" else 0)
    _, docs = render(tmp_path, job, data="pvc", data_claim="existing")
    assert not objects(docs, "PersistentVolumeClaim")  # an existing claim is referenced, not made


def test_tls_secrets_are_referenced_never_rendered(tmp_path, jobs):
    job = jobs["edge"]
    paths, docs = render(tmp_path, job)
    bundle = load_bundle(tmp_path / "certs" / "edge")
    markers = private_key_markers(bundle)
    assert len(markers) == 2 + 1 + job.device_count  # header + CA + server + every device key
    for p in paths:
        text = p.read_bytes()
        for m in markers:
            assert m not in text, f"{p.name} contains private key material"
    cmd = pod_spec(by_name(docs, "Deployment", "superlink"))["containers"][0]["command"]
    assert "--enable-supernode-auth" in cmd and "--insecure" not in cmd
    assert cmd[cmd.index("--ssl-keyfile") + 1] == "/etc/flotilla/tls/superlink.key"
    vols = {v["name"]: v for v in pod_spec(by_name(docs, "Deployment", "superlink"))["volumes"]}
    assert vols["tls"]["secret"]["secretName"] == "superlink-tls"
    pi = {v["name"]: v for v in pod_spec(by_name(docs, "StatefulSet", "pi"))["volumes"]}
    assert pi["keys"]["secret"] == {"secretName": "supernode-pi", "defaultMode": 0o400}
    script = (paths[0].parent / "create-secrets.sh").read_text()
    assert "kubectl -n flotilla-edge create secret generic supernode-pi" in script
    assert f"pi-3.key={bundle.node('pi-3').private_key.resolve()}" in script


def test_insecure_renders_no_tls(tmp_path, jobs):
    paths, docs = render(tmp_path, jobs["edge"], insecure=True)
    cmd = pod_spec(by_name(docs, "Deployment", "superlink"))["containers"][0]["command"]
    assert "--insecure" in cmd and "--enable-supernode-auth" not in cmd
    script = pod_spec(by_name(docs, "StatefulSet", "pi"))["containers"][0]["command"][2]
    assert "--insecure" in script and "--root-certificates" not in script
    assert not (tmp_path / "certs" / "edge").exists()  # no keys made when none are used
    assert not any(p.name == "create-secrets.sh" for p in paths)


def _kubeconfig(tmp_path: Path, server: str) -> Path:
    p = tmp_path / "kubeconfig"
    p.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "c",
        "clusters": [{"name": "c", "cluster": {"server": server}}],
        "contexts": [{"name": "c", "context": {"cluster": "c", "user": "u"}}],
        "users": [{"name": "u", "user": {"token": "t"}}],
    }))
    return p


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_clear_error_when_no_cluster_is_reachable(tmp_path, jobs, monkeypatch):
    job = jobs["edge"]
    plan = make_plan(job)
    run = RunRecord.create(tmp_path / "runs", "edge-run", job.model_dump(mode="json"), plan.to_dict())
    kc = _kubeconfig(tmp_path, f"https://127.0.0.1:{_free_port()}")  # nothing listens there
    monkeypatch.setenv("KUBECONFIG", str(kc))
    with pytest.raises(TargetError) as err:
        K8sTarget(cert_dir=tmp_path / "certs").up(plan, run)
    msg = str(err.value)
    assert "\n" not in msg
    assert msg.startswith("no Kubernetes cluster reachable at https://127.0.0.1:") and "connection refused" in msg
    assert not (run.dir / "k8s").exists() and "k8s_namespace" not in run.state()  # nothing half-made

    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "missing"))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    with pytest.raises(TargetError, match=r"^no Kubernetes cluster configured: no kubeconfig at .*missing"):
        K8sTarget().up(plan, run)


def test_bad_options_are_one_line_errors(tmp_path, jobs):
    with pytest.raises(TargetError, match="k8s data option 'nfs'"):
        render(tmp_path, jobs["edge"], data="nfs")
    with pytest.raises(TargetError, match="needs data.path"):
        render(tmp_path, jobs["edge"], data="pvc")
