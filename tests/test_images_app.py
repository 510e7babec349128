"""`flotilla images build --app PATH`: a user's Flower App (its dependencies and source) in the image,
and the pre-run check that the image has what the app needs.

The requirement evaluation is tested without Docker. The `docker` tests build
real images (offline, from a wheelhouse) on the real engine; they skip when the
engine, the base image or a wheelhouse is missing (and fail instead where CI
promises Docker, FLOTILLA_REQUIRE_DOCKER=1). They use their own tags and remove
them: the flotilla:<version> image the other container tests run is never touched.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest

import flotilla
from flotilla.appspec import AppSpec, builtin_app
from flotilla.images.appdeps import (
    _INVENTORY_CACHE,
    LABEL_APPS,
    LABEL_DISTS,
    app_check_message,
    app_requirements,
    check_image_has_app,
    inventory_from_labels,
    inventory_labels,
    unmet_requirements,
)
from flotilla.images.build import (
    ImageError,
    build_image,
    dependency_closure,
    image_app_dir,
    make_wheelhouse,
    wheel_requirements,
)
from flotilla.targets.base import TargetError

ROOT = Path(__file__).resolve().parents[1]
SKLEARN_APP = ROOT / "tests" / "apps" / "sklearn_ints"
TEST_TAG = f"flotilla-test-app:{flotilla.__version__}"
TAB_TAG = f"flotilla-test-app-tab:{flotilla.__version__}"
IMAGE_ENV = {"python_version": "3.11", "python_full_version": "3.11.2", "platform_machine": "x86_64",
             "sys_platform": "linux", "platform_system": "Linux", "os_name": "posix",
             "implementation_name": "cpython"}
DISTS = {"flwr": "1.42.0", "numpy": "2.4.6", "scikit_learn": "1.7.2", "torch": "2.13.0+cpu", "tomli": "2.3.0rc1"}


def fake_app(root: Path, deps: list[str], name: str = "tab-app") -> Path:
    """A minimal Flower App directory declaring `deps`."""
    (root / "tabapp").mkdir(parents=True, exist_ok=True)
    (root / "tabapp" / "__init__.py").write_text("")
    # a real app whose ClientApp needs a package this venv lacks (the image has it: devices import it there)
    (root / "tabapp" / "client_app.py").write_text("import tabulate\nfrom flwr.clientapp import ClientApp\n\n"
                                                   "TABLE = tabulate.tabulate([[1, 2]])\napp = ClientApp()\n")
    (root / "tabapp" / "server_app.py").write_text("from flwr.serverapp import ServerApp\n\napp = ServerApp()\n")
    deps_toml = ", ".join(json.dumps(d) for d in deps)
    (root / "pyproject.toml").write_text(f"""[project]
name = "{name}"
version = "1.0.0"
dependencies = [{deps_toml}]

[tool.flwr.app]
publisher = "flotilla-tests"

