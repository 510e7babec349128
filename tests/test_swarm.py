"""Docker Swarm target and the security it runs with.

- Certificates: a CA, the SuperLink certificate with the job's SANs, SuperNode
  keys in the format flwr 1.41 loads; private keys 0600.
- TLS: a real SuperLink with TLS + SuperNode authentication (loopback
  processes) accepts a registered SuperNode and refuses the others.
- Stack files: valid for `docker stack config`, with what the job asks for,
  and no key material.
- Placement: a job no node can take is refused before anything is deployed.
- The real thing (marker `docker`): a swarm of the host engine and two worker
  engines in their own network namespaces; two devices pinned by hostname
  complete a federated run over the overlay network, with TLS; all torn down.
"""

from __future__ import annotations

import ipaddress
import os
import shutil
import socket
import ssl
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from flotilla.images import default_image
from flotilla.job import load_job
from flotilla.plan import format_node_config, make_plan
from flotilla.security import CertError, default_sans, load_bundle, make_certs, private_key_markers, register_nodes
from flotilla.targets.base import TargetError
from flotilla.targets.swarm.cli import nodes_table
from flotilla.targets.swarm.engine import check_placement, task_state
from flotilla.targets.swarm.target import SwarmTarget

VENV_BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_job(tmp_path: Path, doc: dict) -> Path:
    p = tmp_path / f"{doc['name']}.yaml"
    p.write_text(yaml.safe_dump(doc))
    return p


# -- certificates ------------------------------------------------------------------------


def test_bundle_files_permissions_and_formats(tmp_path):
    sans = default_sans("edge", extra=["manager.lab", "10.1.2.3"])
    b = make_certs(tmp_path / "b", sans, ["pi-1", "pi-2"])
    for p in b.private_files():
        assert stat.S_IMODE(p.stat().st_mode) == 0o600, p
    assert stat.S_IMODE(b.dir.stat().st_mode) == 0o700
    ca = x509.load_pem_x509_certificate(b.ca_cert.read_bytes())
    srv = x509.load_pem_x509_certificate(b.server_cert.read_bytes())
    srv.verify_directly_issued_by(ca)  # raises if the CA did not sign it
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    san = srv.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert {"superlink", "localhost", "edge_superlink", "superlink.flotilla-edge.svc", "manager.lab"} <= set(
        san.get_values_for_type(x509.DNSName))
    assert {ipaddress.ip_address("127.0.0.1"), ipaddress.ip_address("10.1.2.3")} <= set(
        san.get_values_for_type(x509.IPAddress))
    # SuperNode keys: what flower-supernode --auth-supernode-private-key and `flwr supernode register` load
    key = serialization.load_ssh_private_key(b.node("pi-1").private_key.read_bytes(), None)
    pub = serialization.load_ssh_public_key(b.node("pi-1").public_key.read_bytes())
    assert isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp384r1"
    assert pub.public_numbers() == key.public_key().public_numbers()
    assert load_bundle(b.dir).nodes.keys() == {"pi-1", "pi-2"}


def test_bundle_is_kept_and_completed_not_replaced(tmp_path):
    b1 = make_certs(tmp_path / "b", ["superlink", "127.0.0.1"], ["a-1"])
    ca1, key1 = b1.ca_cert.read_bytes(), b1.node("a-1").private_key.read_bytes()
    srv1 = b1.server_cert.read_bytes()
    b2 = make_certs(tmp_path / "b", ["superlink", "127.0.0.1"], ["a-1", "a-2"])  # a device was added
    assert b2.ca_cert.read_bytes() == ca1 and b2.node("a-1").private_key.read_bytes() == key1
    assert b2.server_cert.read_bytes() == srv1 and b2.node("a-2").private_key.is_file()
    b3 = make_certs(tmp_path / "b", ["superlink", "127.0.0.1", "new.name"], ["a-1"])  # SANs changed
    assert b3.ca_cert.read_bytes() == ca1 and b3.server_cert.read_bytes() != srv1
    b4 = make_certs(tmp_path / "b", ["superlink"], ["a-1"], force=True)
    assert b4.ca_cert.read_bytes() != ca1 and b4.node("a-1").private_key.read_bytes() != key1


