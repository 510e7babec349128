"""Kubernetes: the same Plan as manifests, run through the user's kubeconfig.

Objects (namespace `flotilla-<job>` unless told otherwise):
  Namespace; ConfigMap `job` (job.yaml, plan.json); SuperLink Deployment +
  Service `superlink` (port 8000, Prometheus annotations for the ServerApp
  exporter on 9400); per device class a headless Service + StatefulSet.

Why a StatefulSet per class: a device needs a stable identity (its partition
id, its name in the records and its registered SuperNode key) that survives
pod restarts, while a class of 200 identical Pis should stay one object. The
pod name `<class>-<ordinal>` gives it: the entrypoint turns the ordinal into
the device name `<class>-<ordinal+1>` and partition id `offset + ordinal`
(exactly the Plan's numbering), and picks that device's key from the class's
Secret. `podManagementPolicy: Parallel` starts all replicas at once.

TLS and SuperNode authentication are on unless `insecure`: the Secrets
`superlink-tls` and `supernode-<class>` are created by `up` from the files of
the job's certificate bundle; rendered files only name them (and
`create-secrets.sh` shows the equivalent kubectl commands with file paths).
"""

from __future__ import annotations

import base64
import io
import json
import os
import select
import socket
import tarfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from flotilla.images.appdeps import check_image_has_app
from flotilla.images.build import image_app_dir
from flotilla.job import DeviceClass
from flotilla.plan import DevicePlan, Plan, format_node_config
from flotilla.runs import RunRecord
from flotilla.runtime.commands import (
    DEVICE_PORT, FLOWER_ENV, METRICS_PORT, SUPERLINK_PORT, DeviceTls, ServerTls, device_command, record_env,
    remote_device_threads, superlink_command,
)
from flotilla.targets.base import Federation, Target, TargetError

TLS_MOUNT = "/etc/flotilla/tls"
KEYS_MOUNT = "/etc/flotilla/supernode"
RECORDS_MOUNT = "/records"
MANAGED_BY = {"app.kubernetes.io/managed-by": "flotilla"}
CLASS_LABEL = "flotilla.dev/device-class"
# uname / docker spellings -> the kubernetes.io/arch label's values
K8S_ARCH = {"x86_64": "amd64", "amd64": "amd64", "aarch64": "arm64", "arm64": "arm64",
            "armv7l": "arm", "armhf": "arm", "arm": "arm", "ppc64le": "ppc64le", "s390x": "s390x"}


@dataclass
class K8sOptions:
    namespace: str | None = None  # default flotilla-<job>
    image: str | None = None  # default flotilla:<version>, under `registry` when given
    registry: str | None = None
    image_pull_policy: str = "IfNotPresent"
    insecure: bool = False  # plain HTTP and no SuperNode auth: only for trusted networks
    cert_dir: Path | None = None  # default certs/<job>
    data: str = "auto"  # auto | none | hostpath | pvc
    data_claim: str | None = None  # an existing PVC; with data=pvc and none given, one is rendered
    data_size: str = "1Gi"
    storage_class: str | None = None
    service_type: str = "ClusterIP"  # ClusterIP | NodePort | LoadBalancer
    tolerations: list[dict] = field(default_factory=list)  # added to every device pod
    kubeconfig: str | None = None
    context: str | None = None
    superlink_cpu: str = "500m"
    superlink_memory: str = "2Gi"  # SuperLink ~150 MB + ServerApp ~570 MB, with headroom


# -- quantities ---------------------------------------------------------------

