"""flwr is pinned to the version Flotilla's runtime was checked on, and every private name it uses is there."""

import tomllib
from importlib.metadata import version
from pathlib import Path

from flotilla.runtime.flwr_names import FLWR_CHECKED, NAMES, missing

ROOT = Path(__file__).resolve().parents[1]


def test_pyproject_pins_the_flwr_the_runtime_was_checked_on():
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert f"flwr=={FLWR_CHECKED}" in deps, "pin flwr exactly: the engine patches were checked on one version"


def test_installed_flwr_is_the_checked_one():
    assert version("flwr") == FLWR_CHECKED, (
        f"flwr {version('flwr')} is installed, the runtime was checked on {FLWR_CHECKED}: re-check every name in "
        "flotilla/runtime/flwr_names.py (and the patches using them), then move the pin")


def test_every_private_name_the_runtime_uses_exists():
    assert missing() == []
    assert len(NAMES) >= 30
