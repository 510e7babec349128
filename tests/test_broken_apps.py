"""A user's Flower App that does not import is bad input: exit 2, one line naming the file, nothing started.

Each broken app is tests/apps/msg_numpy with one thing broken. `flotilla run` and `flotilla validate` refuse
it before a run record, a SuperLink or a device exists (flotilla.appcheck imports both components in a child
process). On container targets a module missing on this machine is not held against the app (its
dependencies live in the image), but what its files decide (syntax, references) still is.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from conftest import processes_of
from flotilla.appcheck import SKIP_ENV, check_app_imports
from flotilla.appspec import AppError, AppSpec, builtin_app

MSG_NUMPY = Path(__file__).parent / "apps" / "msg_numpy"
FLOTILLA_BIN = Path(sys.executable).parent / "flotilla"
MISSING = "flotilla_test_no_such_module"


def copy_app(tmp_path: Path, name: str = "app") -> Path:
    dst = tmp_path / name
    shutil.copytree(MSG_NUMPY, dst, ignore=shutil.ignore_patterns("__pycache__"))
    return dst


def edit(path: Path, old: str, new: str) -> int:
    """Replace `old` (once) in `path`; the 1-based line where it was."""
    text = path.read_text()
    assert text.count(old) == 1, old
    path.write_text(text.replace(old, new))
    return text[: text.index(old)].count("\n") + 1


def syntax_error(app: Path) -> list[str]:
    line = edit(app / "msgnumpy" / "client_app.py", "def train(msg: Message, context: Context):",
                "def train(msg: Message, context: Context)")
    return ['pyproject.toml: clientapp = "msgnumpy.client_app:app"', f"msgnumpy/client_app.py:{line}",
            "SyntaxError: expected ':'"]


def missing_module(app: Path) -> list[str]:
    line = edit(app / "msgnumpy" / "server_app.py", "from msgnumpy.task import get_initial_model",
                f"import {MISSING}\nfrom msgnumpy.task import get_initial_model")
    return ['pyproject.toml: serverapp = "msgnumpy.server_app:app"', f"msgnumpy/server_app.py:{line} imports {MISSING}",
            f"pip install {MISSING}"]


def missing_attribute(app: Path) -> list[str]:
    edit(app / "pyproject.toml", 'clientapp = "msgnumpy.client_app:app"', 'clientapp = "msgnumpy.client_app:no_app"')
    return ['pyproject.toml: clientapp = "msgnumpy.client_app:no_app"',
            "module msgnumpy.client_app has no attribute 'no_app' (its ClientApp: 'app')"]


def not_a_clientapp(app: Path) -> list[str]:
    edit(app / "pyproject.toml", 'clientapp = "msgnumpy.client_app:app"', 'clientapp = "msgnumpy.client_app:train"')
    return ['pyproject.toml: clientapp = "msgnumpy.client_app:train"',
            "msgnumpy.client_app:train is a function, not a flwr ClientApp"]


BREAKS = [syntax_error, missing_module, missing_attribute, not_a_clientapp]


def write_job(tmp_path: Path, app: Path) -> Path:
    doc = {"name": "broken", "app": os.path.relpath(app, tmp_path), "rounds": 1, "strategy": {"min_devices": 2},
           "devices": [{"name": "dev", "count": 2, "cpus": 1.0, "memory": "1g"}], "runs_dir": "runs"}
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump(doc))
    return job


def cli(*args, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([str(FLOTILLA_BIN), *map(str, args)], capture_output=True, text=True, cwd="/",
                          timeout=300, env={**os.environ, **(env or {})})


def refused(res: subprocess.CompletedProcess, app: Path, expected: list[str]) -> str:
    """Exit 2 and one line on stderr that starts with the app's pyproject.toml and holds every `expected`."""
    assert res.returncode == 2, res.stderr
    assert "Traceback" not in res.stderr and res.stdout == ""
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, res.stderr
    line = lines[0]
    assert line.startswith(f"error: {app}/pyproject.toml: "), line
    for part in expected:
        assert part in line, (part, line)
    return line


@pytest.mark.parametrize("brk", BREAKS, ids=lambda f: f.__name__)
def test_broken_app_is_refused_before_anything_starts(tmp_path, brk):
    app = copy_app(tmp_path)
    expected = brk(app)
    job = write_job(tmp_path, app)
    t0 = time.time()
    line = refused(cli("run", job), app, expected)
    assert time.time() - t0 < 60
    assert not (tmp_path / "runs").exists()  # no run record: no state, no processes recorded
    assert processes_of(tmp_path) == []  # no SuperLink, no device, and the check's own process is gone
    assert not list(app.rglob("__pycache__"))  # the check writes nothing into the app
    # validate says the same, word for word
    assert refused(cli("validate", job), app, expected) == line