def test_targets_keep_the_sans_a_user_added(tmp_path, fleet):
    from flotilla.security import bundle_for_plan

    make_certs(tmp_path / "c", default_sans("fleet", extra=["manager.lab"]), ["pi-1"])
    b = bundle_for_plan(fleet, tmp_path / "c")  # what swarm/k8s call before deploying
    assert "manager.lab" in b.sans and set(b.nodes) == {"pi-1", "pi-2", "server-1"}
    srv = x509.load_pem_x509_certificate(b.server_cert.read_bytes())
    san = srv.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "manager.lab" in san.get_values_for_type(x509.DNSName)


def test_bad_certificate_input_is_one_line(tmp_path):
    with pytest.raises(CertError, match="SAN 'not a name'"):
        make_certs(tmp_path / "b", ["not a name"], [])
    with pytest.raises(CertError, match="no certificate bundle here"):
        load_bundle(tmp_path / "nothing")


def test_certs_command_writes_the_bundle(tmp_path):
    typer_testing = pytest.importorskip("typer.testing")
    import typer

    from flotilla.security import certs_command

    app = typer.Typer()
    app.command()(certs_command)
    app.command("noop")(lambda: None)  # two commands: typer keeps `certs_command` a sub-command
    job = write_job(tmp_path, {"name": "lab", "devices": [{"name": "pi", "count": 2}]})
    res = typer_testing.CliRunner().invoke(app, ["certs-command", str(job), "-o", str(tmp_path / "c"),
                                                 "--san", "manager.lab"])
    assert res.exit_code == 0, res.output
    b = load_bundle(tmp_path / "c")
    assert set(b.nodes) == {"pi-1", "pi-2"} and "manager.lab" in b.sans
    res = typer_testing.CliRunner().invoke(app, ["certs-command", str(tmp_path / "missing.yaml")])
    assert res.exit_code == 2 and "job file not found" in res.output


# -- TLS + SuperNode authentication, real processes on loopback ----------------------------------


def _flower_env(home: Path) -> dict:
    return dict(os.environ, PATH=f"{VENV_BIN}{os.pathsep}{os.environ['PATH']}", FLWR_HOME=str(home),
                FLWR_TELEMETRY_ENABLED="0", FLWR_DISABLE_UPDATE_CHECK="1")


def _spawn(cmd: list[str], log: Path, env: dict) -> subprocess.Popen:
    with open(log, "wb") as fh:
        return subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                start_new_session=True)


def _end(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        if p.poll() is None:
            os.killpg(p.pid, 15)
    for p in procs:
        try:
            p.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, 9)
            p.wait()
    time.sleep(0.5)
    for p in procs:  # flower-superexec children share the group and may outlive their parent
        try:
            os.killpg(p.pid, 9)
        except ProcessLookupError:
            pass


def _wait_log(path: Path, text: str, proc: subprocess.Popen, timeout: float) -> bool:
    end = time.time() + timeout
    while time.time() < end:
        if text in path.read_text(errors="replace"):
            return True
        if proc.poll() is not None:
            return text in path.read_text(errors="replace")
        time.sleep(0.2)
    return False