def cpu_quantity(cpus: float) -> str:
    milli = round(cpus * 1000)
    return str(milli // 1000) if milli % 1000 == 0 else f"{milli}m"


def memory_quantity(n: int) -> str:
    for unit, size in (("Gi", 1024**3), ("Mi", 1024**2), ("Ki", 1024)):
        if n % size == 0:
            return f"{n // size}{unit}"
    return str(n)


def class_gpus(cls: DeviceClass) -> int:
    # `gpus` is not a DeviceClass field yet (the lead adds it); 0 until then.
    return int(getattr(cls, "gpus", 0) or 0)


def k8s_arch(arch: str) -> str:
    return K8S_ARCH.get(arch.lower(), arch.lower())


# -- rendering --------------------------------------------------------------------

def _meta(name: str, ns: str | None, job: str, component: str, extra: dict | None = None) -> dict:
    labels = {"app.kubernetes.io/name": "flotilla", "app.kubernetes.io/instance": job,
              "app.kubernetes.io/component": component, **MANAGED_BY, **(extra or {})}
    meta = {"name": name, "labels": labels}
    if ns:
        meta["namespace"] = ns
    return meta


def _selector(job: str, component: str, extra: dict | None = None) -> dict:
    return {"app.kubernetes.io/instance": job, "app.kubernetes.io/component": component, **(extra or {})}


def _env(d: dict[str, str]) -> list[dict]:
    return [{"name": k, "value": v} for k, v in d.items()]


class K8sRenderer:
    """Plan + options -> Kubernetes objects (dicts). Pure: no cluster needed."""

    def __init__(self, plan: Plan, opts: K8sOptions, tls_devices: list[str] | None = None) -> None:
        self.plan, self.opts = plan, opts
        self.job = plan.job
        self.ns = opts.namespace or f"flotilla-{self.job.name}"
        self.image = opts.image or _default_image(opts.registry)
        self.tls = not opts.insecure

    # data: where the job's data path is mounted (the same path, so run_config's data-path holds)
    def data_mode(self) -> str:
        mode = self.opts.data
        if mode not in ("auto", "none", "hostpath", "pvc"):
            raise TargetError(f"k8s data option {mode!r}: use auto, none, hostpath or pvc")
        if mode == "auto":
            return "hostpath" if self.job.data.path is not None else "none"
        if mode != "none" and self.job.data.path is None:
            raise TargetError(f"k8s data={mode} needs data.path in the job: the path the data is mounted at")
        return mode

    def data_claim(self) -> str:
        return self.opts.data_claim or f"{self.job.name}-data"

    def _data_volume(self) -> tuple[list[dict], list[dict]]:
        mode = self.data_mode()
        if mode == "none":
            return [], []
        path = str(self.job.data.path)
        if mode == "hostpath":
            vol = {"name": "data", "hostPath": {"path": path, "type": "Directory"}}
        else:
            vol = {"name": "data", "persistentVolumeClaim": {"claimName": self.data_claim(), "readOnly": True}}
        return [vol], [{"name": "data", "mountPath": path, "readOnly": True}]

    # -- objects ---------------------------------------------------------------
    def namespace(self) -> dict:
        return {"apiVersion": "v1", "kind": "Namespace", "metadata": _meta(self.ns, None, self.job.name, "namespace")}

    def configmap(self) -> dict:
        return {
            "apiVersion": "v1", "kind": "ConfigMap",
            "metadata": _meta("job", self.ns, self.job.name, "job"),
            "data": {
                "job.yaml": yaml.safe_dump(self.job.model_dump(mode="json"), sort_keys=False),
                "plan.json": json.dumps(self.plan.to_dict(), indent=2),
            },
        }

    def data_pvc(self) -> dict | None:
        if self.data_mode() != "pvc" or self.opts.data_claim:
            return None
        spec = {"accessModes": ["ReadWriteMany"], "resources": {"requests": {"storage": self.opts.data_size}}}
        if self.opts.storage_class:
            spec["storageClassName"] = self.opts.storage_class
        return {"apiVersion": "v1", "kind": "PersistentVolumeClaim",
                "metadata": _meta(self.data_claim(), self.ns, self.job.name, "data"), "spec": spec}

    def superlink_args(self) -> list[str]:
        tls = ServerTls(f"{TLS_MOUNT}/ca.crt", f"{TLS_MOUNT}/superlink.crt", f"{TLS_MOUNT}/superlink.key")
        return superlink_command(tls=tls if self.tls else None, database="/state/state.db")

    def superlink(self) -> list[dict]:
        job = self.job.name
        annotations = {"prometheus.io/scrape": "true", "prometheus.io/port": str(METRICS_PORT),
                       "prometheus.io/path": "/metrics"}
        data_vols, data_mounts = self._data_volume()
        volumes = [{"name": "state", "emptyDir": {}}, {"name": "records", "emptyDir": {}},
                   {"name": "job", "configMap": {"name": "job"}}, *data_vols]
        mounts = [{"name": "state", "mountPath": "/state"}, {"name": "records", "mountPath": RECORDS_MOUNT},
                  {"name": "job", "mountPath": "/etc/flotilla/job", "readOnly": True}, *data_mounts]
        if self.tls:
            volumes.append({"name": "tls", "secret": {"secretName": "superlink-tls", "defaultMode": 0o400}})
            mounts.append({"name": "tls", "mountPath": TLS_MOUNT, "readOnly": True})
        container = {
            "name": "superlink",
            "image": self.image,
            "imagePullPolicy": self.opts.image_pull_policy,
            "command": self.superlink_args(),
            "env": _env(FLOWER_ENV | record_env(RECORDS_MOUNT, run_id="", job_name=job, policy=self.job.heterogeneity.policy,
                                                accuracy_metric=self.job.metrics.accuracy,
                                                loss_metric=self.job.metrics.loss, metrics_port=METRICS_PORT)),
            "workingDir": f"{RECORDS_MOUNT}/outputs/superlink",
            "ports": [{"name": "flower", "containerPort": SUPERLINK_PORT},
                      {"name": "metrics", "containerPort": METRICS_PORT}],
            "readinessProbe": {"tcpSocket": {"port": SUPERLINK_PORT}, "periodSeconds": 2},
            "resources": {"requests": {"cpu": self.opts.superlink_cpu, "memory": "1Gi"},
                          "limits": {"memory": self.opts.superlink_memory}},
            "volumeMounts": mounts,
        }
        deployment = {
            "apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": _meta("superlink", self.ns, job, "superlink"),
            "spec": {
                "replicas": 1,
                "strategy": {"type": "Recreate"},  # one SuperLink owns the state; never two at once
                "selector": {"matchLabels": _selector(job, "superlink")},
                "template": {
                    "metadata": {"labels": _meta("superlink", None, job, "superlink")["labels"],
                                 "annotations": annotations},
                    "spec": {"containers": [container], "volumes": volumes, "enableServiceLinks": False},
                },
            },
        }
        service = {
            "apiVersion": "v1", "kind": "Service",
            "metadata": _meta("superlink", self.ns, job, "superlink") | {"annotations": annotations},
            "spec": {
                "type": self.opts.service_type,
                "selector": _selector(job, "superlink"),
                "ports": [{"name": "flower", "port": SUPERLINK_PORT, "targetPort": "flower"},
                          {"name": "metrics", "port": METRICS_PORT, "targetPort": "metrics"}],
            },
        }
        return [deployment, service]

    def node_selector(self, cls: DeviceClass) -> dict[str, str]:
        sel = dict(cls.placement.labels)
        if cls.placement.hostname:
            sel["kubernetes.io/hostname"] = cls.placement.hostname
        if cls.placement.arch:
            sel["kubernetes.io/arch"] = k8s_arch(cls.placement.arch)
        return sel

    def tolerations(self, cls: DeviceClass) -> list[dict]:
        tol = [dict(t) for t in self.opts.tolerations]
        tol += [dict(t) for t in (getattr(cls.placement, "tolerations", None) or [])]
        if class_gpus(cls):
            tol.append({"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"})
        return tol

    def resources(self, cls: DeviceClass) -> dict:
        limits: dict[str, str] = {}
        if cls.cpus is not None:
            limits["cpu"] = cpu_quantity(cls.cpus)
        if cls.memory is not None:
            limits["memory"] = memory_quantity(cls.memory)
        if class_gpus(cls):
            limits["nvidia.com/gpu"] = str(class_gpus(cls))
        # requests == limits: the scheduler reserves exactly the device's capacity (Guaranteed QoS)
        return {"requests": dict(limits), "limits": limits} if limits else {}

    def device_script(self, cls: DeviceClass, first: DevicePlan) -> str:
        """Entrypoint: pod ordinal -> device name and partition id, then the device command."""
        import shlex

        app = self.plan.app
        cmd = device_command(
            name="@NAME@", device_class=cls.name, superlink=f"superlink:{SUPERLINK_PORT}", port=DEVICE_PORT,
            node_config="@NODE_CONFIG@", threads=remote_device_threads(cls.cpus),
            tls=DeviceTls(f"{KEYS_MOUNT}/ca.crt", f"{KEYS_MOUNT}/@NAME@.key") if self.tls else None,
            trainer=app.builtin, preload_app=None if app.builtin else image_app_dir(app.name))
        line = " ".join(shlex.quote(c) for c in cmd).replace("@NAME@", '"$NAME"').replace(
            "@NODE_CONFIG@", '"partition-id=$PARTITION device=\\"$NAME\\" $FLOTILLA_NODE_CONFIG"')
        return (
            "set -e\n"
            'ORDINAL="${POD_NAME##*-}"\n'
            f'NAME="{cls.name}-$((ORDINAL + 1))"\n'
            f"PARTITION=$(({first.partition_id} + ORDINAL))\n"
            f"exec {line}\n"
        )

    def device_class(self, cls: DeviceClass) -> list[dict]:
        job = self.job.name
        devs = [d for d in self.plan.devices if d.device_class == cls.name]
        common = {k: v for k, v in devs[0].node_config().items() if k not in ("partition-id", "device")}
        extra = {CLASS_LABEL: cls.name}
        data_vols, data_mounts = self._data_volume()
        volumes, mounts = list(data_vols), list(data_mounts)
        if self.tls:
            volumes.append({"name": "keys", "secret": {"secretName": f"supernode-{cls.name}", "defaultMode": 0o400}})
            mounts.append({"name": "keys", "mountPath": KEYS_MOUNT, "readOnly": True})
        env = [{"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
               {"name": "FLOTILLA_NODE_CONFIG", "value": format_node_config(common)},
               *_env(FLOWER_ENV)]
        container = {
            "name": "device",
            "image": self.image,
            "imagePullPolicy": self.opts.image_pull_policy,
            "command": ["sh", "-c", self.device_script(cls, devs[0])],
            "env": env,
            "volumeMounts": mounts,
        }
        if res := self.resources(cls):
            container["resources"] = res
        pod_spec: dict = {
            "containers": [container],
            "enableServiceLinks": False,
            "terminationGracePeriodSeconds": 15,
            # Spread a class over nodes: one device per machine is what a fleet looks like.
            "affinity": {"podAntiAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": [{
                "weight": 50,
                "podAffinityTerm": {"topologyKey": "kubernetes.io/hostname",
                                    "labelSelector": {"matchLabels": _selector(job, "device", extra)}},
            }]}},
        }
        if volumes:
            pod_spec["volumes"] = volumes
        if sel := self.node_selector(cls):
            pod_spec["nodeSelector"] = sel
        if tol := self.tolerations(cls):
            pod_spec["tolerations"] = tol
        headless = {
            "apiVersion": "v1", "kind": "Service",
            "metadata": _meta(cls.name, self.ns, job, "device", extra),
            "spec": {"clusterIP": "None", "selector": _selector(job, "device", extra),
                     "ports": [{"name": "runtime", "port": DEVICE_PORT}]},
        }
        sts = {
            "apiVersion": "apps/v1", "kind": "StatefulSet",
            "metadata": _meta(cls.name, self.ns, job, "device", extra),
            "spec": {
                "serviceName": cls.name,
                "replicas": cls.count,
                "podManagementPolicy": "Parallel",
                "selector": {"matchLabels": _selector(job, "device", extra)},
                "template": {"metadata": {"labels": _meta(cls.name, None, job, "device", extra)["labels"]},
                             "spec": pod_spec},
            },
        }
        return [headless, sts]

    def files(self) -> dict[str, list[dict]]:
        """File name -> objects, in apply order."""
        out: dict[str, list[dict]] = {"00-namespace.yaml": [self.namespace()],
                                      "10-job-configmap.yaml": [self.configmap()]}
        if pvc := self.data_pvc():
            out["15-data-pvc.yaml"] = [pvc]
        out["20-superlink.yaml"] = self.superlink()
        for i, cls in enumerate(self.job.devices):
            out[f"{30 + i:02d}-devices-{cls.name}.yaml"] = self.device_class(cls)
        return out

    def secret_files(self, bundle) -> dict[str, dict[str, Path]]:
        """Secret name -> {key: file}; made into Secrets by `up`, never written into a manifest."""
        out = {"superlink-tls": {"ca.crt": bundle.ca_cert, "superlink.crt": bundle.server_cert,
                                 "superlink.key": bundle.server_key}}
        for cls in self.job.devices:
            keys: dict[str, Path] = {"ca.crt": bundle.ca_cert}
            for d in self.plan.devices:
                if d.device_class == cls.name:
                    nk = bundle.node(d.name)
                    keys[f"{d.name}.key"] = nk.private_key
            out[f"supernode-{cls.name}"] = keys
        return out


def _default_image(registry: str | None) -> str:
    from flotilla.images import default_image

    return default_image(registry)


class _Dumper(yaml.SafeDumper):
    """Multi-line strings (entrypoint scripts, job.yaml) as readable `|` blocks."""


def _str(dumper: yaml.SafeDumper, s: str):
    return dumper.represent_scalar("tag:yaml.org,2002:str", s, style="|" if "\n" in s else None)


_Dumper.add_representer(str, _str)


def dump_objects(objs: list[dict]) -> str:
    return "---\n".join(yaml.dump(o, Dumper=_Dumper, sort_keys=False, width=120) for o in objs)


# -- talking to a cluster ---------------------------------------------------------

def _short_reason(err: BaseException) -> str:
    reason = getattr(err, "reason", None)  # urllib3 MaxRetryError -> NewConnectionError etc.
    text = str(reason or err)
    for known in ("Connection refused", "Name or service not known", "timed out", "No route to host",
                  "certificate verify failed", "Unauthorized", "Forbidden"):
        if known.lower() in text.lower():
            return known.lower()
    return text.splitlines()[0][:160]


def connect(kubeconfig: str | None = None, context: str | None = None):
    """An ApiClient for the user's cluster, or TargetError in one line when there is none."""
    try:
        from kubernetes import client, config
    except ImportError:
        raise TargetError("the k8s target needs the kubernetes client: pip install 'flotilla[k8s]'") from None
    path = kubeconfig or os.environ.get("KUBECONFIG", "").split(os.pathsep)[0] or os.path.expanduser("~/.kube/config")
    try:
        if os.path.isfile(path):
            api = config.new_client_from_config(config_file=path, context=context)
        elif os.environ.get("KUBERNETES_SERVICE_HOST"):
            config.load_incluster_config()
            api = client.ApiClient()
        else:
            raise TargetError(f"no Kubernetes cluster configured: no kubeconfig at {path}; "
                              "set KUBECONFIG or pass --kubeconfig")
    except config.ConfigException as err:
        raise TargetError(f"kubeconfig {path}: {str(err).splitlines()[0]}") from None
    host = api.configuration.host
    try:
        client.VersionApi(api).get_code(_request_timeout=(5, 10))
    except Exception as err:  # noqa: BLE001 - urllib3, ssl and API errors all mean "not reachable"
        status = getattr(err, "status", None)
        why = f"HTTP {status}" if status else _short_reason(err)
        raise TargetError(f"no Kubernetes cluster reachable at {host} ({why}); check `kubectl cluster-info`") from None
    return api


class _PortForward:
    """127.0.0.1:<local> -> pod:<port> through the API server (like kubectl port-forward)."""

    def __init__(self, api, namespace: str, pod: str, port: int) -> None:
        self.configuration = api.configuration
        self.ns, self.pod, self.port = namespace, pod, port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.local_port = self.listener.getsockname()[1]
        self.closed = False
        threading.Thread(target=self._accept, daemon=True, name="k8s-port-forward").start()

    def _accept(self) -> None:
        while not self.closed:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._pipe, args=(conn,), daemon=True).start()

    def _pipe(self, conn: socket.socket) -> None:
        from kubernetes import client
        from kubernetes.stream import portforward

        try:
            # A client per connection: `portforward` patches its client's request method while it runs.
            core = client.CoreV1Api(client.ApiClient(self.configuration))
            pf = portforward(core.connect_get_namespaced_pod_portforward, self.pod, self.ns, ports=str(self.port))
            remote = pf.socket(self.port)
            remote.setblocking(True)
            socks = [conn, remote]
            while not self.closed:
                ready, _, _ = select.select(socks, [], [], 1.0)
                for s in ready:
                    data = s.recv(65536)
                    if not data:
                        return
                    (remote if s is conn else conn).sendall(data)
        except Exception:  # noqa: BLE001 - one broken connection must not end the forward
            return
        finally:
            conn.close()

    def close(self) -> None:
        self.closed = True
        self.listener.close()