[tool.flwr.app.components]
serverapp = "tabapp.server_app:app"
clientapp = "tabapp.client_app:app"
""")
    return root


# -- requirement evaluation (no Docker) ------------------------------------------------------

def test_met_requirements_give_nothing():
    assert unmet_requirements(["flwr>=1.40.0", "numpy>=2.0.2", "scikit-learn>=1.6.1"], DISTS, IMAGE_ENV) == []


def test_missing_package_is_named():
    assert unmet_requirements(["tabulate>=0.9", "flwr"], DISTS, IMAGE_ENV) == ["tabulate>=0.9 (not installed)"]


def test_too_old_version_says_what_the_image_has():
    assert unmet_requirements(["numpy>=3.0", "flwr>=1.40,<1.42"], DISTS, IMAGE_ENV) == [
        "numpy>=3.0 (image has 2.4.6)", "flwr>=1.40,<1.42 (image has 1.42.0)"]


def test_marker_that_excludes_the_image_is_met():
    reqs = ['pywin32>=300; sys_platform == "win32"', 'tomli>=1; python_version < "3.11"',
            'nvidia-cublas; platform_machine == "aarch64"']
    assert unmet_requirements(reqs, DISTS, IMAGE_ENV) == []
    # ... judged by the image's environment, not this machine's
    arm = {**IMAGE_ENV, "platform_machine": "aarch64"}
    assert unmet_requirements(reqs, DISTS, arm) == ['nvidia-cublas; platform_machine == "aarch64" (not installed)']
    # a marker that holds is checked like any requirement
    assert unmet_requirements(['numpy>=3; python_version >= "3.10"'], DISTS, IMAGE_ENV) == [
        'numpy>=3; python_version >= "3.10" (image has 2.4.6)']


def test_extras_are_ignored():
    assert unmet_requirements(["flwr[simulation]>=1.40", "torch[opt-einsum]==2.13.0"], DISTS, IMAGE_ENV) == []
    assert unmet_requirements(["ray[default]>=2"], DISTS, IMAGE_ENV) == ["ray[default]>=2 (not installed)"]


def test_names_are_normalised():
    # installed as scikit_learn, required as scikit-learn (and every other spelling pip accepts)
    for req in ["scikit-learn>=1.6.1", "Scikit_Learn>=1.6.1", "scikit.learn>=1.6.1"]:
        assert unmet_requirements([req], DISTS, IMAGE_ENV) == [], req
    assert unmet_requirements(["scikit-learn>=1.6.1"], {"Scikit-Learn": "1.5.0"}, IMAGE_ENV) == [
        "scikit-learn>=1.6.1 (image has 1.5.0)"]


def test_local_versions_and_prereleases_count_as_pip_counts_them():
    # torch's CPU build is 2.13.0+cpu: `==2.13.0` matches it (PEP 440 ignores the local label)
    assert unmet_requirements(["torch==2.13.0", "tomli>=2.2"], DISTS, IMAGE_ENV) == []
    assert unmet_requirements(["torch==2.1.0"], DISTS, IMAGE_ENV) == ["torch==2.1.0 (image has 2.13.0+cpu)"]


def test_invalid_requirement_is_reported_not_raised():
    out = unmet_requirements(["flwr>=>1"], DISTS, IMAGE_ENV)
    assert len(out) == 1 and out[0].startswith("flwr>=>1 (not a valid requirement")


def test_labels_round_trip():
    inv = {"distributions": DISTS, "environment": IMAGE_ENV}
    labels = inventory_labels(inv)
    assert labels[LABEL_DISTS].startswith("flwr==1.42.0,numpy==2.4.6,scikit_learn==1.7.2")
    assert inventory_from_labels(labels) == inv
    assert inventory_from_labels({"org.opencontainers.image.version": "0.1.0"}) is None
    assert inventory_from_labels(None) is None


def test_check_message_is_one_line_and_says_how_to_fix(tmp_path):
    spec = AppSpec.load(fake_app(tmp_path / "app", ["flwr>=1.40.0", "tabulate>=0.9", "numpy>=3"]))
    inv = {"distributions": DISTS, "environment": IMAGE_ENV}
    default = f"flotilla:{flotilla.__version__}"
    msg = app_check_message(default, spec, inv)
    assert msg == (f"image {default} lacks what app 'tab-app' needs: tabulate>=0.9 (not installed); "
                   f"numpy>=3 (image has 2.4.6); build it with `flotilla images build --app {spec.dir}`")
    assert "\n" not in msg
    # another image name: the fix names it
    assert app_check_message("mine:1", spec, inv).endswith(f"--app {spec.dir} --tag mine:1`")
    assert app_check_message(default, AppSpec.load(SKLEARN_APP), inv) is None


def test_sklearn_ints_message_uses_the_path_as_typed(monkeypatch):
    monkeypatch.chdir(ROOT)
    spec = dataclasses.replace(AppSpec.load(SKLEARN_APP), dependencies=("scikit-learn>=1.6.1",))
    msg = app_check_message(f"flotilla:{flotilla.__version__}", spec, {"distributions": {"flwr": "1.42.0"}})
    assert msg == (f"image flotilla:{flotilla.__version__} lacks what app 'sklearn-ints' needs: scikit-learn>=1.6.1 "
                   "(not installed); build it with `flotilla images build --app tests/apps/sklearn_ints`")


def test_builtin_app_is_never_checked():
    # no engine is asked: the built-in app's needs are flotilla's own
    check_image_has_app("no-such-image:never", builtin_app())


def test_app_requirements_leave_flotilla_out_and_refuse_junk(tmp_path):
    a = AppSpec.load(fake_app(tmp_path / "a", ["flwr>=1.40.0", "flotilla>=0.1", "tabulate>=0.9"], name="a"))
    b = AppSpec.load(fake_app(tmp_path / "b", ["tabulate>=0.9", "numpy"], name="b"))
    assert app_requirements([a, b]) == ["flwr>=1.40.0", "tabulate>=0.9", "numpy"]
    bad = AppSpec.load(fake_app(tmp_path / "c", ["not a requirement!"], name="c"))
    with pytest.raises(ValueError, match="not a valid PEP 508 requirement"):
        app_requirements([bad])


def _wheel(d: Path, name: str, version: str, requires: list[str], license_text: str = "MIT") -> Path:
    path = d / f"{name}-{version}-py3-none-any.whl"
    # A License field with blank continuation lines (as matplotlib's): Requires-Dist comes after it.
    lic = "\n".join(f"        {ln}" for ln in license_text.splitlines())
    meta = (f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\nLicense: {lic}\n"
            + "".join(f"Requires-Dist: {r}\n" for r in requires) + "\nA description.\nRequires-Dist: bogus\n")
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(f"{name}-{version}.dist-info/METADATA", meta)
    return path


def test_dependency_closure_splits_the_wheelhouse(tmp_path):
    """Only wheels flotilla's own dependencies may use go into the deps layer's context."""
    wheels = [
        _wheel(tmp_path, "a", "1.0", ["b[x]>=1", 'winonly; sys_platform == "win32"'],
               license_text="Long licence\n\nsecond paragraph\n"),
        _wheel(tmp_path, "b", "1.0", ['c; extra == "x"', 'd; extra == "y"', 'e; platform_machine == "aarch64"']),
        _wheel(tmp_path, "c", "1.0", []),
        _wheel(tmp_path, "d", "1.0", []),
        _wheel(tmp_path, "e", "1.0", []),
        _wheel(tmp_path, "winonly", "1.0", []),
        _wheel(tmp_path, "tabulate", "0.10.0", []),
        _wheel(tmp_path, "bogus", "1.0", []),
    ]
    names = dependency_closure(["a>=1"], wheels)
    assert names - {None} == {"a", "b", "c", "e"}  # e: arm64 images need it; d: extra not asked; no win32 image


def test_build_refuses_an_app_whose_wheels_are_missing(tmp_path):
    house = tmp_path / "wheels"
    house.mkdir()
    _wheel(house, "flwr", "1.42.0", [])
    app = fake_app(tmp_path / "app", ["flwr>=1.40.0", "tabulate>=0.9"])
    with pytest.raises(ImageError) as err:
        build_image(wheelhouse=house, app=app)  # refused before any engine is needed
    assert str(err.value) == (f"--wheelhouse {house} has no wheel for tabulate>=0.9; add them with "
                              f"`flotilla images wheelhouse {house} --app {app.resolve()}`")


def test_cli_refuses_a_directory_that_is_no_flower_app(tmp_path):
    res = subprocess.run([sys.executable, "-m", "flotilla.images.cli", "build", "--app", str(tmp_path)],
                         capture_output=True, text=True)
    assert res.returncode == 2
    assert res.stderr.strip() == f"flotilla images build: --app {tmp_path}: {tmp_path}: not a Flower App directory " \
                                 "(no pyproject.toml)"


# -- real images (Docker) ----------------------------------------------------------------------

def _ok(*cmd: str) -> bool:
    try:
        return subprocess.run(list(cmd), capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def _require(ok: bool, reason: str) -> None:
    if not ok:
        if os.environ.get("FLOTILLA_REQUIRE_DOCKER") == "1":
            pytest.fail(reason)
        pytest.skip(reason)


def _docker_json(*args: str):
    return json.loads(subprocess.run(["docker", *args], capture_output=True, text=True, check=True).stdout)


@pytest.fixture(scope="module")
def base_image() -> str:
    _require(bool(shutil.which("docker")) and _ok("docker", "info"), "no Docker engine answers (run .ci/docker-up.sh)")
    base = os.environ.get("FLOTILLA_BASE_IMAGE", "flotilla-base:bookworm")
    _require(_ok("docker", "image", "inspect", base), f"base image {base} missing (run .ci/docker-up.sh)")
    return base


@pytest.fixture(scope="module")
def wheelhouse(base_image, tmp_path_factory) -> Path:
    """FLOTILLA_WHEELHOUSE, else CI's, else one made here (about 40 s)."""
    for cand in (os.environ.get("FLOTILLA_WHEELHOUSE"), "/var/tmp/flotilla-wheelhouse"):
        if cand and any(Path(cand).glob("flotilla-*.whl")):
            return Path(cand)
    dest = tmp_path_factory.mktemp("wheelhouse")
    make_wheelhouse(dest)
    return dest


