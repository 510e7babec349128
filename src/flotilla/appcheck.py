"""Does the user's app import? Checked where the CLI validates a job, before anything starts.

Both components of a user's Flower App (`[tool.flwr.app.components]`) are imported in ONE short-lived child
process (`python -m flotilla.appcheck`: the app directory first on sys.path and as the working directory,
telemetry off, no bytecode written into the app, a timeout), so that neither torch & co nor the app's
import side effects end up in the driver. The child resolves each `module:attribute` reference, checks that
it is a flwr ServerApp / ClientApp, and reports in a JSON file; the driver turns a problem into AppError
(exit 2) with one line that starts with the app's pyproject.toml and the component, and names the file and
line, the missing module or the reference.

Which problems refuse depends on where the app will run:
- target local: the devices import the app with this machine's Python, so everything refuses: syntax errors,
  modules that are not installed, references that do not resolve, exceptions raised at import.
- container targets (compose, swarm, k8s): the devices and the ServerApp import the app in the image, where
  its dependencies live (checked against the image's labels). Here only what the app's own files decide
  refuses: syntax errors, references that do not resolve (a module of the app that does not exist, a missing
  attribute, an object that is not a ServerApp/ClientApp). What the import raises in this environment (a
  module not installed here, a device-only file or variable) is not held against the app: the component
  modules are then checked without importing them (parsed, and the attribute looked for).

The built-in app is not checked (it is flotilla's). FLOTILLA_SKIP_IMPORT_CHECK=1 turns the check off.
A check that does not end within TIMEOUT_S (an app that downloads data at import) lets the run go, with a note.
"""

from __future__ import annotations

import ast
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SKIP_ENV = "FLOTILLA_SKIP_IMPORT_CHECK"
TIMEOUT_S = 120.0  # a cold start (torch from a cold page cache) measured ~22 s; a warm one ~2 s
# Targets whose devices and ServerApp import the app with this machine's Python and packages.
SAME_ENVIRONMENT_TARGETS = frozenset({"local"})
EXPECTED = {"serverapp": "ServerApp", "clientapp": "ClientApp"}
_CLASSES = {"serverapp": ("flwr.serverapp", "ServerApp"), "clientapp": ("flwr.clientapp", "ClientApp")}
_MSG_MAX = 300


# -- the driver's side ------------------------------------------------------------------------------

def check_app_imports(spec, target: str, timeout: float = TIMEOUT_S) -> str | None:
    """Raise AppError (one line) when the app's ServerApp or ClientApp cannot be imported and resolved for a run
    on `target`. Returns a note when the check could not conclude (it timed out), else None."""
    from flotilla.appspec import AppError

    if spec.builtin or os.environ.get(SKIP_ENV, "") not in ("", "0"):
        return None
    app_dir = Path(spec.dir).resolve()
    refs = {"serverapp": spec.serverapp, "clientapp": spec.clientapp}
    head = {kind: f'{app_dir / "pyproject.toml"}: {kind} = "{ref}"' for kind, ref in refs.items()}
    for kind, ref in refs.items():
        module, _, attr = ref.partition(":")
        if not module or not attr or not all(p.isidentifier() for p in [*module.split("."), *attr.split(".")]):
            raise AppError(f'{head[kind]}: not a reference of the form <module>:<attribute> (e.g. "mypkg.{kind}:app")')
    same_env = target in SAME_ENVIRONMENT_TARGETS
    results, note, crash = _import_in_child(app_dir, refs, timeout)
    if crash and same_env:
        raise AppError(f"{app_dir / 'pyproject.toml'}: importing the app's serverapp and clientapp ended Python "
                       f"abnormally ({crash})")
    for kind, ref in refs.items():
        res = (results or {}).get(kind, {"error": "inconclusive"})
        problem = _problem(app_dir, kind, ref, res, same_env)
        if problem:
            raise AppError(f"{head[kind]}{problem}")
    return note


