"""The device's fork server preloads a user's ClientApp: the module is reused, stale code is not, forks differ."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

APPS = Path(__file__).parent / "apps"


def run_py(code: str, **env) -> str:
    import os

    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=180,
                         env=os.environ | env)
    assert res.returncode == 0, res.stderr[-2000:]
    return res.stdout.strip()


def test_preload_imports_the_apps_clientapp_and_says_when_the_device_is_warm(tmp_path):
    ready = tmp_path / "dev-1.ready"
    out = run_py(
        "import sys\n"
        "from flotilla.runtime import preload as p\n"
        f"print(p.preload({str(APPS / 'msg_numpy')!r}))\n"
        "print('msgnumpy.client_app' in sys.modules, sorted(p.PRELOADED))\n",
        FLOTILLA_READY_FILE=str(ready))
    first, second = out.splitlines()
    assert first == "msgnumpy.client_app"
    assert second.startswith("True") and "msgnumpy.task" in second
    assert "preloaded msgnumpy.client_app" in ready.read_text()


def test_a_fab_whose_code_differs_from_the_preloaded_one_is_imported_afresh(tmp_path):
    fab = tmp_path / "fab"
    shutil.copytree(APPS / "msg_numpy", fab)
    out = run_py(
        "import sys\n"
        "from flotilla.runtime import preload as p\n"
        f"p.preload({str(APPS / 'msg_numpy')!r})\n"
        f"print(p.forget_if_changed({str(fab)!r}), 'msgnumpy.task' in sys.modules)\n"  # same files: kept
        f"open({str(fab / 'msgnumpy' / 'task.py')!r}, 'a').write('\\n# edited\\n')\n"
        f"print(p.forget_if_changed({str(fab)!r}), 'msgnumpy.task' in sys.modules)\n")  # edited: dropped
    assert out.splitlines() == ["False True", "True False"]


def test_forks_of_the_warm_process_draw_different_random_numbers():
    """A fork inherits its parent's RNG state; reseed() gives each message what a fresh process would have."""
    out = run_py(
        "import os, numpy, torch\n"
        "from flotilla.runtime.preload import reseed, warm_up_frameworks\n"
        "print(warm_up_frameworks())\n"
        "draws = []\n"
        "for _ in range(2):\n"
        "    r, w = os.pipe()\n"
        "    if os.fork() == 0:\n"
        "        reseed()\n"
        "        os.write(w, f'{numpy.random.randint(1 << 30)} {int(torch.randint(1 << 30, (1,)))}'.encode())\n"
        "        os._exit(0)\n"
        "    os.wait(); draws.append(os.read(r, 100).decode())\n"
        "print(draws[0] != draws[1], draws[0].split()[0] != draws[1].split()[0],"
        " draws[0].split()[1] != draws[1].split()[1])\n")
    warmed, differ = out.splitlines()
    assert warmed == "['torch']"
    assert differ == "True True True"