def _dangling() -> set[str]:
    out = subprocess.run(["docker", "images", "-q", "--no-trunc", "--filter", "dangling=true"],
                         capture_output=True, text=True)
    return set(out.stdout.split())


@pytest.fixture(scope="module")
def app_image(base_image, wheelhouse):
    """sklearn_ints built into an image of its own tag; it and the stage images these tests leave are removed."""
    before = _dangling()
    try:
        res = build_image(base_image=base_image, wheelhouse=wheelhouse, tag=TEST_TAG, app=SKLEARN_APP)
        yield res
    finally:
        for tag in (TEST_TAG, TAB_TAG):
            subprocess.run(["docker", "image", "rm", "-f", tag], capture_output=True)
        for image_id in sorted(_dangling() - before):  # only what appeared during these tests
            subprocess.run(["docker", "image", "rm", image_id], capture_output=True)


@pytest.mark.docker
def test_sklearn_ints_image_has_the_app_and_passes_the_check(app_image, wheelhouse):
    assert app_image.tag == TEST_TAG and app_image.apps == ["sklearn-ints"]
    labels = _docker_json("image", "inspect", "-f", "{{json .Config.Labels}}", TEST_TAG)
    assert labels[LABEL_APPS] == "sklearn-ints"
    assert labels["org.opencontainers.image.version"] == flotilla.__version__
    dists = inventory_from_labels(labels)["distributions"]
    assert dists["flotilla"] == flotilla.__version__ and dists["torch"].startswith("2.13.0")
    # flwr, numpy and scikit-learn are flotilla's own dependencies: the app added no distribution
    flotilla_whl = sorted(wheelhouse.glob("flotilla-*.whl"))[-1]
    ours = dependency_closure(wheel_requirements(flotilla_whl), list(wheelhouse.glob("*.whl")))
    from packaging.utils import canonicalize_name
    assert {canonicalize_name(n) for n in dists} - ours == {"flotilla"}

    # the source is where devices preload it from, and the ClientApp imports there (offline)
    where = image_app_dir("sklearn-ints")
    probe = ("import os, sys; from flotilla.runtime.preload import preload; "
             f"print(sorted(os.listdir({where!r}))); print(preload({where!r}))")
    res = subprocess.run(["docker", "run", "--rm", "--network", "none", TEST_TAG, "python", "-c", probe],
                         capture_output=True, text=True, timeout=180)
    assert res.returncode == 0, res.stderr
    listing, module = res.stdout.strip().splitlines()[-2:]
    assert listing == "['pyproject.toml', 'sklearnints']"
    assert module == "sklearnints.client_app"

    _INVENTORY_CACHE.clear()
    t0 = time.perf_counter()
    check_image_has_app(TEST_TAG, AppSpec.load(SKLEARN_APP))  # from the labels: no container
    assert time.perf_counter() - t0 < 2