def _import_in_child(app_dir: Path, refs: dict, timeout: float) -> tuple[dict | None, str | None, str | None]:
    """(each component's result, a note when it timed out, why the child ended without a report)."""
    env = os.environ | {"FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1", "PYTHONDONTWRITEBYTECODE": "1"}
    with tempfile.TemporaryDirectory(prefix="flotilla-appcheck-") as tmp:
        report, output = Path(tmp) / "report.json", Path(tmp) / "output"
        arg = json.dumps({"dir": str(app_dir), "components": refs, "report": str(report)})
        with open(output, "wb") as out:  # what the app prints at import: only read when the child crashed
            proc = subprocess.Popen([sys.executable, "-m", "flotilla.appcheck", arg], cwd=app_dir, env=env,
                                    stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                    start_new_session=True)
        ended = _wait_unreaped(proc.pid, timeout)
        _kill_group(proc.pid)  # whatever the app started at import goes with it (the unreaped child holds the id)
        proc.wait()
        if not ended:
            return None, (f"importing the app's components took over {timeout:g}s, so they were not checked "
                          f"({SKIP_ENV}=1 skips the check)"), None
        try:
            return json.loads(report.read_text()), None, None
        except (OSError, ValueError):
            last = [ln.strip() for ln in output.read_text(errors="replace").splitlines() if ln.strip()]
            return None, None, f"exit code {proc.returncode}" + (f": {_clip(last[-1])}" if last else "")


def _wait_unreaped(pid: int, timeout: float) -> bool:
    """Wait until the child has ended, leaving it a zombie (so its process group id cannot be reused yet)."""
    deadline = time.monotonic() + timeout
    delay = 0.005
    while True:
        if os.waitid(os.P_PID, pid, os.WEXITED | os.WNOWAIT | os.WNOHANG) is not None:
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(delay)
        delay = min(delay * 2, 0.05)


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _problem(app_dir: Path, kind: str, ref: str, res: dict, same_env: bool, static: bool = False) -> str | None:
    """The rest of the one-line message (after `<pyproject>: <kind> = "<ref>"`), or None when it is fine."""
    module, _, attr = ref.partition(":")
    err = res.get("error")
    if err is None:
        return None
    where = _where(res)
    if err == "syntax":
        return f" cannot be imported: {where}: {res.get('type') or 'SyntaxError'}: {res.get('msg')}"
    if err == "attribute":
        return f": {_no_attribute(kind, res)}"
    if err == "type":
        return f": {module}:{attr} is {res.get('got')}, not a flwr {EXPECTED[kind]}{_candidates(kind, res)}"
    missing = res.get("name") if err == "import" else None
    if missing and _in_app(app_dir, missing):  # the app's own code: the same wherever it runs
        if res.get("type") != "ModuleNotFoundError":
            return f" cannot be imported: {where}: {res.get('type')}: {res.get('msg')}"
        if _is_ref_module(module, missing) and not res.get("file"):
            return f": the app has no module {missing} (no {_module_path(missing)} in {app_dir})"
        return (f" cannot be imported: {where} imports {missing}, which is not in the app "
                f"(no {_module_path(missing)} in {app_dir})")
    if same_env and err in ("import", "raised"):
        if missing and res.get("type") == "ModuleNotFoundError":
            if _is_ref_module(module, missing) and not res.get("file"):
                return (f": no module {missing}, neither in the app directory ({app_dir}) nor installed; "
                        "fix the reference, or install the package that provides it")
            how = f"{where} imports {missing}" if res.get("direct", True) else \
                f"{where} imports a module that needs {missing}"
            return (f" cannot be imported: {how}, which is not installed here; install it "
                    f"(pip install {missing.split('.')[0]}) in the environment flotilla runs in ({sys.prefix})")
        return f" cannot be imported: {where}: {res.get('type')}: {res.get('msg')}"
    if static:
        return None
    # a container target and a failure that depends on this environment, or no answer: what the files say
    found = _static_check(app_dir, module, attr)
    return _problem(app_dir, kind, ref, found, same_env, static=True) if found else None


