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
