"""Describe: a Plan + K8sOptions as Kubernetes objects (manifests) and the script that makes their Secrets.
Pure: no cluster needed.

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

import json
import shlex
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from flotilla.images.build import image_app_dir
from flotilla.job import DeviceClass
from flotilla.plan import DevicePlan, Plan, format_node_config
from flotilla.runtime.commands import (
    DEVICE_PORT,
    FLOWER_ENV,
    METRICS_PORT,
    SUPERLINK_PORT,
    DeviceTls,
    ServerTls,
    device_command,
    remote_device_threads,
    superlink_command,
)
from flotilla.targets.base import TargetError
from flotilla.targets.containers import PlainDumper, superlink_env, target_image

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
    return int(cls.gpus or 0)


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

    def __init__(self, plan: Plan, opts: K8sOptions) -> None:
        self.plan, self.opts = plan, opts
        self.job = plan.job
        self.ns = opts.namespace or f"flotilla-{self.job.name}"
        self.image = target_image(opts.image, opts.registry)
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
            "env": _env(superlink_env(self.job, RECORDS_MOUNT, "")),
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

    def secret_commands(self, bundle) -> list[str]:
        """The shell lines of create-secrets.sh: `kubectl create secret` from the bundle's files."""
        lines = []
        for name, files in self.secret_files(bundle).items():
            args = " ".join(f"--from-file={k}={Path(v).resolve()}" for k, v in files.items())
            lines.append(f"kubectl -n {self.ns} create secret generic {name} {args}")
        return lines


class _Dumper(PlainDumper):
    """Multi-line strings (entrypoint scripts, job.yaml) as readable `|` blocks."""


def _str(dumper: yaml.SafeDumper, s: str):
    return dumper.represent_scalar("tag:yaml.org,2002:str", s, style="|" if "\n" in s else None)


_Dumper.add_representer(str, _str)


def dump_objects(objs: list[dict]) -> str:
    return "---\n".join(yaml.dump(o, Dumper=_Dumper, sort_keys=False, width=120) for o in objs)


def pod_device_name(pod: str) -> str:
    """StatefulSet pod `<class>-<ordinal>` -> device `<class>-<ordinal+1>`."""
    cls, _, ordinal = pod.rpartition("-")
    return f"{cls}-{int(ordinal) + 1}" if ordinal.isdigit() else pod


def device_pod_name(device: str) -> str:
    cls, _, i = device.rpartition("-")
    return f"{cls}-{int(i) - 1}"
