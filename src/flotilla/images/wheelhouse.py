"""The wheels an image installs from: the flotilla wheel, the wheelhouse, and the requirement checks on them.

A wheelhouse is a directory of wheels for flotilla and every dependency, made
on a machine that reaches the package index. Building with it installs with
`pip install --no-index --find-links`: how air-gapped edge sites build, and
how CI builds here (containers cannot reach PyPI).

Everything here runs on the host with pip and reads wheel metadata; nothing
needs Docker (that is build.py). The checks on `--app` requirements live here
too, because they are answered from wheels: an app may not need another
flotilla, and a wheelhouse must hold a wheel for each of its requirements.
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
from pathlib import Path

import flotilla
from flotilla.errors import UserError

# docker platform -> pip platform tags of wheels that run there (newest first).
PIP_PLATFORMS = {
    "linux/amd64": ["manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64", "linux_x86_64"],
    "linux/arm64": ["manylinux_2_28_aarch64", "manylinux_2_17_aarch64", "manylinux2014_aarch64", "linux_aarch64"],
}


class ImageError(UserError, RuntimeError):
    """The image could not be built; the message says what to do."""


def _run(cmd: list[str], what: str, env: dict | None = None) -> None:
    proc = subprocess.run(cmd, env=env)
    if proc.returncode != 0:
        raise ImageError(f"{what} failed (exit {proc.returncode}): {' '.join(cmd)}")


# -- the flotilla wheel and the wheelhouse ------------------------------------------


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
    cmd = [sys.executable, "-m", "pip", "wheel", "-q", "--find-links", str(dest), "-w", str(dest), str(flotilla_whl)]
    # From the wheelhouse alone when it already has everything: seconds, not a walk of the index (a re-run, CI)
    if subprocess.run([*cmd, "--no-index"], capture_output=True).returncode != 0:
        _run(cmd, "collecting dependency wheels")
    host = host_platform()
    for plat in platforms or []:
        if plat not in PIP_PLATFORMS and plat != host:
            raise ImageError(f"--platform {plat}: not supported; use {', '.join(PIP_PLATFORMS)}")
    foreign = [plat for plat in platforms or [] if plat != host]

    def pip_download(plat: str, what: list[str]) -> list[str]:
        return [sys.executable, "-m", "pip", "download", "-q", "--only-binary=:all:", "--python-version", "3.11",
                "--implementation", "cp", "-d", str(dest), "--find-links", str(dest),
                *(a for tag in PIP_PLATFORMS[plat] for a in ("--platform", tag)), *what]

    for plat in foreign:
        _run(pip_download(plat, [str(flotilla_whl)]), f"downloading wheels for {plat}")
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
            for plat in foreign:
                _run(pip_download(plat, ["-c", str(pins), "-r", str(req_file)]),
                     f"downloading wheels of app {names} for {plat}")
    wheels = sorted(dest.glob("*.whl"))
    print(f"wheelhouse {dest}: {len(wheels)} wheels, {_du(dest) / 1e6:.0f} MB in {time.time() - t0:.0f} s",
          file=sys.stderr)
    return wheels


def host_platform() -> str:
    machine = os.uname().machine
    return {"x86_64": "linux/amd64", "amd64": "linux/amd64", "aarch64": "linux/arm64", "arm64": "linux/arm64"}.get(
        machine, f"linux/{machine}")


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


def _du(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


# -- wheel metadata ------------------------------------------------------------------


def _requires_dist(wheel: Path) -> list[str]:
    with zipfile.ZipFile(wheel) as zf:
        name = next(n for n in zf.namelist() if n.endswith(".dist-info/METADATA") and n.count("/") == 1)
        text = zf.read(name).decode()
    # RFC 822 headers (continuation lines, e.g. a multi-line License, may look blank); the body is the description.
    return [" ".join(v.split()) for v in email.parser.HeaderParser().parsestr(text).get_all("Requires-Dist") or []]


def wheel_requirements(wheel: Path) -> list[str]:
    """The Requires-Dist lines of a wheel, without optional extras."""
    return [r for r in _requires_dist(wheel) if "extra ==" not in r]


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


# -- apps (`--app PATH`) -------------------------------------------------------------


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
