"""Act: the swarm target's lifecycle: deploy the stack (SuperLink first, devices once their keys are
registered), follow its tasks, fetch service logs, remove stack, network and secrets."""

from __future__ import annotations

import json
import time
from pathlib import Path

from flotilla.plan import Plan
from flotilla.runs import RunRecord
from flotilla.targets.base import Federation, Target, TargetError
from flotilla.targets.containers import (
    cert_bundle,
    check_image,
    limits_applied,
    register_supernodes,
    target_image,
    write_secret_script,
)
from flotilla.targets.swarm.engine import (
    Docker,
    check_placement,
    cluster_nodes,
    current_task,
    port_open,
    task_state,
)
from flotilla.targets.swarm.render import LABEL, NETWORK, RUN_MOUNT, StackRenderer, SwarmOptions


class SwarmTarget(Target):
    name = "swarm"
    capabilities = frozenset({"placement", "tls"})

    def __init__(self, **options) -> None:
        self.opts = SwarmOptions(**options)

    def _bundle(self, plan: Plan):
        return None if self.opts.insecure else cert_bundle(plan, self.opts.cert_dir)

    # -- render -------------------------------------------------------------------------
    def render(self, plan: Plan, out_dir: Path) -> list[Path]:
        out_dir = Path(out_dir).resolve()
        out_dir.mkdir(parents=True, exist_ok=True)
        r = StackRenderer(plan, self.opts, self._bundle(plan), run_dir=str(out_dir / "run"))
        (out_dir / "run").mkdir(exist_ok=True)
        path = out_dir / "stack.yml"
        path.write_text(r.stack_file())
        paths = [path]
        if r.tls:
            paths.append(write_secret_script(
                out_dir, "Docker secrets from the certificate bundle's files "
                "(`flotilla submit --target swarm` does this itself).", r.secret_commands()))
        return paths

    # -- up -----------------------------------------------------------------------------
    def up(self, plan: Plan, run: RunRecord) -> Federation:
        # the app's dependencies are in the image (checked when the image is local; never pulled to look)
        check_image(target_image(self.opts.image, self.opts.registry), plan, docker_host=self.opts.docker_host)
        docker = Docker(self.opts.docker_host)
        sw = docker.require_manager()
        check_placement(plan, cluster_nodes(self.opts.docker_host))
        bundle = self._bundle(plan)
        # The SuperLink writes the records into run.dir: it must run on this engine's node.
        r = StackRenderer(plan, self.opts, bundle, run_dir=str(run.dir),
                          superlink_constraints=[f"node.id == {sw['NodeID']}"], run_id=run.run_id)
        stacks = [s["Name"] for s in docker.json_lines("stack", "ls")]
        if r.stack in stacks:
            raise TargetError(f"stack {r.stack} is already deployed: a run of this job is active; "
                              f"stop it (flotilla stop) or `docker stack rm {r.stack}`")
        out = run.dir / "swarm"
        out.mkdir(exist_ok=True)
        run.write_state(swarm_stack=r.stack, docker_host=self.opts.docker_host, image=r.image, tls=r.tls,
                        superlink_port=self.opts.port, swarm_network=f"{r.stack}_{NETWORK}")
        for name, file in r.secrets().values():
            if docker.run("secret", "inspect", name, check=False).returncode != 0:
                docker.run("secret", "create", "--label", f"{LABEL}.stack={r.stack}", name, str(file))
        deploy = ["stack", "deploy", "--with-registry-auth", "--prune",
                  "--resolve-image", "always" if self._image_in_registry(r.image) else "never"]
        # SuperLink first; devices once their keys are registered (an unregistered SuperNode is refused).
        first, full = out / "stack-superlink.yml", out / "stack.yml"
        first.write_text(r.stack_file(devices=False))
        full.write_text(r.stack_file())
        docker.run(*deploy, "-c", str(first), r.stack, timeout=300)
        address = f"{self.opts.control_host}:{self.opts.port}"
        self._wait_superlink(docker, r.stack, run, timeout=240)
        if bundle is not None:
            register_supernodes(address, bundle, plan)
        docker.run(*deploy, "-c", str(full), r.stack, timeout=300)
        limits_ok = limits_applied(plan, lambda name: docker.service_limits(f"{r.stack}_{name}"),
                                   "NanoCPUs", "MemoryBytes")
        run.write_state(limits_enforced=limits_ok, limits_note="swarm: NanoCPUs/MemoryBytes on each device service")
        return Federation(control_address=address, insecure=not r.tls,
                          root_certificates=str(bundle.ca_cert.resolve()) if bundle else None, output_dir=RUN_MOUNT)

    def _image_in_registry(self, image: str) -> bool:
        first = image.split("/")[0]
        return "/" in image and ("." in first or ":" in first or first == "localhost") or bool(self.opts.registry)

    def _wait_superlink(self, docker: Docker, stack: str, run: RunRecord, timeout: float) -> None:
        end = time.time() + timeout
        why = "no task yet"
        while time.time() < end:
            tasks = docker.stack_tasks(stack).get("superlink", [])
            cur = current_task(tasks)
            if cur is not None:
                why = f"{cur['CurrentState']}" + (f": {cur['Error']}" if cur.get("Error") else "")
                if cur["CurrentState"].lower().startswith("running") and port_open(self.opts.control_host,
                                                                                   self.opts.port):
                    return
                if "No such image" in cur.get("Error", "") or "pull access denied" in cur.get("Error", ""):
                    raise TargetError(f"the SuperLink task cannot get its image ({cur['Error']}); push the image to "
                                      "a registry the nodes can reach (--registry) or load it on each node")
            time.sleep(1)
        self.log_path(run, None)
        raise TargetError(f"the SuperLink of stack {stack} is not reachable at "
                          f"{self.opts.control_host}:{self.opts.port} after {timeout:.0f} s ({why}); "
                          f"see {run.log_path('superlink')}")

    # -- status -------------------------------------------------------------------------
    def device_states(self, run: RunRecord) -> dict[str, str]:
        st = run.state()
        names = st.get("devices") or [d["name"] for d in run.plan()["devices"]]
        stack = st.get("swarm_stack")
        if not stack or st.get("swarm_removed"):
            return {n: "stopped" for n in names}
        tasks = Docker(st.get("docker_host")).stack_tasks(stack)
        states = {n: task_state(tasks.get(n, [])) for n in names}
        # Where each device runs (the node's hostname), for `flotilla status` and the record.
        nodes = dict(st.get("device_nodes") or {})
        for n in names:
            cur = current_task(tasks.get(n, []))
            if states[n] == "running" and cur and cur.get("Node") and nodes.get(n) != cur["Node"]:
                nodes[n] = cur["Node"]
        if nodes != (st.get("device_nodes") or {}):
            run.write_state(device_nodes=nodes)
        return states

    def exit_code(self, run: RunRecord, device: str) -> int | None:
        st = run.state()
        docker = Docker(st.get("docker_host"))
        for t in docker.stack_tasks(st.get("swarm_stack", "")).get(device, []):
            res = docker.run("inspect", t["ID"], check=False)
            if res.returncode == 0:
                code = json.loads(res.stdout)[0].get("Status", {}).get("ContainerStatus", {}).get("ExitCode")
                if code is not None:
                    return int(code)
        return None

    # -- logs ---------------------------------------------------------------------------
    def log_path(self, run: RunRecord, device: str | None) -> Path:
        service = device or "superlink"
        path = run.log_path(service)
        st = run.state()
        if st.get("swarm_stack") and not st.get("swarm_removed"):
            res = Docker(st.get("docker_host")).run(
                "service", "logs", "--raw", "--no-task-ids", f"{st['swarm_stack']}_{service}", check=False)
            if res.returncode == 0:
                path.write_text(res.stdout + res.stderr)
        return path

    # -- down ---------------------------------------------------------------------------
    def down(self, run: RunRecord) -> None:
        st = run.state()
        stack = st.get("swarm_stack")
        if not stack or st.get("swarm_removed"):
            return
        docker = Docker(st.get("docker_host"))
        for name in ["superlink", *(st.get("devices") or [])]:
            self.log_path(run, name if name != "superlink" else None)
        docker.run("stack", "rm", stack, check=False)
        network = st.get("swarm_network", f"{stack}_{NETWORK}")
        end = time.time() + 120
        while time.time() < end:
            services = docker.run("service", "ls", "-q", "--filter", f"label=com.docker.stack.namespace={stack}",
                                  check=False).stdout.split()
            nets = docker.run("network", "ls", "-q", "--filter", f"name=^{network}$", check=False).stdout.split()
            if not services and not nets:
                break
            time.sleep(1)
        else:
            raise TargetError(f"stack {stack} was not fully removed within 120 s; check `docker stack ps {stack}`")
        # External secrets outlive `stack rm`; ours carry the stack label. In use until the tasks are gone.
        secrets = docker.run("secret", "ls", "-q", "--filter", f"label={LABEL}.stack={stack}", check=False).stdout
        end = time.time() + 60
        for sid in secrets.split():
            while docker.run("secret", "rm", sid, check=False).returncode != 0 and time.time() < end:
                time.sleep(1)
        run.write_state(swarm_removed=True)