def test_container_targets_leave_missing_modules_to_the_image(tmp_path):
    """compose/swarm/k8s import the app in the image, where its dependencies are: a module missing here is no
    reason to refuse; a syntax error or a reference that does not resolve is one wherever the app runs."""
    app = copy_app(tmp_path)
    expected = missing_module(app)
    job, out = write_job(tmp_path, app), tmp_path / "rendered"
    res = cli("render", job, "--target", "compose", "-o", out)
    assert res.returncode == 0, res.stderr
    assert (out / "compose.yaml").is_file()
    refused(cli("render", job, "--target", "local", "-o", tmp_path / "local"), app, expected)
    assert not (tmp_path / "local").exists()

    for brk in (syntax_error, not_a_clientapp):
        shutil.rmtree(app)
        copy_app(tmp_path)
        expected = brk(app)
        refused(cli("render", job, "--target", "compose", "-o", tmp_path / brk.__name__), app, expected)


def test_container_target_still_reads_what_it_could_not_import(tmp_path):
    """Past a module missing here, the component's files are still read: the attribute, and their syntax."""
    app = copy_app(tmp_path)
    missing_module(app)
    assert check_app_imports(AppSpec.load(app), "compose") is None
    edit(app / "msgnumpy" / "server_app.py", "app = ServerApp()", "server = ServerApp()")
    with pytest.raises(AppError, match=r'serverapp = "msgnumpy.server_app:app": module msgnumpy.server_app has '
                                       r"no attribute 'app'$"):
        check_app_imports(AppSpec.load(app), "k8s")
    edit(app / "msgnumpy" / "server_app.py", "server = ServerApp()", "app = ServerApp()")
    line = edit(app / "msgnumpy" / "task.py", "def _softmax(logits):", "def _softmax(logits:")
    with pytest.raises(AppError, match=rf"cannot be imported: msgnumpy/task.py:{line}: SyntaxError"):
        check_app_imports(AppSpec.load(app), "swarm")


def test_a_module_of_the_app_that_does_not_exist_is_refused_everywhere(tmp_path):
    app = copy_app(tmp_path)
    edit(app / "pyproject.toml", 'clientapp = "msgnumpy.client_app:app"', 'clientapp = "msgnumpy.clientapp:app"')
    for target in ("local", "compose"):
        with pytest.raises(AppError) as err:
            check_app_imports(AppSpec.load(app), target)
        assert str(err.value) == (f'{app}/pyproject.toml: clientapp = "msgnumpy.clientapp:app": the app has no module '
                                  f"msgnumpy.clientapp (no msgnumpy/clientapp.py in {app})")


def test_an_exception_at_import_names_its_type_and_the_app_line(tmp_path):
    app = copy_app(tmp_path)
    text = (app / "msgnumpy" / "task.py").read_text()
    (app / "msgnumpy" / "task.py").write_text(text + 'raise RuntimeError("no data here\\nsecond line")\n')
    line = text.count("\n") + 1
    with pytest.raises(AppError) as err:
        check_app_imports(AppSpec.load(app), "local")
    assert str(err.value) == (f'{app}/pyproject.toml: serverapp = "msgnumpy.server_app:app" cannot be imported: '
                              f"msgnumpy/task.py:{line}: RuntimeError: no data here second line")
    # in the image it may well work (its files, its environment): the files themselves are fine
    assert check_app_imports(AppSpec.load(app), "compose") is None


def test_escape_hatch_and_the_builtin_app(tmp_path, monkeypatch):
    app = copy_app(tmp_path)
    syntax_error(app)
    res = cli("validate", write_job(tmp_path, app), env={SKIP_ENV: "1"})
    assert res.returncode == 0, res.stderr
    # the built-in app is flotilla's own: never imported to check it
    monkeypatch.setattr(subprocess, "Popen", lambda *a, **k: pytest.fail("the built-in app was imported"))
    assert check_app_imports(builtin_app(), "local") is None


def test_healthy_app_passes_quickly(tmp_path):
    t0 = time.perf_counter()
    assert check_app_imports(AppSpec.load(MSG_NUMPY), "local") is None
    took = time.perf_counter() - t0
    assert took < 30, took  # ~0.5 s here: one child process imports flwr and both components
    res = cli("validate", write_job(tmp_path, MSG_NUMPY))
    assert res.returncode == 0, res.stderr
    assert res.stdout.splitlines()[0].startswith("dev-1: cpus=1.0") and res.stderr == ""
