"""The run's zygote (shared fleets) outlives no driver: a stale lease ends it, like every other fleet process."""

import os
import subprocess
import sys
import time

from flotilla.contracts import OWNER_LEASE_ENV, OWNER_TIMEOUT_S


def test_the_zygote_exits_when_its_drivers_lease_goes_stale(tmp_path):
    lease = tmp_path / "owner.lease"
    lease.touch()
    sock = tmp_path / "z.sock"
    proc = subprocess.Popen([sys.executable, "-m", "flotilla.runtime.zygote", "--socket", str(sock),
                             "--exits", str(tmp_path / "exits")],
                            env=os.environ | {OWNER_LEASE_ENV: str(lease)}, stdout=subprocess.PIPE, text=True)
    try:
        end = time.time() + 120  # warm: imports flwr (a few seconds here; generous for a busy machine)
        while not sock.exists():
            assert proc.poll() is None, "the zygote died while warming up"
            assert time.time() < end, "the zygote was not ready in 120 s"
            time.sleep(0.1)
        assert proc.poll() is None  # a fresh lease: the zygote serves
        old = time.time() - OWNER_TIMEOUT_S - 5
        os.utime(lease, (old, old))  # the driver was SIGKILLed: nobody touches its lease any more
        assert proc.wait(timeout=30) == 0
        assert "driver is gone" in proc.stdout.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_a_clientapp_fork_imports_nothing_the_zygote_has_not():
    """A module a ClientApp fork imports that the zygote has not is compiled and executed again in every fork,
    for every message (object_batches was: ~50 ms of CPU each)."""
    import ast
    import inspect

    from flotilla.runtime import superexec

    tree = ast.parse(inspect.getsource(superexec.run_clientapp_task))
    wanted = sorted({n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)})
    assert "flwr.supernode.runtime.run_clientapp" in wanted  # the parse found the fork's own imports
    code = ("import sys\nfrom flotilla.runtime import zygote\nzygote.warm(None, builtin=True)\n"
            "before = set(sys.modules)\n"
            f"for m in {wanted!r}: __import__(m)\n"
            "from flotilla.runtime.superexec import prepare_fork\nprepare_fork(0.0)\n"  # what a fork runs first
            "print(sorted(set(sys.modules) - before))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True)
    assert out.stdout.strip().splitlines()[-1] == "[]"
