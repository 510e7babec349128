"""Preload the user's ClientApp module into the device's fork server.

A ClientApp process normally starts Python, imports flwr, then the app and
everything it imports (torch, scikit-learn): seconds per message, tens of
seconds inside a small CPU quota. The fork server imports the app once
(`FLOTILLA_PRELOAD_APP`: an app directory with its pyproject.toml), so each
message's ClientApp is a fork that finds the module, and its imports,
already in memory; flwr's loader reuses a module already in sys.modules.

The preloaded module comes from the app directory the device was given, the
ClientApp's code from the FAB Flower delivers. `forget_if_changed` compares
the two and drops the preloaded modules when the FAB's files differ (the
user edited the app since the device started), so a fork never runs stale
code; it then imports the FAB's code itself, as flwr would.
"""

from __future__ import annotations

import importlib
import json
import os
import sys
import time
import tomllib
from pathlib import Path

PRELOAD_ENV = "FLOTILLA_PRELOAD_APP"
READY_FILE_ENV = "FLOTILLA_READY_FILE"  # written once the device can serve messages at full speed
PRELOADED: dict[str, Path] = {}  # module name -> its file, for modules loaded from the app directory
APP_DIR: Path | None = None


def clientapp_ref(app_dir: Path) -> str:
    """The app's ClientApp reference as its pyproject.toml declares it ("module:attribute")."""
    doc = tomllib.loads((Path(app_dir) / "pyproject.toml").read_text())
    return doc["tool"]["flwr"]["app"]["components"]["clientapp"]


def clientapp_module(app_dir: Path) -> str:
    return clientapp_ref(app_dir).partition(":")[0]


def load_component(ref: str):
    """The object a "module:attribute" reference names (the module imported, or found preloaded)."""
    module, _, attr = ref.partition(":")
    obj = importlib.import_module(module)
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj


def preload(app_dir: str | None = None) -> str | None:
    """Import the app's ClientApp module (in the fork server). Returns its name, or None (with a reason printed)."""
    global APP_DIR
    app_dir = app_dir or os.environ.get(PRELOAD_ENV)
    if not app_dir:
        return None
    d = Path(app_dir).resolve()
    t0 = time.perf_counter()
    try:
        module = clientapp_module(d)
        if str(d) not in sys.path:
            sys.path.insert(0, str(d))
        importlib.import_module(module)
    except Exception as err:  # noqa: BLE001 - a broken preload must not stop the device: forks import it later
        print(f"flotilla: could not preload the ClientApp from {d} ({type(err).__name__}: {err}); "
              "each ClientApp imports it itself", file=sys.stderr, flush=True)
        mark_ready(f"preload failed: {type(err).__name__}")
        return None
    APP_DIR = d
    for name, mod in list(sys.modules.items()):
        f = getattr(mod, "__file__", None)
        if f and Path(f).resolve().is_relative_to(d):
            PRELOADED[name] = Path(f).resolve()
    warmed = warm_up_frameworks()
    seconds = time.perf_counter() - t0
    print(f"flotilla: preloaded ClientApp module {module} ({len(PRELOADED)} app modules"
          + (f"; warmed up {', '.join(warmed)}" if warmed else "") + f") in {seconds:.1f} s",
          file=sys.stderr, flush=True)
    mark_ready(f"preloaded {module} in {seconds:.1f} s")
    return module


def mark_ready(what: str, **details) -> None:
    """Tell the driver this device is warm (the fleet starts once every device is): FLOTILLA_READY_FILE, one
    JSON object {"t", "what", **details} (the built-in trainer adds its capability: see read_ready)."""
    path = os.environ.get(READY_FILE_ENV)
    if not path:
        return
    try:
        tmp = f"{path}.tmp"
        with open(tmp, "w") as fh:
            json.dump({"t": round(time.time(), 3), "what": what, **details}, fh)
        os.replace(tmp, path)
    except OSError as err:
        print(f"flotilla: could not write {path}: {err}", file=sys.stderr, flush=True)