_RECORDS_TAR = (
    "import base64,io,sys,tarfile;b=io.BytesIO();t=tarfile.open(fileobj=b,mode='w:gz');"
    f"t.add('{RECORDS_MOUNT}',arcname='.');t.close();sys.stdout.write(base64.b64encode(b.getvalue()).decode())"
)


class K8sTarget(Target):
    name = "k8s"

    def __init__(self, **options) -> None:
        self.opts = K8sOptions(**options)
        self._forward: _PortForward | None = None
        self._last_sync = 0.0
        self._clients: dict[tuple, object] = {}

    # -- render ---------------------------------------------------------------
    def render(self, plan: Plan, out_dir: Path) -> list[Path]:
        r = K8sRenderer(plan, self.opts)
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        paths = []
        for name, objs in r.files().items():
            p = out_dir / name
            p.write_text(dump_objects(objs))
            paths.append(p)
        if r.tls:
            paths.append(self._write_secret_script(r, self._bundle(plan, r), out_dir))
        return paths

    def _bundle(self, plan: Plan, r: K8sRenderer):
        from flotilla.security import bundle_for_plan

        return bundle_for_plan(plan, self.opts.cert_dir, namespace=r.ns)

    @staticmethod
    def _write_secret_script(r: K8sRenderer, bundle, out_dir: Path) -> Path:
        lines = ["#!/bin/sh", "# Secrets from the certificate bundle's files (`flotilla submit` does this itself).",
                 "set -e"]
        for name, files in r.secret_files(bundle).items():
            args = " ".join(f"--from-file={k}={Path(v).resolve()}" for k, v in files.items())
            lines.append(f"kubectl -n {r.ns} create secret generic {name} {args}")
        p = out_dir / "create-secrets.sh"
        p.write_text("\n".join(lines) + "\n")
        p.chmod(0o755)
        return p

    # -- cluster --------------------------------------------------------------
    def _api(self, run: RunRecord | None = None):
        st = run.state() if run else {}
        key = (st.get("k8s_kubeconfig", self.opts.kubeconfig), st.get("k8s_context", self.opts.context))
        if key not in self._clients:  # the driver polls often: connect (and check the cluster) once
            self._clients[key] = connect(*key)
        return self._clients[key]

    def up(self, plan: Plan, run: RunRecord) -> Federation:
        # the app's dependencies are in the image (checked when the image is in the local engine; never pulled)
        check_image_has_app(self.opts.image or _default_image(self.opts.registry), plan.app)
        from kubernetes import client
        from kubernetes.utils import FailToCreateError, create_from_dict

        r = K8sRenderer(plan, self.opts)
        api = self._api()
        core = client.CoreV1Api(api)
        files = r.files()
        render_dir = run.dir / "k8s"
        render_dir.mkdir(exist_ok=True)
        for name, objs in files.items():
            (render_dir / name).write_text(dump_objects(objs))
        try:
            core.read_namespace(r.ns)
            raise TargetError(f"namespace {r.ns} exists: a run of this job is active; "
                              f"stop it or delete the namespace (kubectl delete namespace {r.ns})")
        except client.ApiException as err:
            if err.status != 404:
                raise TargetError(f"cannot read namespace {r.ns}: HTTP {err.status} {err.reason}") from None
        run.write_state(k8s_namespace=r.ns, k8s_kubeconfig=self.opts.kubeconfig, k8s_context=self.opts.context,
                        image=r.image, tls=r.tls)
        bundle = self._bundle(plan, r) if r.tls else None

        def create(objs: list[dict]) -> None:
            for obj in objs:
                try:
                    create_from_dict(api, obj, namespace=r.ns)
                except FailToCreateError as err:
                    e = err.api_exceptions[0]
                    msg = json.loads(e.body).get("message", e.reason) if e.body else e.reason
                    raise TargetError(f"creating {obj['kind']} {obj['metadata']['name']}: {msg}") from None

        create(files.pop("00-namespace.yaml"))
        if bundle is not None:
            for name, keys in r.secret_files(bundle).items():
                core.create_namespaced_secret(r.ns, client.V1Secret(
                    metadata=client.V1ObjectMeta(name=name, labels=MANAGED_BY), type="Opaque",
                    data={k: base64.b64encode(Path(v).read_bytes()).decode() for k, v in keys.items()}))
        device_files = {k: v for k, v in files.items() if "-devices-" in k}
        for name, objs in files.items():
            if name not in device_files:
                create(objs)
        pod = self._wait_superlink(core, r.ns, timeout=300)
        self._forward = _PortForward(api, r.ns, pod, SUPERLINK_PORT)
        address = f"127.0.0.1:{self._forward.local_port}"
        if bundle is not None:
            from flotilla.security import CertError, register_nodes

            try:
                register_nodes(address, bundle, [d.name for d in plan.devices])
            except CertError as err:
                raise TargetError(str(err)) from None
        # Devices only after registration: an unregistered SuperNode is refused and would crash-loop.
        for objs in device_files.values():
            create(objs)
        return Federation(control_address=address, insecure=not r.tls,
                          root_certificates=str(bundle.ca_cert.resolve()) if bundle else None,
                          output_dir=RECORDS_MOUNT)

    @staticmethod
    def _wait_superlink(core, ns: str, timeout: float) -> str:
        end = time.time() + timeout
        why = "no pod yet"
        while time.time() < end:
            pods = core.list_namespaced_pod(ns, label_selector="app.kubernetes.io/component=superlink").items
            for p in pods:
                conds = {c.type: c.status for c in (p.status.conditions or [])}
                if conds.get("Ready") == "True":
                    return p.metadata.name
                for cs in p.status.container_statuses or []:
                    if cs.state.waiting and cs.state.waiting.reason:
                        why = cs.state.waiting.reason
                        if why in ("ErrImagePull", "ImagePullBackOff", "InvalidImageName"):
                            raise TargetError(f"SuperLink pod cannot get its image ({why}): {cs.image}; "
                                              "push it to a registry the nodes can pull from (--registry)")
                why = why if p.status.phase == "Pending" else p.status.phase
            time.sleep(1)
        raise TargetError(f"SuperLink in namespace {ns} not ready within {timeout:.0f} s ({why}); "
                          f"see kubectl -n {ns} describe pod -l app.kubernetes.io/component=superlink")

    def device_states(self, run: RunRecord) -> dict[str, str]:
        from kubernetes import client

        ns = run.state().get("k8s_namespace")
        names = run.state().get("devices") or [d["name"] for d in run.plan()["devices"]]
        states = {n: "starting" for n in names}
        if not ns:
            return states
        api = self._api(run)
        try:
            pods = client.CoreV1Api(api).list_namespaced_pod(
                ns, label_selector="app.kubernetes.io/component=device").items
        except client.ApiException as err:
            if err.status == 404:
                return {n: "stopped" for n in names}
            raise
        for p in pods:
            dev = pod_device_name(p.metadata.name)
            if dev in states:
                states[dev] = pod_state(p)
        if time.time() - self._last_sync > 3:
            self._sync_records(api, run)
        return states

    def _sync_records(self, api, run: RunRecord) -> None:
        """Copy the ServerApp's records (metrics.jsonl, weights.npz, ...) from the SuperLink pod."""
        from kubernetes import client
        from kubernetes.stream import stream

        self._last_sync = time.time()
        ns = run.state().get("k8s_namespace")
        core = client.CoreV1Api(api)
        try:
            pods = core.list_namespaced_pod(ns, label_selector="app.kubernetes.io/component=superlink").items
            if not pods:
                return
            out = stream(core.connect_get_namespaced_pod_exec, pods[0].metadata.name, ns,
                         command=["python", "-c", _RECORDS_TAR], stderr=False, stdin=False, stdout=True, tty=False)
            with tarfile.open(fileobj=io.BytesIO(base64.b64decode(out)), mode="r:gz") as tar:
                tar.extractall(run.dir, filter="data")
        except Exception:  # noqa: BLE001 - records are copied again on the next call
            return

    def down(self, run: RunRecord) -> None:
        from kubernetes import client

        if self._forward:
            self._forward.close()
            self._forward = None
        ns = run.state().get("k8s_namespace")
        if not ns:
            return
        try:
            api = self._api(run)
        except TargetError as err:
            run.write_state(k8s_down_error=str(err))
            raise
        core = client.CoreV1Api(api)
        self._sync_records(api, run)
        self._save_logs(core, run, ns)
        try:
            core.delete_namespace(ns, propagation_policy="Foreground")
        except client.ApiException as err:
            if err.status != 404:
                raise TargetError(f"deleting namespace {ns}: HTTP {err.status} {err.reason}") from None
        end = time.time() + 180
        while time.time() < end:
            try:
                core.read_namespace(ns)
            except client.ApiException as err:
                if err.status == 404:
                    break
            time.sleep(2)
        run.write_state(k8s_namespace_deleted=True)

    def _save_logs(self, core, run: RunRecord, ns: str) -> None:
        try:
            pods = core.list_namespaced_pod(ns, label_selector="app.kubernetes.io/managed-by=flotilla").items
        except Exception:  # noqa: BLE001
            return
        for p in pods:
            comp = (p.metadata.labels or {}).get("app.kubernetes.io/component")
            name = "superlink" if comp == "superlink" else pod_device_name(p.metadata.name)
            try:
                run.log_path(name).write_text(core.read_namespaced_pod_log(p.metadata.name, ns))
            except Exception:  # noqa: BLE001 - a pod that never started has no log
                pass

    def log_path(self, run: RunRecord, device: str | None) -> Path:
        from kubernetes import client

        ns = run.state().get("k8s_namespace")
        path = run.log_path(device or "superlink")
        if ns and not run.state().get("k8s_namespace_deleted"):
            try:
                api = self._api(run)
                core = client.CoreV1Api(api)
                if device is None:
                    sel = "app.kubernetes.io/component=superlink"
                    pods = core.list_namespaced_pod(ns, label_selector=sel).items
                    pod = pods[0].metadata.name if pods else None
                else:
                    pod = device_pod_name(device)
                if pod:
                    path.write_text(core.read_namespaced_pod_log(pod, ns))
            except Exception:  # noqa: BLE001 - fall back to what was saved last
                pass
        return path


def pod_device_name(pod: str) -> str:
    """StatefulSet pod `<class>-<ordinal>` -> device `<class>-<ordinal+1>`."""
    cls, _, ordinal = pod.rpartition("-")
    return f"{cls}-{int(ordinal) + 1}" if ordinal.isdigit() else pod


def device_pod_name(device: str) -> str:
    cls, _, i = device.rpartition("-")
    return f"{cls}-{int(i) - 1}"


def pod_state(pod) -> str:
    if pod.metadata.deletion_timestamp:
        return "stopped"
    for cs in pod.status.container_statuses or []:
        if cs.state.terminated or (cs.state.waiting and cs.state.waiting.reason == "CrashLoopBackOff"):
            return "exited"
        if cs.state.running:
            return "running"
    return {"Failed": "exited", "Succeeded": "exited"}.get(pod.status.phase, "starting")
