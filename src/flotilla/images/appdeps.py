"""A user's Flower App in the image: its dependencies, its source, and the pre-run check that they are there.

On container targets Flower ships the app's code to the devices (the FAB), but
not its dependencies: those must already be in the image. `flotilla images
build --app PATH` installs them (on top of flotilla's, never replacing them),
copies the app to `image_app_dir(name)` (devices preload its ClientApp from
there) and labels the image with what it holds:

    io.flotilla.apps                  the apps built in, comma-separated names
    io.flotilla.distributions         every distribution in /opt/flotilla, name==version, comma-separated
    io.flotilla.marker-environment    the image's PEP 508 marker variables (JSON)

`check_image_has_app(image, spec)` reads those labels (`docker image inspect`,
no container) and says, in one line, which of the app's requirements the
image lacks, before a target starts anything.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterable, Mapping
from pathlib import Path

from packaging.markers import InvalidMarker, UndefinedComparison, UndefinedEnvironmentName
from packaging.requirements import InvalidRequirement, Requirement
from packaging.utils import canonicalize_name
from packaging.version import InvalidVersion, Version

from flotilla.appspec import AppSpec

LABEL_APPS = "io.flotilla.apps"
LABEL_DISTS = "io.flotilla.distributions"
LABEL_ENV = "io.flotilla.marker-environment"
INVENTORY_FILE = "/opt/flotilla/distributions.json"  # the same, as a file inside the image
SKIP_ENV = "FLOTILLA_SKIP_APP_CHECK"  # =1: trust the image (e.g. deps installed outside the venv's metadata)

# Stages appended to the Dockerfile by `flotilla images build --app`; the build context then also has
#   app-requirements.txt  the apps' [project] dependencies (flotilla itself left out: it is the image)
#   appwheels/            wheelhouse wheels that flotilla's own dependencies do not use
#   apps/<name>/          each app's source
# The first stage's cache key is flotilla's deps layer + those two: changing the app's code
# never reinstalls its dependencies, changing its dependencies never reinstalls torch.
APP_STAGES = r"""
# -- appended by `flotilla images build --app PATH` ---------------------------------
# The apps' dependencies, on top of flotilla's and never replacing them: every
# distribution already in the venv is a constraint (pip fails on a conflict). A
# requirement flotilla's dependencies satisfy installs nothing. Only the files
# pip adds go into the image, as their own layer.
FROM deps AS appdeps
ARG OFFLINE=0
ARG PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu
COPY app-requirements.txt /appwheels/app-requirements.txt
COPY appwheels/ /appwheels/
RUN sp=/opt/flotilla/lib/python3.11/site-packages \
 && if [ "$OFFLINE" = 1 ]; then idx="--no-index"; else idx="--extra-index-url $PIP_EXTRA_INDEX_URL"; fi \
 && PYTHONPATH=/opt/pip /opt/flotilla/bin/python -m pip list --disable-pip-version-check --format=freeze \
        --path "$sp" > /tmp/pinned.txt \
 && find /opt/flotilla -xdev ! -type d -printf '%p\t%s\t%T@\n' | sort > /tmp/before \
 && PYTHONPATH=/opt/pip /opt/flotilla/bin/python -m pip install --no-cache-dir --disable-pip-version-check $idx \
        --find-links /wheels --find-links /appwheels -c /tmp/pinned.txt -r /appwheels/app-requirements.txt \
 && rm -rf "$sp"/*/tests "$sp"/*/*/tests \
 && find /opt/flotilla -xdev ! -type d -printf '%p\t%s\t%T@\n' | sort > /tmp/after \
 && if [ -n "$(comm -23 /tmp/before /tmp/after)" ]; then \
        echo "the app's dependencies changed files of flotilla's:"; comm -23 /tmp/before /tmp/after | cut -f1; \
        exit 1; fi \
 && mkdir /overlay \
 && comm -13 /tmp/before /tmp/after | cut -f1 | xargs -r -d '\n' cp -a --parents -t /overlay

