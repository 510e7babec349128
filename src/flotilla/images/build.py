"""Build Flotilla's one container image (all roles) and the wheelhouse it can be built from.

A wheelhouse is a directory of wheels for flotilla and every dependency, made
on a machine that reaches the package index. Building with it installs with
`pip install --no-index --find-links`: how air-gapped edge sites build, and
how CI builds here (containers cannot reach PyPI).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

import flotilla

DEFAULT_BASE_IMAGE = "python:3.11-slim"
DOCKERFILE = Path(__file__).with_name("Dockerfile")
IMAGE_NAME = "flotilla"

# docker platform -> pip platform tags of wheels that run there (newest first).
PIP_PLATFORMS = {
    "linux/amd64": ["manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64", "linux_x86_64"],
    "linux/arm64": ["manylinux_2_28_aarch64", "manylinux_2_17_aarch64", "manylinux2014_aarch64", "linux_aarch64"],
}


class ImageError(RuntimeError):
    """The image could not be built; the message says what to do."""


@dataclass
class BuildResult:
    tag: str
    seconds: float
    size_bytes: int | None  # None when the image was pushed, not loaded


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


def make_wheelhouse(dest: Path, platforms: list[str] | None = None) -> list[Path]:
    """Wheels for flotilla and all its dependencies, for the host's platform (and `platforms`).

    Runs on the host, which reaches the index. The host platform uses `pip wheel`
    (sdists become wheels here, so images never need a compiler); other platforms
    use `pip download --only-binary` for CPython 3.11 wheels of that platform.
    """
    dest = Path(dest).resolve()
    flotilla_whl = build_flotilla_wheel(dest)
    t0 = time.time()
    _run([sys.executable, "-m", "pip", "wheel", "-q", "--find-links", str(dest), "-w", str(dest), str(flotilla_whl)],
         "collecting dependency wheels")
    host = host_platform()
    for plat in platforms or []:
        if plat == host:
            continue
        tags = PIP_PLATFORMS.get(plat)
        if tags is None:
            raise ImageError(f"--platform {plat}: not supported; use {', '.join(PIP_PLATFORMS)}")
        cmd = [sys.executable, "-m", "pip", "download", "-q", "--only-binary=:all:", "--python-version", "3.11",
               "--implementation", "cp", "-d", str(dest), "--find-links", str(dest)]
        for tag in tags:
            cmd += ["--platform", tag]
        _run(cmd + [str(flotilla_whl)], f"downloading wheels for {plat}")
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
) -> BuildResult:
    """Build (and optionally push) the image; returns its tag.

    platforms: any given -> `docker buildx build --platform ... --push`, which
    needs push=REGISTRY/PROJECT (a multi-platform image cannot live in the local
    engine's image store).
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
    _need_docker(buildx=bool(platforms))

    t0 = time.time()
    with tempfile.TemporaryDirectory(prefix="flotilla-image-") as ctx_dir:
        ctx = Path(ctx_dir)
        shutil.copy(DOCKERFILE, ctx / "Dockerfile")
        wheels, app = ctx / "wheels", ctx / "app"
        wheels.mkdir()
        if wheelhouse is not None:
            for whl in wheelhouse.glob("*.whl"):
                if not whl.name.startswith("flotilla-"):
                    _link_or_copy(whl, wheels / whl.name)
        try:
            flotilla_whl = build_flotilla_wheel(app)  # always this tree's code, even with an older wheelhouse
        except ImageError:
            old = sorted(wheelhouse.glob("flotilla-*.whl")) if wheelhouse is not None else []
            if not old:
                raise
            app.mkdir(exist_ok=True)  # installed flotilla, no checkout: the wheelhouse's wheel
            flotilla_whl = app / old[-1].name
            _link_or_copy(old[-1], flotilla_whl)
        # Dependencies get their own (cached) layer: a code change must not reinstall torch.
        (ctx / "requirements.txt").write_text("\n".join(wheel_requirements(flotilla_whl)) + "\n")
        args = ["--build-arg", f"BASE_IMAGE={base_image}", "--build-arg", f"OFFLINE={int(wheelhouse is not None)}",
                "--label", f"org.opencontainers.image.version={flotilla.__version__}",
                "--label", "org.opencontainers.image.title=flotilla", "-t", tag]
        if wheelhouse is not None and not platforms:
            # No network at all: proves the wheelhouse is complete (what an air-gapped site gets).
            args += ["--network", "none"]
        if platforms:
            cmd = ["docker", "buildx", "build", "--platform", ",".join(platforms), "--push", *args, str(ctx)]
        else:
            cmd = ["docker", "build", *args, str(ctx)]
        _run(cmd, f"building {tag}", env=_build_env())
    if push and not platforms:
        _run(["docker", "push", tag], f"pushing {tag}")
    size = None
    if not platforms:
        out = subprocess.run(["docker", "image", "inspect", "-f", "{{.Size}}", tag], capture_output=True, text=True)
        size = int(out.stdout.strip()) if out.returncode == 0 else None
    return BuildResult(tag=tag, seconds=time.time() - t0, size_bytes=size)


def wheel_requirements(wheel: Path) -> list[str]:
    """The Requires-Dist lines of a wheel, without optional extras."""
    with zipfile.ZipFile(wheel) as zf:
        meta = next(n for n in zf.namelist() if n.endswith(".dist-info/METADATA"))
        lines = zf.read(meta).decode().splitlines()
    reqs = [ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("Requires-Dist:")]
    return [r for r in reqs if "extra ==" not in r]


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
