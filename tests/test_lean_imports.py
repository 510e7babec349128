"""A device's SuperNode and SuperExec do not import what they never use; whoever uses it still gets it."""

import subprocess
import sys

CODE = """
import sys
from flotilla.runtime.lean_imports import defer_unused_imports
deferred = defer_unused_imports()
import flwr.supernode.start_client_internal, flwr.supernode.main, flwr.supercore.superexec.run_superexec
import flwr.supercore.cli
print(len(deferred), 'sqlalchemy' in sys.modules, 'alembic' in sys.modules)
from flwr.supercore.object_store import ObjectStoreFactory
store = ObjectStoreFactory(database=sys.argv[1]).store()  # a database after all: the real SqlObjectStore
print(type(store).__module__, type(store).__name__, 'sqlalchemy' in sys.modules)
"""


def _run(tmp_path, env_extra=None):
    import os

    res = subprocess.run([sys.executable, "-c", CODE, str(tmp_path / "state.db")], capture_output=True, text=True,
                         env=os.environ | (env_extra or {}), timeout=120)
    assert res.returncode == 0, res.stderr[-3000:]
    return res.stdout.split("\n")


def test_a_device_runtime_imports_no_sql_until_a_database_is_used(tmp_path):
    first, second = _run(tmp_path)[:2]
    assert first == "4 False False"
    assert second == "flwr.supercore.object_store.sql_object_store SqlObjectStore True"


def test_the_switch_imports_everything_as_flwr_does(tmp_path):
    assert _run(tmp_path, {"FLOTILLA_LEAN_IMPORTS": "0"})[0] == "0 True True"
