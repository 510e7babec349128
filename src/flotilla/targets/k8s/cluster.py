"""Talk: the user's Kubernetes cluster through the kubernetes client (imported only here, only when called).

Connecting (one-line errors when there is no cluster), creating objects and
Secrets, waiting for the SuperLink, a port-forward to it, pod states and logs,
copying the ServerApp's records out of the SuperLink pod, deleting the namespace.
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
from pathlib import Path

from flotilla.targets.base import TargetError
from flotilla.targets.k8s.render import MANAGED_BY, RECORDS_MOUNT

SUPERLINK_PODS = "app.kubernetes.io/component=superlink"
DEVICE_PODS = "app.kubernetes.io/component=device"
_PULL_ERRORS = ("ErrImagePull", "ImagePullBackOff", "InvalidImageName")


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


def core_api(api):
    from kubernetes import client

    return client.CoreV1Api(api)


# -- creating ---------------------------------------------------------------------------

def namespace_exists(core, ns: str) -> bool:
    from kubernetes import client

    try:
        core.read_namespace(ns)
        return True
    except client.ApiException as err:
        if err.status != 404:
            raise TargetError(f"cannot read namespace {ns}: HTTP {err.status} {err.reason}") from None
        return False


def create_objects(api, ns: str, objs: list[dict]) -> None:
    """Create each object (as rendered); TargetError naming the object and the API server's reason."""
    from kubernetes.utils import FailToCreateError, create_from_dict

    for obj in objs:
        try:
            create_from_dict(api, obj, namespace=ns)
        except FailToCreateError as err:
            e = err.api_exceptions[0]
            msg = json.loads(e.body).get("message", e.reason) if e.body else e.reason
            raise TargetError(f"creating {obj['kind']} {obj['metadata']['name']}: {msg}") from None


def create_secrets(core, ns: str, secret_files: dict[str, dict[str, Path]]) -> None:
    """Secret name -> {key: file}: each an Opaque Secret holding the files' contents."""
    from kubernetes import client

    for name, keys in secret_files.items():
        core.create_namespaced_secret(ns, client.V1Secret(
            metadata=client.V1ObjectMeta(name=name, labels=MANAGED_BY), type="Opaque",
            data={k: base64.b64encode(Path(v).read_bytes()).decode() for k, v in keys.items()}))


def wait_superlink(core, ns: str, timeout: float) -> str:
    """The name of the SuperLink pod once it is Ready; TargetError when its image cannot be pulled or time is up."""
    end = time.time() + timeout
    why = "no pod yet"
    while time.time() < end:
        pods = core.list_namespaced_pod(ns, label_selector=SUPERLINK_PODS).items
        for p in pods:
            conds = {c.type: c.status for c in (p.status.conditions or [])}
            if conds.get("Ready") == "True":
                return p.metadata.name
            for cs in p.status.container_statuses or []:
                if cs.state.waiting and cs.state.waiting.reason:
                    why = cs.state.waiting.reason
                    if why in _PULL_ERRORS:
                        raise TargetError(f"SuperLink pod cannot get its image ({why}): {cs.image}; "
                                          "push it to a registry the nodes can pull from (--registry)")
            why = why if p.status.phase == "Pending" else p.status.phase
        time.sleep(1)
    raise TargetError(f"SuperLink in namespace {ns} not ready within {timeout:.0f} s ({why}); "
                      f"see kubectl -n {ns} describe pod -l {SUPERLINK_PODS}")


# -- following --------------------------------------------------------------------------

def pod_state(pod) -> str:
    if pod.metadata.deletion_timestamp:
        return "stopped"
    for cs in pod.status.container_statuses or []:
        if cs.state.terminated or (cs.state.waiting and cs.state.waiting.reason == "CrashLoopBackOff"):
            return "exited"
        if cs.state.running:
            return "running"
    return {"Failed": "exited", "Succeeded": "exited"}.get(pod.status.phase, "starting")


def superlink_pod(core, ns: str) -> str | None:
    pods = core.list_namespaced_pod(ns, label_selector=SUPERLINK_PODS).items
    return pods[0].metadata.name if pods else None


_RECORDS_TAR = (
    "import base64,io,sys,tarfile;b=io.BytesIO();t=tarfile.open(fileobj=b,mode='w:gz');"
    f"t.add('{RECORDS_MOUNT}',arcname='.');t.close();sys.stdout.write(base64.b64encode(b.getvalue()).decode())"
)


def sync_records(core, ns: str, dest: Path) -> None:
    """Copy the ServerApp's records (metrics.jsonl, weights.npz, ...) from the SuperLink pod into `dest`.
    Best effort: nothing is raised (the records are copied again on the next call)."""
    from kubernetes.stream import stream

    try:
        pod = superlink_pod(core, ns)
        if not pod:
            return
        out = stream(core.connect_get_namespaced_pod_exec, pod, ns,
                     command=["python", "-c", _RECORDS_TAR], stderr=False, stdin=False, stdout=True, tty=False)
        with tarfile.open(fileobj=io.BytesIO(base64.b64decode(out)), mode="r:gz") as tar:
            tar.extractall(dest, filter="data")
    except Exception:  # noqa: BLE001 - records are copied again on the next call
        return


def delete_namespace(core, ns: str, timeout: float = 180) -> None:
    """Delete the namespace (and so everything in it) and wait until it is gone (at most `timeout` s)."""
    from kubernetes import client

    try:
        core.delete_namespace(ns, propagation_policy="Foreground")
    except client.ApiException as err:
        if err.status != 404:
            raise TargetError(f"deleting namespace {ns}: HTTP {err.status} {err.reason}") from None
    end = time.time() + timeout
    while time.time() < end:
        try:
            core.read_namespace(ns)
        except client.ApiException as err:
            if err.status == 404:
                break
        time.sleep(2)


class PortForward:
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