@pytest.mark.e2e
def test_tls_superlink_refuses_unregistered_supernodes(tmp_path):
    b = make_certs(tmp_path / "certs", ["superlink", "localhost", "127.0.0.1"], ["pi-1", "pi-2"])
    env = _flower_env(tmp_path / "flwr")
    port = free_port()
    procs: list[subprocess.Popen] = []
    try:
        sl_log = tmp_path / "superlink.log"
        sl = _spawn(["flower-superlink", *b.superlink_args(), "--disable-runtime-dependency-installation",
                     "--database", str(tmp_path / "state.db"), "--host", "127.0.0.1", "--port", str(port)],
                    sl_log, env)
        procs.append(sl)
        assert _wait_log(sl_log, "Uvicorn running on https://", sl, 60), sl_log.read_text()[-2000:]

        # The server speaks TLS with a certificate valid for the names in the bundle.
        ctx = ssl.create_default_context(cafile=str(b.ca_cert))
        for name in ("localhost", "127.0.0.1"):
            with socket.create_connection(("127.0.0.1", port), 5) as raw, \
                    ctx.wrap_socket(raw, server_hostname=name) as tls:
                assert tls.version().startswith("TLS")

        ids = register_nodes(f"127.0.0.1:{port}", b, ["pi-1"])
        assert ids["pi-1"] > 0
        assert register_nodes(f"127.0.0.1:{port}", b, ["pi-1"]) == {"pi-1": 0}  # again: already known, no error

        def supernode(name: str, *auth: str) -> tuple[subprocess.Popen, Path]:
            log = tmp_path / f"{name}.log"
            p = _spawn(["flower-supernode", "--superlink", f"127.0.0.1:{port}", "--port", str(free_port()),
                        "--node-config", format_node_config({"device": name}), *auth], log, env)
            procs.append(p)
            return p, log

        ok, ok_log = supernode("pi-1", "--root-certificates", str(b.ca_cert),
                               "--auth-supernode-private-key", str(b.node("pi-1").private_key))
        intruder, intruder_log = supernode("pi-2", "--root-certificates", str(b.ca_cert),
                                           "--auth-supernode-private-key", str(b.node("pi-2").private_key))
        keyless, keyless_log = supernode("keyless", "--root-certificates", str(b.ca_cert))

        assert _wait_log(ok_log, f"SuperNode ID: {ids['pi-1']}", ok, 30), ok_log.read_text()[-2000:]
        for proc, log, why in ((intruder, intruder_log, "Failed to activate SuperNode"),
                               (keyless, keyless_log, "All SuperNodes must be registered")):
            proc.wait(60)
            assert proc.returncode != 0, log.read_text()[-1500:]
            assert why in log.read_text(), log.read_text()[-1500:]
        assert ok.poll() is None  # the registered one is still connected
    finally:
        _end(procs)


# -- stack files ------------------------------------------------------------------------------


@pytest.fixture
def fleet(tmp_path):
    data = tmp_path / "mnist-idx"
    data.mkdir()
    doc = {"name": "fleet", "rounds": 2, "data": {"dataset": "mnist", "path": str(data)}, "devices": [
        {"name": "pi", "count": 2, "cpus": 0.5, "memory": "512m",
         "placement": {"arch": "arm64", "labels": {"zone": "edge"}}},
        {"name": "server", "count": 1, "cpus": 2, "memory": "2g", "placement": {"hostname": "manager-node"}},
    ]}
    return make_plan(load_job(write_job(tmp_path, doc), check_paths=False))  # renders only: the data is not read


def render_stack(tmp_path: Path, plan, **opts) -> tuple[dict, list[Path]]:
    out = tmp_path / f"stack-{len(list(tmp_path.glob('stack-*')))}"
    paths = SwarmTarget(cert_dir=tmp_path / "certs", **opts).render(plan, out)
    return yaml.safe_load((out / "stack.yml").read_text()), paths


def docker_stack_config(path: Path) -> subprocess.CompletedProcess | None:
    if shutil.which("docker") is None:
        return None
    res = subprocess.run(["docker", "stack", "config", "-c", str(path)], capture_output=True, text=True)
    if "is not a docker command" in res.stderr or "unknown command" in res.stderr:
        return None
    return res


@pytest.mark.parametrize("opts", [
    {},
    {"insecure": True, "endpoint_mode": "vip", "publish_mode": "ingress", "subnet": "10.213.0.0/24"},
    {"nfs": "nas.lab:/export/mnist", "registry": "registry.lab:5000/fl", "port": 18000, "reserve": True},
], ids=["tls-dnsrr-host", "insecure-vip-ingress", "nfs-registry"])
def test_stack_file_is_valid_compose_for_docker_stack(tmp_path, fleet, opts):
    doc, paths = render_stack(tmp_path, fleet, **opts)
    res = docker_stack_config(paths[0])
    if res is None:
        pytest.skip("docker CLI without `stack config`")
    assert res.returncode == 0, res.stderr
    resolved = yaml.safe_load(res.stdout)
    assert set(resolved["services"]) == {"superlink", "pi-1", "pi-2", "server-1"}
    # a typo is caught: the check is not a rubber stamp
    bad = paths[0].with_name("bad.yml")
    bad.write_text(paths[0].read_text().replace("endpoint_mode:", "endpoint_mod:"))
    assert docker_stack_config(bad).returncode != 0