def _where(res: dict) -> str:
    f, line = res.get("file"), res.get("line")
    if not f:
        return "the app"
    return f"{f}:{line}" if line else f


def _no_attribute(kind: str, res: dict) -> str:
    owner = res.get("owner") or "the module"
    return f"{owner} has no attribute {res.get('missing')!r}{_candidates(kind, res)}"


def _candidates(kind: str, res: dict) -> str:
    names = res.get("candidates") or []
    if not names:
        return (f" (create one: `app = {EXPECTED[kind]}()` from {_CLASSES[kind][0]}, and point {kind} at it)"
                if res.get("error") == "type" else "")
    return f" (its {EXPECTED[kind]}: {', '.join(repr(n) for n in names)})"


def _is_ref_module(module: str, missing: str) -> bool:
    return module == missing or module.startswith(missing + ".")


def _module_path(module: str) -> str:
    return module.replace(".", "/") + ".py"


def _in_app(app_dir: Path, module: str) -> bool:
    """Is `module` (dotted) one of the app's own (its top-level package or module is in the app directory)?"""
    top = module.split(".")[0]
    return (app_dir / top).is_dir() or (app_dir / f"{top}.py").is_file()


def _module_file(app_dir: Path, module: str) -> Path | None:
    base = app_dir.joinpath(*module.split("."))
    for p in (base.with_name(base.name + ".py"), base / "__init__.py"):
        if p.is_file():
            return p
    return None


def _static_check(app_dir: Path, module: str, attr: str) -> dict | None:
    """Without importing: the app's package files parse, and the component's module defines the attribute's first
    name (lenient: any name bound anywhere in the module, star imports and a module __getattr__ accept)."""
    top = module.split(".")[0]
    files = [app_dir / f"{top}.py"] if (app_dir / f"{top}.py").is_file() else sorted(
        p for p in (app_dir / top).rglob("*.py") if "__pycache__" not in p.parts and ".venv" not in p.parts)
    trees = {}
    for p in files:
        try:
            trees[p] = ast.parse(p.read_bytes(), str(p))
        except SyntaxError as e:
            return {"error": "syntax", "type": type(e).__name__, "msg": e.msg, "file": _rel(app_dir, p), "line": e.lineno}
        except (OSError, ValueError):
            continue
    mod_file = _module_file(app_dir, module)
    if mod_file is None:
        if _in_app(app_dir, module):
            return {"error": "import", "type": "ModuleNotFoundError", "name": module}
        return None  # a module from outside the app: nothing here to read
    tree = trees.get(mod_file)
    if tree is None:
        return None
    first = attr.split(".")[0]
    if first in _bound_names(tree) or "*" in _bound_names(tree) or "__getattr__" in _bound_names(tree):
        return None
    return {"error": "attribute", "owner": f"module {module}", "missing": first}


def _bound_names(tree: ast.AST) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            names.add(node.id)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            for a in node.names:
                names.add(a.asname or a.name.split(".")[0])
        elif isinstance(node, ast.Global):
            names.update(node.names)
    return names


def _rel(app_dir: Path, p: str | Path | None) -> str | None:
    if not p:
        return None
    try:
        return str(Path(p).resolve().relative_to(app_dir))
    except (ValueError, OSError):
        return str(p)


def _clip(s: str) -> str:
    s = " ".join(str(s).split())
    return s if len(s) <= _MSG_MAX else s[: _MSG_MAX - 1] + "…"


# -- the child's side (stdlib only until the app is imported) ------------------------------------------

def _in_app_frame(app_dir: Path, filename: str) -> bool:
    if not os.path.isabs(filename):  # "<frozen importlib._bootstrap>", "<string>"
        return False
    try:
        rel = Path(filename).resolve().relative_to(app_dir)
    except (ValueError, OSError):
        return False
    return ".venv" not in rel.parts and "site-packages" not in rel.parts