FROM flotilla
COPY --from=appdeps /overlay/ /
RUN python -m flotilla.images.inventory > /opt/flotilla/distributions.json
COPY apps/ /opt/flotilla/apps/
"""

# Environments a wheel may be installed in (the image's Python is 3.11; amd64 or arm64):
# a marker counts as true when it holds in any of them.
_ENVS = [{"python_version": py, "python_full_version": f"{py}.2", "platform_machine": m, "sys_platform": "linux",
          "platform_system": "Linux", "os_name": "posix", "implementation_name": "cpython",
          "platform_python_implementation": "CPython"}
         for py in ("3.11",) for m in ("x86_64", "aarch64")]


def marker_may_hold(req: Requirement, extras: Iterable[str] = ("",)) -> bool:
    """Could req apply in some image (any of _ENVS, any of `extras`)? Unknown counts as yes."""
    if req.marker is None:
        return True
    for env in _ENVS:
        for extra in extras:
            try:
                if req.marker.evaluate({**env, "extra": extra}):
                    return True
            except (InvalidMarker, UndefinedComparison, UndefinedEnvironmentName):
                return True
    return False


def _one_line(s: str) -> str:
    return " ".join(str(s).split())


def unmet_requirements(requirements: Iterable[str], distributions: Mapping[str, str],
                       environment: Mapping[str, str] | None = None) -> list[str]:
    """Each requirement the distributions do not satisfy, as 'REQ (why)'; [] when all hold.

    distributions: name -> version as installed (names in any spelling: compared
    normalised, so scikit_learn is scikit-learn). environment: the image's PEP 508
    marker variables (what is missing comes from this process's). A requirement
    whose marker excludes the image is met; extras are not followed (the
    distribution itself must be there); pre-releases satisfy, as in `pip check`.
    """
    have = {canonicalize_name(n): v for n, v in distributions.items()}
    env = {**(environment or {}), "extra": ""}
    unmet = []
    for text in requirements:
        text = _one_line(text)
        if not text or text.startswith("#"):
            continue
        try:
            req = Requirement(text)
        except InvalidRequirement as err:
            unmet.append(f"{text} (not a valid requirement: {_one_line(str(err))[:80]})")
            continue
        if req.marker is not None:
            try:
                if not req.marker.evaluate(env):
                    continue
            except (UndefinedComparison, UndefinedEnvironmentName):
                pass  # cannot tell: check it
        version = have.get(canonicalize_name(req.name))
        if version is None:
            unmet.append(f"{text} (not installed)")
        elif req.specifier:
            try:
                ok = req.specifier.contains(Version(version), prereleases=True)
            except InvalidVersion:
                ok = False
            if not ok:
                unmet.append(f"{text} (image has {version})")
    return unmet


def inventory_from_labels(labels: Mapping[str, str] | None) -> dict | None:
    """{"distributions": {...}, "environment": {...}} from an image's labels, or None if it has none."""
    labels = labels or {}
    text = labels.get(LABEL_DISTS)
    if text is None:
        return None
    dists = {}
    for item in text.split(","):
        name, sep, version = item.strip().partition("==")
        if sep and name:
            dists[name] = version
    try:
        env = json.loads(labels.get(LABEL_ENV) or "{}")
    except json.JSONDecodeError:
        env = {}
    return {"distributions": dists, "environment": env if isinstance(env, dict) else {}}


def inventory_labels(inventory: Mapping) -> dict[str, str]:
    """The labels that carry an inventory (the inverse of inventory_from_labels)."""
    dists = inventory["distributions"]
    return {LABEL_DISTS: ",".join(f"{n}=={v}" for n, v in sorted(dists.items(), key=lambda kv: kv[0].lower())),
            LABEL_ENV: json.dumps(inventory.get("environment", {}), sort_keys=True, separators=(",", ":"))}


def app_requirements(specs: Iterable[AppSpec]) -> list[str]:
    """The requirements to install for these apps: their dependencies, deduplicated, without flotilla."""
    out: list[str] = []
    for spec in specs:
        for text in spec.dependencies:
            text = _one_line(text)
            if not text:
                continue
            try:
                req = Requirement(text)
            except InvalidRequirement as err:
                raise ValueError(f"app {spec.name!r} ({spec.dir}/pyproject.toml): dependency {text!r} is not a "
                                 f"valid PEP 508 requirement ({_one_line(str(err))})") from None
            if canonicalize_name(req.name) == "flotilla":
                continue  # the image is flotilla; its version is checked by the caller
            if text not in out:
                out.append(text)
    return out


# -- the pre-run check -------------------------------------------------------------

_INVENTORY_CACHE: dict[tuple[str | None, str], dict] = {}  # (docker host, image id) -> inventory


def _docker(docker_host: str | None) -> list[str]:
    return ["docker"] + (["-H", docker_host] if docker_host else [])


def image_inventory(image: str, docker_host: str | None = None) -> dict | None:
    """What the local image holds; None when the engine does not have the image (or answers nothing).

    From the labels when `flotilla images build --app` wrote them; else one
    `docker run --rm` of inventory.py (images built without --app, or by hand).
    """
    from flotilla.targets.base import TargetError

    docker = _docker(docker_host)
    try:
        res = subprocess.run([*docker, "image", "inspect", "-f", "{{.Id}} {{json .Config.Labels}}", image],
                             capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if res.returncode != 0 or not res.stdout.strip():
        return None
    image_id, _, labels = res.stdout.strip().partition(" ")
    key = (docker_host, image_id)
    if key in _INVENTORY_CACHE:
        return _INVENTORY_CACHE[key]
    try:
        inv = inventory_from_labels(json.loads(labels) if labels else None)
    except json.JSONDecodeError:
        inv = None
    if inv is None:
        src = (Path(__file__).with_name("inventory.py")).read_text()
        cmd = [*docker, "run", "--rm", "--network", "none", "--entrypoint", "python", image_id, "-c", src]
        try:
            run = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        except (OSError, subprocess.TimeoutExpired) as err:
            raise TargetError(f"cannot list the Python distributions in image {image} ({err}); "
                              f"rebuild it with `flotilla images build`") from None
        try:
            inv = json.loads(run.stdout.strip().splitlines()[-1])
        except (IndexError, json.JSONDecodeError):
            lines = (run.stderr or run.stdout).strip().splitlines()
            why = _one_line(lines[-1]) if lines else f"exit {run.returncode}"
            raise TargetError(f"cannot list the Python distributions in image {image} ({why[:200]}); "
                              f"rebuild it with `flotilla images build`") from None
    _INVENTORY_CACHE[key] = inv
    return inv


def _shown_path(p: Path) -> str:
    try:
        rel = os.path.relpath(p)
    except ValueError:
        return str(p)
    return rel if not rel.startswith("../..") else str(p)


def check_image_has_app(image: str, spec: AppSpec, docker_host: str | None = None) -> None:
    """TargetError (one line) naming each requirement of the app that the image does not satisfy.

    Nothing to check for the built-in app (its needs are flotilla's). An image
    the engine does not have locally is not checked: compose has already
    refused a missing local image; on swarm and k8s the image may live only in
    a registry, and pulling gigabytes to look inside is not a pre-run check.
    FLOTILLA_SKIP_APP_CHECK=1 skips it.
    """
    from flotilla.targets.base import TargetError

    if spec.builtin or not spec.dependencies or os.environ.get(SKIP_ENV) == "1":
        return
    inv = image_inventory(image, docker_host)
    if inv is None:
        return  # not in the local engine (or no engine): nothing cheap to look at
    problem = app_check_message(image, spec, inv)
    if problem:
        raise TargetError(problem)


def app_check_message(image: str, spec: AppSpec, inventory: Mapping) -> str | None:
    """The one-line complaint check_image_has_app raises for this inventory, or None when all is met."""
    from flotilla.images.build import default_image

    unmet = unmet_requirements(spec.dependencies, inventory.get("distributions", {}), inventory.get("environment"))
    if not unmet:
        return None
    tag = "" if image == default_image() else f" --tag {image}"
    return (f"image {image} lacks what app '{spec.name}' needs: {'; '.join(unmet)}; "
            f"build it with `flotilla images build --app {_shown_path(spec.dir)}{tag}`")