def test_stack_follows_the_job(tmp_path, fleet):
    doc, _ = render_stack(tmp_path, fleet, subnet="10.213.0.0/24", registry="registry.lab:5000/fl")
    svcs = doc["services"]
    net = doc["networks"]["flotilla"]
    assert net["driver"] == "overlay" and net["attachable"] is True
    assert net["ipam"]["config"] == [{"subnet": "10.213.0.0/24"}]
    assert svcs["pi-1"]["deploy"]["placement"]["constraints"] == [
        "node.labels.zone == edge", "node.platform.arch == aarch64"]  # arm64 as the engine reports it
    assert svcs["server-1"]["deploy"]["placement"]["constraints"] == ["node.hostname == manager-node"]
    assert svcs["superlink"]["deploy"]["placement"]["constraints"] == ["node.role == manager"]
    for name, d in (("pi-1", fleet.device("pi-1")), ("server-1", fleet.device("server-1"))):
        s = svcs[name]
        assert s["image"] == default_image("registry.lab:5000/fl")  # registry/flotilla:<version>
        assert float(s["deploy"]["resources"]["limits"]["cpus"]) == d.cpus
        assert s["deploy"]["resources"]["limits"]["memory"] in ("512M", "2G")
        assert s["deploy"]["restart_policy"]["condition"] == "on-failure"
        assert s["deploy"]["endpoint_mode"] == "dnsrr"
        cmd = s["command"]
        assert cmd[:3] == ["python", "-m", "flotilla.runtime.device"]
        assert cmd[cmd.index("--node-config") + 1] == format_node_config(d.node_config())
        assert cmd[cmd.index("--superlink") + 1] == "superlink:8000"
        assert s["volumes"][0] == {"type": "bind", "source": str(fleet.job.data.path),
                                   "target": str(fleet.job.data.path), "read_only": True}
    assert svcs["superlink"]["ports"] == [{"target": 8000, "published": 8000, "protocol": "tcp", "mode": "host"}]


def test_nfs_volume_for_shared_data(tmp_path, fleet):
    doc, _ = render_stack(tmp_path, fleet, nfs="nas.lab:/export/mnist", nfs_options="ro,nfsvers=4.1")
    assert doc["volumes"]["data"] == {"driver": "local", "driver_opts": {
        "type": "nfs", "o": "addr=nas.lab,ro,nfsvers=4.1", "device": ":/export/mnist"}}
    for name in ("superlink", "pi-1", "server-1"):
        mount = [v for v in doc["services"][name]["volumes"] if v["target"] == str(fleet.job.data.path)]
        assert mount == [{"type": "volume", "source": "data", "target": str(fleet.job.data.path), "read_only": True}]


def test_secrets_are_external_and_no_key_material_is_rendered(tmp_path, fleet):
    doc, paths = render_stack(tmp_path, fleet)
    b = load_bundle(tmp_path / "certs")
    for p in paths:
        for marker in private_key_markers(b):
            assert marker not in p.read_bytes(), f"{p.name} holds private key material"
    assert all(s["external"] is True and set(s) == {"external", "name"} for s in doc["secrets"].values())
    pi = doc["services"]["pi-1"]
    targets = {s["source"]: s["target"] for s in pi["secrets"]}
    assert targets == {"ca-crt": "ca.crt", "pi-1-key": "supernode.key"}  # flwr derives the public key
    assert all(s["mode"] == 0o400 for s in pi["secrets"])
    assert "pi-2-key" not in targets  # a device gets its own key only
    sl = doc["services"]["superlink"]["command"]
    assert "--enable-supernode-auth" in sl and sl[sl.index("--ssl-keyfile") + 1] == "/run/secrets/superlink.key"
    script = next(p for p in paths if p.name == "create-secrets.sh").read_text()
    assert str(b.node("pi-2").private_key.resolve()) in script  # secrets are made from files, by path


def test_insecure_stack_has_no_secrets(tmp_path, fleet):
    doc, paths = render_stack(tmp_path, fleet, insecure=True)
    assert "secrets" not in doc and len(paths) == 1
    assert "--insecure" in doc["services"]["pi-2"]["command"]
    assert "--insecure" in doc["services"]["superlink"]["command"]


@pytest.mark.parametrize("opts,match", [
    ({"endpoint_mode": "dnsrr", "publish_mode": "ingress"}, "dnsrr cannot publish in ingress mode"),
    ({"endpoint_mode": "rr"}, "endpoint_mode 'rr'"),
    ({"nfs": "nas.lab"}, "SERVER:/export/path"),
    ({"stack": "x" * 60}, "exceed 63 characters"),
])
def test_bad_swarm_options_are_one_line_errors(tmp_path, fleet, opts, match):
    with pytest.raises(TargetError, match=match):
        render_stack(tmp_path, fleet, insecure=True, **opts)


