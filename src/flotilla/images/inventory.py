"""What Python distributions an image's venv holds, and its marker environment, as one JSON line.

Run inside an image: `python -m flotilla.images.inventory`. `flotilla images
build --app` runs it at the end of the build (/opt/flotilla/distributions.json)
and copies the result into the image's labels, so the pre-run dependency check
reads `docker image inspect`, no container. For images without those labels
the check runs this file's source with `python -c` (it imports only the
standard library, so it works in images built before it existed).
"""

import importlib.metadata
import json
import os
import platform
import sys


def _version(info) -> str:
    v = f"{info.major}.{info.minor}.{info.micro}"
    return v if info.releaselevel == "final" else f"{v}{info.releaselevel[0]}{info.serial}"


def inventory() -> dict:
    # PEP 508 marker variables, as packaging.markers.default_environment() computes them
    # (minus platform_release/platform_version: at build time those describe the build host's kernel).
    env = {
        "implementation_name": sys.implementation.name,
        "implementation_version": _version(sys.implementation.version),
        "os_name": os.name,
        "platform_machine": platform.machine(),
        "platform_python_implementation": platform.python_implementation(),
        "platform_system": platform.system(),
        "python_full_version": platform.python_version(),
        "python_version": ".".join(platform.python_version_tuple()[:2]),
        "sys_platform": sys.platform,
    }
    dists = {}
    for d in importlib.metadata.distributions():
        name = d.metadata["Name"]
        if name:
            dists.setdefault(name, d.version)  # the first on sys.path wins, as for imports
    return {"environment": env, "distributions": dict(sorted(dists.items(), key=lambda kv: kv[0].lower()))}


if __name__ == "__main__":
    print(json.dumps(inventory(), sort_keys=True))