@pytest.mark.docker
def test_check_names_what_the_image_lacks(app_image, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    spec = AppSpec.load(fake_app(tmp_path / "tab_app", ["flwr>=1.40.0", "tabulate>=0.9", "scikit-learn>=99"]))
    with pytest.raises(TargetError) as err:
        check_image_has_app(TEST_TAG, spec)
    sk = inventory_from_labels(_docker_json("image", "inspect", "-f", "{{json .Config.Labels}}", TEST_TAG))
    msg = str(err.value)
    assert msg == (f"image {TEST_TAG} lacks what app 'tab-app' needs: tabulate>=0.9 (not installed); "
                   f"scikit-learn>=99 (image has {sk['distributions']['scikit-learn']}); "
                   f"build it with `flotilla images build --app tab_app --tag {TEST_TAG}`")
    assert "\n" not in msg
    # an image the engine does not have is not looked into (swarm/k8s: it may live only in a registry)
    check_image_has_app("flotilla-test-app-absent:0", spec)


@pytest.mark.docker
@pytest.mark.parametrize("target", ["compose", "swarm", "k8s"])
def test_targets_refuse_to_start_an_app_the_image_lacks(app_image, tmp_path, target):
    """The check runs in each container target's up(), before anything starts."""
    app = fake_app(tmp_path / "tab_app", ["flwr>=1.40.0", "tabulate>=0.9"])
    job = tmp_path / "job.yaml"
    job.write_text(json.dumps({"name": "tabcheck", "rounds": 1, "app": str(app), "runs_dir": str(tmp_path / "runs"),
                               "devices": [{"name": "dev", "count": 2, "cpus": 1.0, "memory": "1g"}]}))
    env = {**os.environ, "COLUMNS": "1000"}
    t0 = time.time()
    tls = [] if target == "compose" else ["--insecure"]  # no certificates needed to get as far as the check
    res = subprocess.run([sys.executable, "-m", "flotilla.cli", "run", str(job), "--target", target,
                          "--image", TEST_TAG, *tls], capture_output=True, text=True, env=env, timeout=120)
    out = res.stdout + res.stderr
    assert f"image {TEST_TAG} lacks what app 'tab-app' needs: tabulate>=0.9 (not installed); build it with " \
           f"`flotilla images build --app {app} --tag {TEST_TAG}`" in out, out
    assert time.time() - t0 < 60
    ps = subprocess.run(["docker", "ps", "-aq", "--filter", "name=tabcheck"], capture_output=True, text=True)
    assert ps.stdout.strip() == ""  # nothing was started


@pytest.mark.docker
def test_new_dependency_comes_from_the_wheelhouse_in_its_own_layer(app_image, wheelhouse, tmp_path, base_image):
    """An app needing a package flotilla lacks: `wheelhouse --app` fetches it, `build --app` installs it."""
    house = tmp_path / "wheels"
    house.mkdir()
    for whl in wheelhouse.glob("*.whl"):
        try:
            os.link(whl, house / whl.name)
        except OSError:
            shutil.copy2(whl, house / whl.name)
    app = fake_app(tmp_path / "tab_app", ["flwr>=1.40.0", "tabulate>=0.9"])
    before = {p.name for p in house.glob("*.whl")}
    try:
        make_wheelhouse(house, app=app)
    except ImageError as err:
        pytest.skip(f"no tabulate wheel on this host or its index ({err})")
    added = {p.name for p in house.glob("*.whl")} - before
    assert [n.split("-")[0] for n in added] == ["tabulate"], added  # nothing else, and never another torch
    try:
        res = build_image(base_image=base_image, wheelhouse=house, tag=TAB_TAG, app=app)
        check_image_has_app(TAB_TAG, AppSpec.load(app))
        run = subprocess.run(["docker", "run", "--rm", "--network", "none", "-w", image_app_dir("tab-app"), TAB_TAG,
                              "python", "-c", "import tabapp.client_app as c; print(c.TABLE.splitlines()[1])"],
                             capture_output=True, text=True, timeout=120)
        assert run.returncode == 0, run.stderr
        assert run.stdout.split() == ["1", "2"]
        sk = inventory_from_labels(_docker_json("image", "inspect", "-f", "{{json .Config.Labels}}", TEST_TAG))
        tab = inventory_from_labels(_docker_json("image", "inspect", "-f", "{{json .Config.Labels}}", TAB_TAG))
        assert set(tab["distributions"]) - set(sk["distributions"]) == {"tabulate"}
        # flotilla's dependency layer (torch & co.) is the very same layer in both images: cached, not rebuilt
        layers_sk = _docker_json("image", "inspect", "-f", "{{json .RootFS.Layers}}", TEST_TAG)
        layers_tab = _docker_json("image", "inspect", "-f", "{{json .RootFS.Layers}}", TAB_TAG)
        assert layers_sk[:2] == layers_tab[:2]
        assert res.size_bytes - app_image.size_bytes < 5_000_000
    finally:
        subprocess.run(["docker", "image", "rm", "-f", TAB_TAG], capture_output=True)