# -- placement -----------------------------------------------------------------------------------

NODES = [
    {"hostname": "manager-node", "arch": "x86_64", "cpus": 4.0, "memory": 8 * 1024**3, "labels": {},
     "role": "manager", "state": "ready", "availability": "active", "leader": True},
    {"hostname": "pi-a", "arch": "aarch64", "cpus": 4.0, "memory": 4 * 1024**3, "labels": {"zone": "edge"},
     "role": "worker", "state": "ready", "availability": "active", "leader": False},
    {"hostname": "pi-b", "arch": "aarch64", "cpus": 4.0, "memory": 4 * 1024**3, "labels": {"zone": "lab"},
     "role": "worker", "state": "down", "availability": "active", "leader": False},
]


def test_placement_accepts_a_job_the_swarm_can_run(fleet):
    assert check_placement(fleet, NODES) == {"pi": ["pi-a"], "server": ["manager-node"]}
    rows = nodes_table(NODES)
    assert rows[0][:2] == ["manager-node", "manager*"] and rows[1][-1] == "zone=edge"


@pytest.mark.parametrize("placement,cpus,match", [
    ({"hostname": "worker-node-9"}, None, r"devices\[0\] \(pi\): placement node.hostname == worker-node-9 "
                                          r"matches no ready node"),
    ({"labels": {"zone": "lab"}}, None, "label a node: docker node update --label-add"),  # pi-b is down
    ({"arch": "armv7l"}, None, "node.platform.arch == armv7l matches no ready node"),
    ({"labels": {"zone": "edge"}}, 6, r"cpus 6 exceeds every matching node \(at most 4\)"),
])
def test_placement_refuses_what_no_node_can_take(tmp_path, placement, cpus, match):
    doc = {"name": "bad", "devices": [{"name": "pi", "count": 2, "placement": placement,
                                       **({"cpus": cpus} if cpus else {})}]}
    plan = make_plan(load_job(write_job(tmp_path, doc)))
    with pytest.raises(TargetError, match=match) as err:
        check_placement(plan, NODES)
    assert "\n" not in str(err.value)


def test_task_states_map_to_device_states():
    t = lambda desired, current: {"DesiredState": desired, "CurrentState": current}  # noqa: E731
    assert task_state([]) == "starting"
    assert task_state([t("Running", "Running 3 seconds ago")]) == "running"
    assert task_state([t("Running", "Preparing 1 second ago")]) == "starting"
    assert task_state([t("Ready", "Ready 1 second ago"), t("Shutdown", "Failed 5 seconds ago")]) == "starting"
    assert task_state([t("Shutdown", "Failed 5 seconds ago")]) == "exited"
    assert task_state([t("Shutdown", "Shutdown 2 seconds ago")]) == "stopped"


# -- the real swarm -------------------------------------------------------------------------------


def _image() -> str:
    from flotilla.images import default_image

    return os.environ.get("FLOTILLA_IMAGE") or default_image()


@pytest.fixture(scope="module")
def swarm_image():
    """The flotilla image under a tag of our own: every node gets the very same image even if
    `flotilla:<version>` is rebuilt meanwhile."""
    image = _image()
    if shutil.which("docker") is None or subprocess.run(["docker", "image", "inspect", image],
                                                        capture_output=True).returncode != 0:
        pytest.skip(f"no Docker engine with image {image} (build it with `flotilla images build`)")
    snapshot = f"flotilla-swarm-test:{os.getpid()}"
    subprocess.run(["docker", "tag", image, snapshot], check=True)
    yield snapshot
    subprocess.run(["docker", "rmi", snapshot], capture_output=True)  # only the tag: the image stays


@pytest.fixture(scope="module")
def swarm(swarm_image):
    from swarm_cluster import Unavailable, swarm_cluster

    try:
        cm = swarm_cluster(2, images=[swarm_image], log=lambda m: print(f"swarm: {m}", flush=True))
        cluster = cm.__enter__()
    except Unavailable as why:
        pytest.skip(f"cannot build a local swarm here: {why}")
    yield cluster
    cm.__exit__(None, None, None)


