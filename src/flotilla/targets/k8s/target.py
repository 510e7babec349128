"""Act: the k8s target's lifecycle: create the namespace's objects (devices once their keys are registered),
follow the device pods, copy the records and logs out, delete the namespace."""

from __future__ import annotations

import time
from pathlib import Path

from flotilla.plan import Plan
from flotilla.runs import RunRecord
from flotilla.runtime.commands import SUPERLINK_PORT
from flotilla.targets.base import Federation, Target, TargetError
from flotilla.targets.containers import cert_bundle, check_image, register_supernodes, target_image, write_secret_script
from flotilla.targets.k8s.cluster import (
    DEVICE_PODS,
    PortForward,
    connect,
    core_api,
    create_objects,
    create_secrets,
    delete_namespace,
    namespace_exists,
    pod_state,
    superlink_pod,
    sync_records,
    wait_superlink,
)
from flotilla.targets.k8s.render import (
    RECORDS_MOUNT,
    K8sOptions,
    K8sRenderer,
    device_pod_name,
    dump_objects,
    pod_device_name,
)


class K8sTarget(Target):
    name = "k8s"
    capabilities = frozenset({"placement", "gpus", "tls"})

    def __init__(self, **options) -> None:
        self.opts = K8sOptions(**options)
        self._forward: PortForward | None = None
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
            paths.append(write_secret_script(out_dir, "Secrets from the certificate bundle's files "
                                             "(`flotilla submit` does this itself).",
                                             r.secret_commands(self._bundle(plan, r))))
        return paths

    def _bundle(self, plan: Plan, r: K8sRenderer):
        return cert_bundle(plan, self.opts.cert_dir, namespace=r.ns)

    # -- cluster --------------------------------------------------------------
    def _api(self, run: RunRecord | None = None):
        st = run.state() if run else {}
        key = (st.get("k8s_kubeconfig", self.opts.kubeconfig), st.get("k8s_context", self.opts.context))
        if key not in self._clients:  # the driver polls often: connect (and check the cluster) once
            self._clients[key] = connect(*key)
        return self._clients[key]

    def up(self, plan: Plan, run: RunRecord) -> Federation:
        # the app's dependencies are in the image (checked when the image is in the local engine; never pulled)
        check_image(target_image(self.opts.image, self.opts.registry), plan)
        r = K8sRenderer(plan, self.opts)
        api = self._api()
        core = core_api(api)
        files = r.files()
        render_dir = run.dir / "k8s"
        render_dir.mkdir(exist_ok=True)
        for name, objs in files.items():
            (render_dir / name).write_text(dump_objects(objs))
        if namespace_exists(core, r.ns):
            raise TargetError(f"namespace {r.ns} exists: a run of this job is active; "
                              f"stop it or delete the namespace (kubectl delete namespace {r.ns})")
        run.write_state(k8s_namespace=r.ns, k8s_kubeconfig=self.opts.kubeconfig, k8s_context=self.opts.context,
                        image=r.image, tls=r.tls)
        bundle = self._bundle(plan, r) if r.tls else None
        create_objects(api, r.ns, files.pop("00-namespace.yaml"))
        if bundle is not None:
            create_secrets(core, r.ns, r.secret_files(bundle))
        device_files = {k: v for k, v in files.items() if "-devices-" in k}
        for name, objs in files.items():
            if name not in device_files:
                create_objects(api, r.ns, objs)
        pod = wait_superlink(core, r.ns, timeout=300)
        self._forward = PortForward(api, r.ns, pod, SUPERLINK_PORT)
        address = f"127.0.0.1:{self._forward.local_port}"
        if bundle is not None:
            register_supernodes(address, bundle, plan)
        # Devices only after registration: an unregistered SuperNode is refused and would crash-loop.
        for objs in device_files.values():
            create_objects(api, r.ns, objs)
        return Federation(control_address=address, insecure=not r.tls,
                          root_certificates=str(bundle.ca_cert.resolve()) if bundle else None,
                          output_dir=RECORDS_MOUNT)

    # -- status ---------------------------------------------------------------
    def device_states(self, run: RunRecord) -> dict[str, str]:
        from kubernetes import client

        ns = run.state().get("k8s_namespace")
        names = run.state().get("devices") or [d["name"] for d in run.plan()["devices"]]
        states = {n: "starting" for n in names}
        if not ns:
            return states
        api = self._api(run)
        try:
            pods = core_api(api).list_namespaced_pod(ns, label_selector=DEVICE_PODS).items
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
        self._last_sync = time.time()
        sync_records(core_api(api), run.state().get("k8s_namespace"), run.dir)

    # -- down -----------------------------------------------------------------
    def down(self, run: RunRecord) -> None:
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
        core = core_api(api)
        self._sync_records(api, run)
        self._save_logs(core, run, ns)
        delete_namespace(core, ns, timeout=180)
        run.write_state(k8s_namespace_deleted=True)

    # -- logs -----------------------------------------------------------------
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
        ns = run.state().get("k8s_namespace")
        path = run.log_path(device or "superlink")
        if ns and not run.state().get("k8s_namespace_deleted"):
            try:
                core = core_api(self._api(run))
                pod = superlink_pod(core, ns) if device is None else device_pod_name(device)
                if pod:
                    path.write_text(core.read_namespaced_pod_log(pod, ns))
            except Exception:  # noqa: BLE001 - fall back to what was saved last
                pass
        return path