def read_ready(path: Path) -> dict | None:
    """A device's ready file (mark_ready), or None while it is not ready (or was written by an older one)."""
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) else None


THREADS_ENV = "FLOTILLA_THREADS"  # a device's compute threads (its CPU quota), for the app's frameworks


def warm_up_frameworks() -> list[str]:
    """Run the lazy first-use paths of the frameworks the app imported, once, in the fork server.

    PyTorch imports and initialises much on the first optimizer step and backward
    pass (measured: a quickstart CNN's first local epoch took 1.4-2.0 s in a fresh
    fork, 0.05 s in a fork of a warmed process). Done here once, every fork
    inherits it. Single-threaded, so no thread pool exists when the server forks.
    """
    warmed = []
    if "torch" in sys.modules:
        try:
            import torch

            torch.set_num_threads(1)
            model = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.ReLU(), torch.nn.Flatten(),
                                        torch.nn.Linear(8, 2))
            x, y = torch.zeros(4, 1, 4, 4), torch.zeros(4, dtype=torch.long)
            loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=2)
            for opt in (torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9),
                        torch.optim.Adam(model.parameters(), lr=0.01)):
                for xb, yb in loader:
                    opt.zero_grad()
                    torch.nn.functional.cross_entropy(model(xb), yb).backward()
                    opt.step()
            with torch.no_grad():
                model.eval()(x)
            warmed.append("torch")
        except Exception as err:  # noqa: BLE001 - a failed warm-up only costs the forks some time
            print(f"flotilla: torch warm-up failed ({err}); forks pay its first-use costs", file=sys.stderr)
    return warmed


def reseed() -> None:
    """In a ClientApp fork: fresh random state, as a new process would have.

    Every fork starts from its server's state, so without this each message
    would draw the same numbers (a DataLoader's shuffle order, dropout masks,
    numpy's global RandomState) round after round. Python's `random` reseeds
    itself after a fork; numpy's global state and torch's default generator do not.
    """
    if "numpy" in sys.modules:
        sys.modules["numpy"].random.seed()
    if "torch" in sys.modules:
        try:
            # the CPU generator only: torch.seed() also queues a lazy seed for each accelerator backend, each
            # capturing a traceback that reads source files (~7% of a ClientApp fork's CPU); a fork uses no GPU
            sys.modules["torch"].default_generator.seed()
        except Exception:  # noqa: BLE001
            pass


def set_threads() -> None:
    """In a ClientApp fork: the app's frameworks use the device's threads (the fork server used one)."""
    n = os.environ.get(THREADS_ENV, "")
    if n.isdigit() and "torch" in sys.modules:
        try:
            sys.modules["torch"].set_num_threads(int(n))
        except Exception:  # noqa: BLE001
            pass


def forget_if_changed(project_dir: str | Path) -> bool:
    """Drop the preloaded app modules unless the FAB in project_dir has the same files. True if dropped."""
    if APP_DIR is None or not PRELOADED:
        return False
    project_dir = Path(project_dir)
    for path in PRELOADED.values():
        fab_file = project_dir / path.relative_to(APP_DIR)
        try:
            same = fab_file.read_bytes() == path.read_bytes()
        except OSError:
            same = False
        if not same:
            for name in PRELOADED:
                sys.modules.pop(name, None)
            PRELOADED.clear()
            return True
    return False


def check_before_load() -> bool:
    """In a ClientApp fork: have flwr's app loader compare the FAB with the preloaded code first."""
    if not PRELOADED:
        return True
    try:
        import flwr.clientapp.utils as cu
    except ImportError:
        return False
    shipped = getattr(cu, "load_app", None)
    if shipped is None:
        return False

    def load_app(module_attribute_str, error_type, project_dir=None):
        if project_dir is not None and forget_if_changed(project_dir):
            print("flotilla: the app's code differs from what the device preloaded; importing the FAB's",
                  file=sys.stderr, flush=True)
        return shipped(module_attribute_str, error_type, project_dir)

    cu.load_app = load_app
    return True