@pytest.mark.docker
def test_cluster_nodes_lists_every_engine(swarm):
    from flotilla.targets.swarm.engine import cluster_nodes

    nodes = cluster_nodes()
    assert sorted(n["hostname"] for n in nodes) == sorted(swarm.hostnames)
    for n in nodes:
        assert n["state"] == "ready" and n["arch"] == os.uname().machine and n["cpus"] >= 1 and n["memory"] > 0
    assert [n["role"] for n in nodes].count("manager") == 1

    import typer
    from typer.testing import CliRunner

    from flotilla.targets.swarm.cli import cluster_nodes_command

    app = typer.Typer()
    app.command("nodes")(cluster_nodes_command)
    app.command("other")(lambda: None)
    out = CliRunner().invoke(app, ["nodes"]).output.splitlines()
    assert out[0].split()[:3] == ["HOSTNAME", "ROLE", "STATE"]
    assert sorted(line.split()[0] for line in out[1:]) == sorted(swarm.hostnames)


@pytest.mark.docker
def test_job_no_node_can_take_is_refused_before_deploying(swarm, tmp_path):
    from flotilla.driver import create_run

    job = load_job(write_job(tmp_path, {"name": "nowhere", "runs_dir": str(tmp_path / "runs"), "devices": [
        {"name": "pi", "count": 2, "placement": {"hostname": "worker-node-9"}}]}))
    run = create_run(job, "swarm")
    with pytest.raises(TargetError, match="worker-node-9 matches no ready node"):
        SwarmTarget(insecure=True).up(make_plan(job), run)
    stacks = subprocess.run(["docker", "stack", "ls", "--format", "{{.Name}}"], capture_output=True, text=True)
    assert "nowhere" not in stacks.stdout.split()


@pytest.mark.docker
def test_federated_run_across_swarm_nodes_with_tls(swarm, swarm_image, tmp_path):
    from flotilla.driver import Driver, create_run

    hosts = [w.hostname for w in swarm.workers]
    job = load_job(write_job(tmp_path, {
        "name": "swarmfl", "rounds": 2, "runs_dir": str(tmp_path / "runs"),
        "strategy": {"min_devices": 2},
        "devices": [
            {"name": "east", "count": 1, "cpus": 1, "memory": "1536m", "placement": {"hostname": hosts[0]}},
            {"name": "west", "count": 1, "cpus": 1, "memory": "1536m", "placement": {"hostname": hosts[1]}},
        ]}))
    run = create_run(job, "swarm")
    target = SwarmTarget(image=swarm_image, cert_dir=tmp_path / "certs", subnet="10.214.7.0/24", port=free_port())
    t0 = time.time()
    summary = Driver(job, run, target).execute()
    wall = time.time() - t0
    print(f"swarm run: {summary['status']} in {wall:.0f} s, rounds "
          f"{[(r['round'], r['accuracy'], r['wall_s']) for r in summary['rounds']]}")
    assert summary["status"] == "completed", (summary["error"], run.log_path("superlink").read_text()[-3000:])
    assert [r["round"] for r in summary["rounds"]] == [1, 2]
    assert summary["final_accuracy"] > 0.5
    for r in run.rounds()[1:]:
        assert {d["name"] for d in r["devices"] if d["status"] == "ok"} == {"east-1", "west-1"}, r
    assert run.state()["device_nodes"] == {"east-1": hosts[0], "west-1": hosts[1]}  # each on its pinned node
    assert run.state().get("limits_enforced") is True
    # TLS end to end: the SuperLink served https and activated the two registered keys; logs saved from
    # `docker service logs` before the stack went away.
    assert "Uvicorn running on https://" in run.log_path("superlink").read_text()
    for dev in ("east-1", "west-1"):
        assert "SuperNode ID: " in run.log_path(dev).read_text()
    # torn down: no stack, no network, no secrets left behind
    assert "swarmfl" not in subprocess.run(["docker", "stack", "ls"], capture_output=True, text=True).stdout
    nets = subprocess.run(["docker", "network", "ls", "--format", "{{.Name}}"], capture_output=True, text=True)
    assert "swarmfl_flotilla" not in nets.stdout.split()
    secrets = subprocess.run(["docker", "secret", "ls", "-q", "--filter", "label=io.flotilla.stack=swarmfl"],
                             capture_output=True, text=True)
    assert secrets.stdout.strip() == ""
