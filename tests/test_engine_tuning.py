"""Flotilla's latency patches still find what they patch in the installed flwr.

These change timing constants of unmodified flwr code (engine_tuning) and
swap the SuperExec's executor (flotilla.runtime.superexec). If a flwr upgrade moved any
of them the engine would silently run as shipped: 3 s idle polls, 1 s pull
back-offs, a Python start per ClientApp. Each check runs in a fresh
interpreter, as the SuperNode and SuperExec do.
"""

import subprocess
import sys


def run_py(code: str) -> str:
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    return res.stdout.strip()


def test_supernode_poll_and_pull_backoff_are_shortened():
    out = run_py(
        "from flotilla.runtime import engine_tuning as t\n"
        "assert t.shorten_supernode_poll(0.2) and t.shorten_pull_backoff()\n"
        "import flwr.supernode.start_client_internal as sci, time\n"
        "t0 = time.monotonic(); sci.time.sleep(3); slept = time.monotonic() - t0\n"
        "t0 = time.monotonic(); sci.time.sleep(0.5); checked = time.monotonic() - t0\n"
        "from flwr.supercore.inflatable import inflatable_utils as iu\n"
        "d = iu.pull_objects.__kwdefaults__\n"
        "print(round(slept, 1), checked < 0.1, d['initial_backoff'], d['backoff_cap'], "
        "iu.pull_and_inflate_object_from_tree.__kwdefaults__['initial_backoff'])"
    )
    # the network poll (3 s) waits 0.2 s; the in-process reply check (0.5 s) 20 ms
    assert out == "0.2 True 0.05 1.0 0.05"


def test_supernode_wakes_its_superexec_when_it_creates_a_task():
    out = run_py(
        "import threading, time\n"
        "from flotilla.runtime import engine_tuning as t\n"
        "assert t.wake_superexec_on_tasks()\n"
        "r = t.superexec_wake_pipe()\n"
        "clock = t.WakeableTime(r, fallback_s=1.0)\n"
        "t0 = time.monotonic(); clock.sleep(0.1); idle = time.monotonic() - t0\n"
        "from flwr.supercore.object_store import ObjectStoreFactory\n"
        "from flwr.supernode.nodestate.in_memory_nodestate import InMemoryNodeState\n"
        "state = InMemoryNodeState(ObjectStoreFactory().store())\n"
        "threading.Timer(0.2, state.create_task, kwargs={'task_type': 'flwr-clientapp', 'run_id': 1}).start()\n"
        "t0 = time.monotonic(); clock.sleep(0.1); woken = time.monotonic() - t0\n"
        "print(round(idle, 1), 0.15 < woken < 0.8)"
    )
    # no task: the SuperExec's 0.1 s poll became the 1 s fallback; a new task wakes it at once
    assert out == "1.0 True"


def test_superexec_loop_sleeps_on_the_wake_pipe_it_was_given():
    out = run_py(
        "import os\n"
        "r, w = os.pipe(); os.environ['FLOTILLA_TASK_WAKE_FD'] = str(r)\n"
        "from flotilla.runtime import engine_tuning as t\n"
        "assert t.superexec_waits_for_wakeups()\n"
        "from flwr.supercore.superexec import run_superexec as rs\n"
        "os.close(w); rs.time.sleep(0.01)\n"  # the SuperNode's end closed: back to plain sleeps
        "print(type(rs.time).__name__, rs.time.fd)"
    )
    assert out == "WakeableTime -1"


def test_supernode_starts_the_fork_server_superexec():
    out = run_py(
        "from flotilla.runtime.supernode import use_flotilla_superexec\n"
        "assert use_flotilla_superexec()\n"
        "import flwr.supernode.start_client_internal as sci\n"
        "p = sci.subprocess.Popen(['flower-superexec', '--help'], stdout=sci.subprocess.PIPE, text=True)\n"
        "print(p.args[1:3]); p.wait()"
    )
    assert out == "['-m', 'flotilla.runtime.superexec']"


def test_superexec_uses_the_fork_server_executor():
    out = run_py(
        "from flotilla.runtime.superexec import patch_executor\n"
        "assert patch_executor(client_side=True)\n"
        "from flwr.supercore.constant import ExecutorType\n"
        "from flwr.supercore.superexec import run_superexec as rs\n"
        "e = rs.get_executor(ExecutorType.SUBPROCESS)\n"
        "import multiprocessing.forkserver as fs\n"
        "print(type(e).__name__, fs._forkserver._forkserver_pid is not None); e.close()"
    )
    assert out == "FlotillaExecutor True"


def test_uvicorn_keeps_idle_connections_past_the_clients_pool_expiry():
    """A server closing a kept-alive connection just as a client reuses it makes flwr retry a push (a new push
    session, the reply lost): the servers must hold idle connections longer than httpx's pool keeps them."""
    import subprocess
    import sys

    code = (
        "import httpx, uvicorn\n"
        "from flotilla.runtime.keep_alive import KEEP_ALIVE_S, longer_keep_alive\n"
        "assert longer_keep_alive() and longer_keep_alive()\n"
        "c = uvicorn.Config(app=None)\n"
        "assert c.timeout_keep_alive == KEEP_ALIVE_S, c.timeout_keep_alive\n"
        "assert uvicorn.Config(app=None, timeout_keep_alive=3).timeout_keep_alive == 3  # a caller's own value stands\n"
        "expiry = httpx.Limits().keepalive_expiry\n"
        "assert KEEP_ALIVE_S >= 10 * expiry, (KEEP_ALIVE_S, expiry)\n"
        "print('ok')\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert res.stdout.strip() == "ok", res.stderr
