"""A Flower App as its pyproject.toml declares it: components, run config (with types), dependencies.

Flotilla reads the app, never changes it: the run config it sends holds only
what the job sets, converted to the type the app declares
(`[tool.flwr.app.config]`), the way `flwr run --run-config` would be used by
hand with the right literals.
"""

from __future__ import annotations

import ast
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from flotilla.errors import UserError

BUILTIN_FAB = Path(__file__).parent / "app" / "fab"
ROUNDS_KEY = "num-server-rounds"


class AppError(UserError):
    """The app directory is not a usable Flower App; the message names the file and what to fix."""


def flatten(d: dict, prefix: str = "") -> dict:
    """Nested config tables as flwr flattens them: {"a": {"b": 1}} -> {"a.b": 1}."""
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out |= flatten(v, key + ".")
        else:
            out[key] = v
    return out


def _type_name(v) -> str:
    return {bool: "bool", int: "int", float: "float", str: "str"}.get(type(v), type(v).__name__)


@dataclass(frozen=True)
class AppSpec:
    dir: Path
    name: str
    publisher: str
    serverapp: str
    clientapp: str
    config: dict = field(default_factory=dict)  # declared run config: key -> default (its type is the contract)
    dependencies: tuple[str, ...] = ()
    builtin: bool = False

    @classmethod
    def load(cls, app_dir: str | Path, builtin: bool = False) -> "AppSpec":
        d = Path(app_dir)
        py = d / "pyproject.toml"
        try:
            doc = tomllib.loads(py.read_text())
        except FileNotFoundError:
            raise AppError(f"{d}: not a Flower App directory (no pyproject.toml)") from None
        except tomllib.TOMLDecodeError as err:
            raise AppError(f"{py}: not valid TOML ({err})") from None
        flwr = doc.get("tool", {}).get("flwr", {}).get("app", {})
        comps = flwr.get("components", {})
        missing = [k for k in ("serverapp", "clientapp") if not comps.get(k)]
        if missing:
            raise AppError(f"{py}: [tool.flwr.app.components] needs {' and '.join(missing)} "
                           '(e.g. serverapp = "mypkg.server_app:app")')
        project = doc.get("project", {})
        return cls(dir=d.resolve(), name=str(project.get("name", d.name)), publisher=str(flwr.get("publisher", "")),
                   serverapp=comps["serverapp"], clientapp=comps["clientapp"],
                   config=flatten(flwr.get("config", {})), dependencies=tuple(project.get("dependencies", [])),
                   builtin=builtin)

    def declares(self, key: str) -> bool:
        return key in self.config

    def typed(self, key: str, value, source: str):
        """`value` as the type the app declares for `key`; AppError naming `source` if it cannot be."""
        if key not in self.config:
            known = ", ".join(sorted(self.config)) or "none"
            raise AppError(f"{source}: the app does not declare {key!r} in [tool.flwr.app.config] "
                           f"(its keys: {known})")
        want = self.config[key]
        if isinstance(want, bool):
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in ("true", "false"):
                return value.lower() == "true"
        elif isinstance(want, int):
            if isinstance(value, int) and not isinstance(value, bool):
                return value
            if isinstance(value, float) and value.is_integer():
                return int(value)
        elif isinstance(want, float):
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                return float(value)
        elif isinstance(want, str):
            if isinstance(value, (str, int, float)) and not isinstance(value, bool):
                return str(value)
        else:
            return value
        raise AppError(f"{source}: the app declares {key} as {_type_name(want)} ({key} = {want!r}); "
                       f"got {value!r}")

    def module_files(self) -> list[Path]:
        return [p for p in self.dir.rglob("*.py") if ".venv" not in p.parts and "__pycache__" not in p.parts]

    def imports_flotilla(self) -> bool:
        """Does the app's own code import flotilla (e.g. to use Flotilla's strategy)?"""
        for p in self.module_files():
            try:
                tree = ast.parse(p.read_text(), str(p))
            except (SyntaxError, UnicodeDecodeError, OSError):
                continue
            for node in ast.walk(tree):
                names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                         else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
                if any(n == "flotilla" or n.startswith("flotilla.") for n in names):
                    return True
        return False


def builtin_app() -> AppSpec:
    return AppSpec.load(BUILTIN_FAB, builtin=True)
