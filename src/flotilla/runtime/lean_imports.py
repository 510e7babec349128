"""Modules a device's processes import and never use, deferred until something uses them.

Every MiB a device's SuperNode and SuperExec hold is a MiB its app cannot
have (a small device's limit counts them all). Measured, fresh processes,
flwr 1.42: the SuperNode imports SQLAlchemy and alembic (with mako) through
`flwr.supercore.object_store`, whose factory imports `SqlObjectStore` at
module level though a SuperNode keeps its objects in memory; the SuperExec
imports the same through `flwr.supercore.cli`, whose package imports the
`flwr-agentapp`, `flwr-connector` and `flwr-model` entry points beside the
`flower-superexec` it runs. Deferring them: SuperNode 94 -> 66 MiB, SuperExec
91 -> 58 MiB of anonymous memory.

Each deferred name is a stand-in that imports the real module the first
time it is called, so a process that does use it (a database, another
entry point) gets the real thing, only later. Installed before flwr is
imported (in the device's processes and the shared fleet's zygote); where
a module is imported already, or FLOTILLA_LEAN_IMPORTS=0, nothing changes.
"""

from __future__ import annotations

import importlib
import os
import sys
import types

LEAN_ENV = "FLOTILLA_LEAN_IMPORTS"

# module -> the names other modules import from it (each only ever called)
DEFERRED: dict[str, tuple[str, ...]] = {
    "flwr.supercore.object_store.sql_object_store": ("SqlObjectStore",),
    "flwr.supercore.cli.flwr_agentapp": ("flwr_agentapp",),
    "flwr.supercore.cli.flwr_connector": ("flwr_connector",),
    "flwr.supercore.cli.flwr_model": ("flwr_model",),
}
_STUB_MARK = "__flotilla_deferred__"


def _real(module: str) -> types.ModuleType:
    if getattr(sys.modules.get(module), _STUB_MARK, False):
        del sys.modules[module]
    return importlib.import_module(module)


class _Deferred:
    """Stands in for a callable (a class or a function) of a module not imported yet."""

    def __init__(self, module: str, name: str) -> None:
        self._module, self._name = module, name

    def __call__(self, *args, **kwargs):
        return getattr(_real(self._module), self._name)(*args, **kwargs)

    def __repr__(self) -> str:
        return f"<deferred {self._module}.{self._name}>"


def defer_unused_imports() -> list[str]:
    """Install the stand-ins; returns the modules deferred (none where disabled or already imported)."""
    if os.environ.get(LEAN_ENV, "1") == "0":
        return []
    done = []
    for module, names in DEFERRED.items():
        if module in sys.modules:
            continue
        stub = types.ModuleType(module, f"(deferred by flotilla.runtime.lean_imports; the real {module} is "
                                        "imported when first used)")
        setattr(stub, _STUB_MARK, True)
        for name in names:
            setattr(stub, name, _Deferred(module, name))
        sys.modules[module] = stub
        done.append(module)
    return done
