"""Build Flotilla's one container image (all roles) and the wheelhouse it can be built from.

A wheelhouse is a directory of wheels for flotilla and every dependency, made
on a machine that reaches the package index. Building with it installs with
`pip install --no-index --find-links`: how air-gapped edge sites build, and
how CI builds here (containers cannot reach PyPI).
"""

from __future__ import annotations

import email.parser
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import flotilla
from flotilla.errors import UserError

DEFAULT_BASE_IMAGE = "python:3.11-slim"
DOCKERFILE = Path(__file__).with_name("Dockerfile")
IMAGE_NAME = "flotilla"

# docker platform -> pip platform tags of wheels that run there (newest first).
PIP_PLATFORMS = {
    "linux/amd64": ["manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64", "linux_x86_64"],
    "linux/arm64": ["manylinux_2_28_aarch64", "manylinux_2_17_aarch64", "manylinux2014_aarch64", "linux_aarch64"],
}


class ImageError(UserError, RuntimeError):
    """The image could not be built; the message says what to do."""


@dataclass
class BuildResult:
    tag: str
    seconds: float
    size_bytes: int | None  # None when the image was pushed, not loaded
    apps: list[str] = field(default_factory=list)  # names of the apps built in (--app)


IMAGE_APPS_DIR = "/opt/flotilla/apps"  # `flotilla images build --app PATH` copies the app here (devices preload it)


def image_app_dir(app_name: str) -> str:
    return f"{IMAGE_APPS_DIR}/{app_name}"


def default_image(registry: str | None = None) -> str:
    """The image every target runs unless told otherwise: tags carry the version."""
    name = f"{IMAGE_NAME}:{flotilla.__version__}"
    return f"{registry.rstrip('/')}/{name}" if registry else name


def source_tree() -> Path:
    """The checkout flotilla is imported from (src layout), needed to build its wheel."""
    root = Path(flotilla.__file__).resolve().parents[2]
    if not (root / "pyproject.toml").is_file():
        raise ImageError(
            f"flotilla is installed from {root}, not a source checkout; "
            "run from a checkout (pip install -e .) or pass --wheelhouse with a flotilla wheel in it"
        )
    return root


