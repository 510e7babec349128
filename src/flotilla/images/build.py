"""Build Flotilla's one container image (all roles) and the wheelhouse it can be built from.

This is the entry module; import from here. It fills a build context (the
Dockerfile, flotilla's wheel, the dependency wheels split so a code change
never reinstalls torch, and any `--app`'s stages, wheels and source), runs
`docker build` (or `docker buildx build --push` for several platforms), and
labels the image with what it contains. Making the wheels and checking
requirements against them is wheelhouse.py, re-exported here.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import flotilla
from flotilla.images.wheelhouse import (
    PIP_PLATFORMS,
    ImageError,
    _app_requirements,
    _run,
    _wheel_name,
    _wheelhouse_covers,
    build_flotilla_wheel,
    dependency_closure,
    host_platform,
    load_apps,
    make_wheelhouse,
    source_tree,
    wheel_requirements,
)

__all__ = [
    "APP_IGNORE",
    "DEFAULT_BASE_IMAGE",
    "DOCKERFILE",
    "IMAGE_APPS_DIR",
    "IMAGE_NAME",
    "PIP_PLATFORMS",
    "BuildResult",
    "ImageError",
    "build_flotilla_wheel",
    "build_image",
    "default_image",
    "dependency_closure",
    "host_platform",
    "image_app_dir",
    "image_exists",
    "load_apps",
    "make_wheelhouse",
    "source_tree",
    "wheel_requirements",
]

DEFAULT_BASE_IMAGE = "python:3.11-slim"
DOCKERFILE = Path(__file__).with_name("Dockerfile")
IMAGE_NAME = "flotilla"
IMAGE_APPS_DIR = "/opt/flotilla/apps"  # `flotilla images build --app PATH` copies the app here (devices preload it)
APP_IGNORE = shutil.ignore_patterns(".git", ".venv", "__pycache__", "*.pyc", "runs", ".pytest_cache", "*.fab")


@dataclass
class BuildResult:
    tag: str
    seconds: float
    size_bytes: int | None  # None when the image was pushed, not loaded
    apps: list[str] = field(default_factory=list)  # names of the apps built in (--app)


def image_app_dir(app_name: str) -> str:
    return f"{IMAGE_APPS_DIR}/{app_name}"


def default_image(registry: str | None = None) -> str:
    """The image every target runs unless told otherwise: tags carry the version."""
    name = f"{IMAGE_NAME}:{flotilla.__version__}"
    return f"{registry.rstrip('/')}/{name}" if registry else name


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


def _has_buildx() -> bool:
    return subprocess.run(["docker", "buildx", "version"], capture_output=True).returncode == 0


def _need_docker(buildx: bool) -> None:
    if shutil.which("docker") is None:
        raise ImageError("docker is not on PATH; install Docker (or run .ci/docker-up.sh)")
    if subprocess.run(["docker", "info"], capture_output=True).returncode != 0:
        raise ImageError("the Docker engine does not answer (`docker info` fails); start it first")
    if buildx and not _has_buildx():
        raise ImageError("--platform needs the docker buildx plugin; install it (Debian: docker-buildx)")


def _build_env() -> dict[str, str]:
    env = dict(os.environ)
    if "DOCKER_BUILDKIT" not in env and not _has_buildx():
        env["DOCKER_BUILDKIT"] = "0"  # recent CLIs refuse BuildKit without the buildx plugin; the classic builder works
    return env


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)  # same filesystem: instant, no second copy of torch
    except OSError:
        shutil.copy2(src, dst)