def _last_app_frame(app_dir: Path, exc: BaseException) -> tuple[str | None, int | None, str]:
    """The app's file, line and source line the exception came through last (None, None, "" if none)."""
    import traceback

    for fr in reversed(traceback.extract_tb(exc.__traceback__)):
        if _in_app_frame(app_dir, fr.filename):
            return _rel(app_dir, fr.filename), fr.lineno, fr.line or ""
    return None, None, ""


def _describe(obj) -> str:
    import inspect

    if inspect.isfunction(obj) or inspect.isbuiltin(obj):
        return "a function"
    if inspect.isclass(obj):
        return f"the class {obj.__name__} (not an instance of it)" if obj.__name__ in EXPECTED.values() \
            else f"a class ({obj.__name__})"
    if inspect.ismodule(obj):
        return "a module"
    return f"a {type(obj).__name__}"


def _check_component(app_dir: Path, kind: str, ref: str) -> dict:
    import importlib

    module, _, attr = ref.partition(":")
    try:
        obj = importlib.import_module(module)
    except SyntaxError as e:  # IndentationError, TabError too
        return {"error": "syntax", "type": type(e).__name__, "msg": _clip(e.msg), "file": _rel(app_dir, e.filename),
                "line": e.lineno}
    except ImportError as e:  # ModuleNotFoundError: a module that is nowhere; ImportError: a name it lacks
        f, line, src = _last_app_frame(app_dir, e)
        direct = not src or not e.name or e.name.split(".")[0] in src  # that line imports it, or another that does
        return {"error": "import", "type": type(e).__name__, "name": e.name, "msg": _clip(str(e)), "file": f,
                "line": line, "direct": direct}
    except BaseException as e:  # noqa: B036 - SystemExit at import too
        f, line, _ = _last_app_frame(app_dir, e)
        return {"error": "raised", "type": type(e).__name__, "msg": _clip(str(e)) or "(no message)", "file": f,
                "line": line}
    owner, path = f"module {module}", module
    for part in attr.split("."):
        try:
            nxt = getattr(obj, part)
        except AttributeError:
            return {"error": "attribute", "owner": owner, "missing": part, "candidates": _of_kind(obj, kind)}
        except BaseException as e:  # noqa: B036 - a module __getattr__ that raises
            f, line, _ = _last_app_frame(app_dir, e)
            return {"error": "raised", "type": type(e).__name__, "msg": _clip(str(e)), "file": f, "line": line}
        obj, path = nxt, f"{path}.{part}"
        owner = path
    mod_name, cls_name = _CLASSES[kind]
    cls = getattr(importlib.import_module(mod_name), cls_name)
    if not isinstance(obj, cls):
        return {"error": "type", "got": _describe(obj), "candidates": _of_kind(importlib.import_module(module), kind)}
    return {}


def _of_kind(obj, kind: str) -> list[str]:
    import importlib

    try:
        mod_name, cls_name = _CLASSES[kind]
        cls = getattr(importlib.import_module(mod_name), cls_name)
        return sorted(n for n, v in vars(obj).items() if isinstance(v, cls))[:3]
    except Exception:  # noqa: BLE001 - only a hint
        return []


def _child(arg: str) -> None:
    req = json.loads(arg)
    app_dir = Path(req["dir"]).resolve()
    sys.path.insert(0, str(app_dir))
    os.chdir(app_dir)
    report = {}
    for kind, ref in req["components"].items():
        try:
            report[kind] = _check_component(app_dir, kind, ref)
        except BaseException as e:  # noqa: B036 - the check itself must report, whatever happens
            report[kind] = {"error": "raised", "type": type(e).__name__, "msg": _clip(str(e))}
    Path(req["report"]).write_text(json.dumps(report))
    os._exit(0)  # no atexit handlers, no waiting for threads the app started


if __name__ == "__main__":
    _child(sys.argv[1])