def build_flotilla_wheel(dest: Path) -> Path:
    """flotilla-<version>-py3-none-any.whl from the source tree, into dest."""
    dest.mkdir(parents=True, exist_ok=True)
    for old in dest.glob("flotilla-*.whl"):
        old.unlink()  # never install a stale build of the same version
    with tempfile.TemporaryDirectory(prefix="flotilla-wheel-") as tmp:
        # The build runs on a copy: setuptools leaves build/ and *.egg-info behind in the tree it builds.
        src = Path(tmp) / "src"
        root = source_tree()
        shutil.copytree(root, src, ignore=shutil.ignore_patterns(
            ".git", ".venv", "runs", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache", "wheelhouse"))
        # Build with this venv's setuptools when it has one: no index needed (air-gapped hosts).
        isolation = [] if importlib.util.find_spec("setuptools") is None else ["--no-build-isolation"]
        cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", *isolation, "-q", "-w", str(dest), str(src)]
        _run(cmd, "building the flotilla wheel")
    wheels = sorted(dest.glob("flotilla-*.whl"))
    if not wheels:
        raise ImageError(f"pip wheel produced no flotilla wheel in {dest}")
    return wheels[-1]


def make_wheelhouse(dest: Path, platforms: list[str] | None = None,
                    app: str | Path | Sequence[str | Path] | None = None) -> list[Path]:
    """Wheels for flotilla and all its dependencies, for the host's platform (and `platforms`).

    Runs on the host, which reaches the index. The host platform uses `pip wheel`
    (sdists become wheels here, so images never need a compiler); other platforms
    use `pip download --only-binary` for CPython 3.11 wheels of that platform.

    app: Flower App directories whose dependencies are collected too (for
    `images build --app`), resolved against the versions flotilla's own
    dependencies resolved to: an app never brings a second torch or numpy.
    """
    dest = Path(dest).resolve()
    specs = load_apps(app)
    reqs = _app_requirements(specs)
    flotilla_whl = build_flotilla_wheel(dest)
    t0 = time.time()
    _run([sys.executable, "-m", "pip", "wheel", "-q", "--find-links", str(dest), "-w", str(dest), str(flotilla_whl)],
         "collecting dependency wheels")
    host = host_platform()
    for plat in platforms or []:
        if plat not in PIP_PLATFORMS and plat != host:
            raise ImageError(f"--platform {plat}: not supported; use {', '.join(PIP_PLATFORMS)}")
    pip_download = [sys.executable, "-m", "pip", "download", "-q", "--only-binary=:all:", "--python-version", "3.11",
                    "--implementation", "cp", "-d", str(dest), "--find-links", str(dest)]
    for plat in platforms or []:
        if plat == host:
            continue
        _run(pip_download + [a for tag in PIP_PLATFORMS[plat] for a in ("--platform", tag)] + [str(flotilla_whl)],
             f"downloading wheels for {plat}")
    if reqs:
        with tempfile.TemporaryDirectory(prefix="flotilla-appreqs-") as tmp:
            pins, req_file = Path(tmp) / "constraints.txt", Path(tmp) / "app-requirements.txt"
            pins.write_text("\n".join(_resolved_pins(flotilla_whl, dest)) + "\n")
            req_file.write_text("\n".join(reqs) + "\n")
            names = ", ".join(s.name for s in specs)
            cmd = [sys.executable, "-m", "pip", "wheel", "-q", "--find-links", str(dest), "-w", str(dest),
                   "-c", str(pins), "-r", str(req_file)]
            # From the wheelhouse alone when it already has everything (seconds, not a walk of the index).
            if subprocess.run([*cmd, "--no-index"], capture_output=True).returncode != 0:
                _run(cmd, f"collecting wheels for app {names}")
            for plat in platforms or []:
                if plat == host:
                    continue
                _run(pip_download + [a for tag in PIP_PLATFORMS[plat] for a in ("--platform", tag)]
                     + ["-c", str(pins), "-r", str(req_file)], f"downloading wheels of app {names} for {plat}")
    wheels = sorted(dest.glob("*.whl"))
    print(f"wheelhouse {dest}: {len(wheels)} wheels, {_du(dest) / 1e6:.0f} MB in {time.time() - t0:.0f} s",
          file=sys.stderr)
    return wheels


def host_platform() -> str:
    machine = os.uname().machine
    return {"x86_64": "linux/amd64", "amd64": "linux/amd64", "aarch64": "linux/arm64", "arm64": "linux/arm64"}.get(
        machine, f"linux/{machine}")


def build_image(
    base_image: str = DEFAULT_BASE_IMAGE,
    wheelhouse: Path | None = None,
    platforms: list[str] | None = None,
    push: str | None = None,
    tag: str | None = None,
    app: str | Path | Sequence[str | Path] | None = None,
) -> BuildResult:
    """Build (and optionally push) the image; returns its tag.

    platforms: any given -> `docker buildx build --platform ... --push`, which
    needs push=REGISTRY/PROJECT (a multi-platform image cannot live in the local
    engine's image store).

    app: one or more Flower App directories. The image then also has each app's
    [project] dependencies (installed after flotilla's, which they may not
    replace; from the wheelhouse when one is given), its source at
    image_app_dir(name), and labels listing the apps and every installed
    distribution (what check_image_has_app reads). The tag stays
    flotilla:<version> unless `tag` is given.
    """
    tag = tag or default_image(push)
    if ":" not in tag.rsplit("/", 1)[-1]:
        tag = f"{tag}:{flotilla.__version__}"
    if push and not tag.startswith(push.rstrip("/") + "/"):
        tag = f"{push.rstrip('/')}/{tag.rsplit('/', 1)[-1]}"
    if platforms:
        unknown = [p for p in platforms if p not in PIP_PLATFORMS]
        if unknown:
            raise ImageError(f"--platform {','.join(unknown)}: not supported; use {', '.join(PIP_PLATFORMS)}")
        if not push:
            raise ImageError(
                "--platform builds a multi-platform image with buildx, which must be pushed: "
                "add --push REGISTRY/PROJECT (e.g. --push registry.example.com/fl)"
            )
    if wheelhouse is not None:
        wheelhouse = Path(wheelhouse)
        if not wheelhouse.is_dir() or not any(wheelhouse.glob("*.whl")):
            raise ImageError(f"--wheelhouse {wheelhouse}: no wheels there; "
                             "make one with `flotilla images wheelhouse DIR`")
    specs = load_apps(app)
    reqs = _app_requirements(specs)
    if wheelhouse is not None and reqs:
        _wheelhouse_covers(wheelhouse, reqs, specs)
    _need_docker(buildx=bool(platforms))

    t0 = time.time()
    with tempfile.TemporaryDirectory(prefix="flotilla-image-") as ctx_dir:
        ctx = Path(ctx_dir)
        shutil.copy(DOCKERFILE, ctx / "Dockerfile")
        wheels, app_dir = ctx / "wheels", ctx / "app"
        wheels.mkdir()
        try:
            flotilla_whl = build_flotilla_wheel(app_dir)  # always this tree's code, even with an older wheelhouse
        except ImageError:
            old = sorted(wheelhouse.glob("flotilla-*.whl")) if wheelhouse is not None else []
            if not old:
                raise
            app_dir.mkdir(exist_ok=True)  # installed flotilla, no checkout: the wheelhouse's wheel
            flotilla_whl = app_dir / old[-1].name
            _link_or_copy(old[-1], flotilla_whl)
        # Dependencies get their own (cached) layer: a code change must not reinstall torch.
        requirements = wheel_requirements(flotilla_whl)
        (ctx / "requirements.txt").write_text("\n".join(requirements) + "\n")
        # wheels/ holds only what flotilla's dependencies may use, so wheels added for an app
        # (in appwheels/) leave flotilla's cached deps layer alone.
        house = [w for w in wheelhouse.glob("*.whl") if not w.name.startswith("flotilla-")] if wheelhouse else []
        ours = dependency_closure(requirements, house)
        appwheels = ctx / "appwheels"
        for whl in house:
            if ours is None or _wheel_name(whl) in ours:
                _link_or_copy(whl, wheels / whl.name)
            elif specs:
                appwheels.mkdir(exist_ok=True)
                _link_or_copy(whl, appwheels / whl.name)
        args = ["--build-arg", f"BASE_IMAGE={base_image}", "--build-arg", f"OFFLINE={int(wheelhouse is not None)}",
                "--label", f"org.opencontainers.image.version={flotilla.__version__}",
                "--label", "org.opencontainers.image.title=flotilla", "-t", tag]
        if specs:
            from flotilla.images.appdeps import APP_STAGES, LABEL_APPS

            appwheels.mkdir(exist_ok=True)
            (ctx / "app-requirements.txt").write_text("".join(f"{r}\n" for r in reqs))
            (ctx / "Dockerfile").write_text(DOCKERFILE.read_text() + APP_STAGES)
            for spec in specs:
                shutil.copytree(spec.dir, ctx / "apps" / spec.name, ignore=APP_IGNORE)
            args += ["--label", f"{LABEL_APPS}={','.join(s.name for s in specs)}"]
        if wheelhouse is not None and not platforms:
            # No network at all: proves the wheelhouse is complete (what an air-gapped site gets).
            args += ["--network", "none"]
        if platforms:
            cmd = ["docker", "buildx", "build", "--platform", ",".join(platforms), "--push", *args, str(ctx)]
        else:
            cmd = ["docker", "build", *args, str(ctx)]
        _run(cmd, f"building {tag}", env=_build_env())
    if specs and not platforms:
        _label_inventory(tag)
    if push and not platforms:
        _run(["docker", "push", tag], f"pushing {tag}")
    size = None
    if not platforms:
        out = subprocess.run(["docker", "image", "inspect", "-f", "{{.Size}}", tag], capture_output=True, text=True)
        size = int(out.stdout.strip()) if out.returncode == 0 else None
    return BuildResult(tag=tag, seconds=time.time() - t0, size_bytes=size, apps=[s.name for s in specs])


def wheel_requirements(wheel: Path) -> list[str]:
    """The Requires-Dist lines of a wheel, without optional extras."""
    with zipfile.ZipFile(wheel) as zf:
        meta = next(n for n in zf.namelist() if n.endswith(".dist-info/METADATA"))
        lines = zf.read(meta).decode().splitlines()
    reqs = [ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("Requires-Dist:")]
    return [r for r in reqs if "extra ==" not in r]


# -- apps (`--app PATH`) -------------------------------------------------------------

APP_IGNORE = shutil.ignore_patterns(".git", ".venv", "__pycache__", "*.pyc", "runs", ".pytest_cache", "*.fab")


def load_apps(app: str | Path | Sequence[str | Path] | None) -> list:
    """AppSpecs of the --app directories (ImageError in one line when one is not a Flower App)."""
    from flotilla.appspec import AppError, AppSpec

    if app is None:
        return []
    paths = [app] if isinstance(app, (str, Path)) else list(app)
    specs = []
    for p in paths:
        try:
            spec = AppSpec.load(p)
        except AppError as err:
            raise ImageError(f"--app {p}: {err}") from None
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", spec.name):
            raise ImageError(f"--app {p}: project name {spec.name!r} is not a valid distribution name")
        if any(s.name == spec.name for s in specs):
            raise ImageError(f"--app {p}: another --app is also named {spec.name!r}")
        specs.append(spec)
    return specs


def _app_requirements(specs: list) -> list[str]:
    """What to install for the apps; ImageError if one needs a flotilla other than this one."""
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name
    from packaging.version import Version

    from flotilla.images.appdeps import app_requirements

    try:
        reqs = app_requirements(specs)
    except ValueError as err:
        raise ImageError(str(err)) from None
    for spec in specs:
        for text in filter(str.strip, spec.dependencies):
            req = Requirement(" ".join(text.split()))  # valid: app_requirements parsed it
            if canonicalize_name(req.name) == "flotilla" and not req.specifier.contains(
                    Version(flotilla.__version__), prereleases=True):
                raise ImageError(f"app {spec.name!r} needs {text}, but this is flotilla {flotilla.__version__}")
    return reqs


def _wheel_name(whl: Path) -> str | None:
    from packaging.utils import InvalidWheelFilename, parse_wheel_filename

    try:
        return parse_wheel_filename(whl.name)[0]
    except InvalidWheelFilename:
        return None


def dependency_closure(requirements: list[str], wheels: list[Path]) -> set[str | None] | None:
    """Normalised names of the wheels these requirements may pull in (transitively, any platform).

    Read from the wheels' own metadata; every version and platform of a name
    counts, and a marker counts as true if it may hold in any image. None when
    some metadata cannot be read (the caller then uses every wheel).
    """
    from packaging.requirements import InvalidRequirement, Requirement
    from packaging.utils import canonicalize_name

    from flotilla.images.appdeps import marker_may_hold

    by_name: dict[str | None, list[Path]] = {}
    for whl in wheels:
        by_name.setdefault(_wheel_name(whl), []).append(whl)
    meta: dict[Path, list[str]] = {}
    names: set[str | None] = {None}  # unparseable wheel names: keep them with flotilla's
    seen: set[tuple[str, frozenset]] = set()
    todo: list[tuple[str, tuple[str, ...]]] = [(r, ("",)) for r in requirements]
    try:
        while todo:
            text, extras = todo.pop()
            try:
                req = Requirement(text)
            except InvalidRequirement:
                return None
            if not marker_may_hold(req, extras):
                continue
            name = canonicalize_name(req.name)
            key = (name, frozenset(req.extras))
            if key in seen:
                continue
            seen.add(key)
            names.add(name)
            for whl in by_name.get(name, []):
                if whl not in meta:
                    meta[whl] = _requires_dist(whl)
                todo += [(r, ("", *sorted(req.extras))) for r in meta[whl]]
    except (OSError, zipfile.BadZipFile, StopIteration, UnicodeDecodeError):
        return None
    return names


def _requires_dist(wheel: Path) -> list[str]:
    with zipfile.ZipFile(wheel) as zf:
        name = next(n for n in zf.namelist() if n.endswith(".dist-info/METADATA") and n.count("/") == 1)
        text = zf.read(name).decode()
    # RFC 822 headers (continuation lines, e.g. a multi-line License, may look blank); the body is the description.
    return [" ".join(v.split()) for v in email.parser.HeaderParser().parsestr(text).get_all("Requires-Dist") or []]


def _wheelhouse_covers(wheelhouse: Path, reqs: list[str], specs: list) -> None:
    """ImageError (one line) if an app requirement has no wheel at all in the wheelhouse."""
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    from flotilla.images.appdeps import marker_may_hold

    have = {_wheel_name(w) for w in wheelhouse.glob("*.whl")}
    lacking = [r for r in reqs if marker_may_hold(Requirement(r)) and canonicalize_name(Requirement(r).name) not in have]
    if lacking:
        paths = " ".join(f"--app {s.dir}" for s in specs)
        raise ImageError(f"--wheelhouse {wheelhouse} has no wheel for {', '.join(lacking)}; add them with "
                         f"`flotilla images wheelhouse {wheelhouse} {paths}`")


def _resolved_pins(flotilla_whl: Path, wheelhouse: Path) -> list[str]:
    """name==version of what flotilla's dependencies resolve to from the wheelhouse (what the image gets)."""
    with tempfile.TemporaryDirectory(prefix="flotilla-report-") as tmp:
        report = Path(tmp) / "report.json"
        _run([sys.executable, "-m", "pip", "install", "-q", "--dry-run", "--ignore-installed", "--no-index",
              "--find-links", str(wheelhouse), "--report", str(report), str(flotilla_whl)],
             "resolving flotilla's dependencies from the wheelhouse")
        doc = json.loads(report.read_text())
    pins = [f"{i['metadata']['name']}=={i['metadata']['version']}" for i in doc.get("install", [])]
    return [p for p in pins if not p.lower().startswith("flotilla==")]


def _label_inventory(tag: str) -> None:
    """Copy the image's /opt/flotilla/distributions.json into its labels (no container runs)."""
    import io
    import tarfile

    from flotilla.images.appdeps import INVENTORY_FILE, inventory_labels

    cid = subprocess.run(["docker", "create", tag], capture_output=True, text=True)
    if cid.returncode != 0:
        raise ImageError(f"reading the inventory of {tag} failed: {cid.stderr.strip()}")
    cid = cid.stdout.strip()
    try:
        out = subprocess.run(["docker", "cp", f"{cid}:{INVENTORY_FILE}", "-"], capture_output=True)
    finally:
        subprocess.run(["docker", "rm", cid], capture_output=True)
    if out.returncode != 0:
        raise ImageError(f"reading {INVENTORY_FILE} from {tag} failed: {out.stderr.decode().strip()}")
    with tarfile.open(fileobj=io.BytesIO(out.stdout)) as tf:
        member = tf.next()
        inv = json.loads(tf.extractfile(member).read())
    old = subprocess.run(["docker", "image", "inspect", "-f", "{{.Id}}", tag], capture_output=True, text=True)
    args = [a for k, v in inventory_labels(inv).items() for a in ("--label", f"{k}={v}")]
    proc = subprocess.run(["docker", "build", "-q", *args, "-t", tag, "-"], input=f"FROM {tag}\n", text=True,
                          capture_output=True, env=_build_env())
    if proc.returncode != 0:
        raise ImageError(f"labelling {tag} failed: {proc.stderr.strip()[-300:]}")
    if old.returncode == 0:  # the unlabelled image: gone unless a child layer still needs it
        subprocess.run(["docker", "image", "rm", old.stdout.strip()], capture_output=True)


def image_exists(tag: str) -> bool:
    return subprocess.run(["docker", "image", "inspect", tag], capture_output=True).returncode == 0


def _need_docker(buildx: bool) -> None:
    if shutil.which("docker") is None:
        raise ImageError("docker is not on PATH; install Docker (or run .ci/docker-up.sh)")
    if subprocess.run(["docker", "info"], capture_output=True).returncode != 0:
        raise ImageError("the Docker engine does not answer (`docker info` fails); start it first")
    if buildx and subprocess.run(["docker", "buildx", "version"], capture_output=True).returncode != 0:
        raise ImageError("--platform needs the docker buildx plugin; install it (Debian: docker-buildx)")


def _build_env() -> dict[str, str]:
    env = dict(os.environ)
    if "DOCKER_BUILDKIT" not in env and subprocess.run(["docker", "buildx", "version"], capture_output=True).returncode:
        env["DOCKER_BUILDKIT"] = "0"  # recent CLIs refuse BuildKit without the buildx plugin; the classic builder works
    return env


def _run(cmd: list[str], what: str, env: dict | None = None) -> None:
    proc = subprocess.run(cmd, env=env)
    if proc.returncode != 0:
        raise ImageError(f"{what} failed (exit {proc.returncode}): {' '.join(cmd)}")


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)  # same filesystem: instant, no second copy of torch
    except OSError:
        shutil.copy2(src, dst)


def _du(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())
