"""Latency fixes for flwr 1.4x's deployment engine, applied in-process.

Measured on a round of the built-in app (4 devices): of 3.5 s per round,
0.5 s was training. The rest was waiting, none of it work:

- the SuperNode sleeps a hard-coded 3 s whenever a poll finds no message,
  and 0.5 s between checks for a finished reply (start_client_internal);
- an object pull that finds the object not there yet (the SuperNode creates
  the ClientApp's task before it has pulled the message's arrays; the
  ServerApp pulls replies while the SuperNode still pushes them) backs off
  1 s, doubling up to 10 s (inflatable_utils.pull_objects);
- each ClientApp is a new Python process importing flwr (fast_superexec);
- the SuperExec asks its SuperNode for a new task every
  FLWR_SUPEREXEC_TASK_POLL_INTERVAL (1 s; 0.1 s made it 5% of a CPU per idle
  device, 40% of a 0.125 CPU quota, with as much again in the SuperLink).
  Here the SuperNode wakes it through a pipe when it creates a task
  (`wake_superexec_on_tasks` / `WakeableTime`) and the poll is a 1 s fallback.

The SuperNode's 0.5 s waits are in-process checks of its own state (has the
ClientApp's reply arrived?): those are capped at 20 ms, which costs nothing.
Its 3 s wait is a request to the SuperLink per poll: capped at
FLOTILLA_POLL_S (0.2 s).

Each patch here changes a timing constant of unmodified flwr code and
returns whether it found what it patches; callers say so when a future flwr
moved it, and the engine then runs as shipped.
"""

from __future__ import annotations

import os
import select
import time as _time

# First retry of a missing object after 50 ms, backing off to 1 s; flwr's
# PULL_MAX_TIME (2 h) still bounds the whole pull, so allow the tries for it.
PULL_INITIAL_BACKOFF_S = 0.05
PULL_BACKOFF_CAP_S = 1.0
PULL_MAX_TRIES = 7200


LOCAL_CHECK_S = 0.02  # the SuperNode's in-process checks (flwr: 0.5 s)
LOCAL_CHECK_BELOW_S = 1.0  # flwr's in-process waits are 0.5 s; its network poll waits 3 s
WAKE_FALLBACK_S = 30.0  # a SuperExec woken on each new task still polls this often (a missed wake-up)
UVICORN_TICK_S = 1.0  # uvicorn's housekeeping tick (its default 0.1 s: ten wake-ups a second per idle server)
WAKE_FD_ENV = "FLOTILLA_TASK_WAKE_FD"


class _TimeProxy:
    """Stands in for a flwr module's `time`: subclasses change sleep(), everything else is time's."""

    def __getattr__(self, name):
        return getattr(_time, name)


class CappedSleepTime(_TimeProxy):
    """sleep() is capped.

    Waits under `local_below_s` (flwr's in-process state checks) are capped at
    `local_cap_s`, longer ones (network polls) at `cap_s`.
    """

    def __init__(self, cap_s: float, local_cap_s: float = LOCAL_CHECK_S,
                 local_below_s: float = LOCAL_CHECK_BELOW_S) -> None:
        self.cap_s, self.local_cap_s, self.local_below_s = cap_s, local_cap_s, local_below_s

    def sleep(self, seconds: float) -> None:
        _time.sleep(min(seconds, self.local_cap_s if seconds < self.local_below_s else self.cap_s))


class WakeableTime(_TimeProxy):
    """For the SuperExec loop: sleep() ends early when the SuperNode writes to `fd`.

    With the pipe open, a sleep lasts at least `fallback_s` unless woken (the
    poll becomes a fallback); once the SuperNode's end is closed it is a plain sleep.
    """

    def __init__(self, fd: int, fallback_s: float = WAKE_FALLBACK_S) -> None:
        self.fd, self.fallback_s = fd, fallback_s
        os.set_blocking(fd, False)

    def sleep(self, seconds: float) -> None:
        if self.fd < 0:
            _time.sleep(seconds)
            return
        ready, _, _ = select.select([self.fd], [], [], max(seconds, self.fallback_s))
        if ready:
            try:
                data = os.read(self.fd, 4096)  # drain: one wake-up covers every task created so far
            except BlockingIOError:
                return
            if not data:  # the SuperNode is gone: nothing will wake us again
                os.close(self.fd)
                self.fd = -1


class WakeableIdleTime(CappedSleepTime):
    """The SuperNode loop's idle wait ends when the SuperLink says a message is there (a UDP datagram on
    `sock`), else after `idle_s`: an idle device asks the SuperLink every few seconds, not every 0.2 s,
    and still starts on new work at once. In-process checks stay capped at LOCAL_CHECK_S."""

    def __init__(self, sock, idle_s: float) -> None:
        super().__init__(idle_s)
        self.sock, self.idle_s = sock, idle_s
        sock.setblocking(False)

    def sleep(self, seconds: float) -> None:
        if seconds < self.local_below_s:
            _time.sleep(min(seconds, self.local_cap_s))
            return
        ready, _, _ = select.select([self.sock], [], [], self.idle_s)
        if ready:
            try:
                while self.sock.recv(64):  # drain: one wake-up covers every message stored so far
                    pass
            except (BlockingIOError, OSError):
                pass


WAKE_ENV = "FLOTILLA_WAKE_UDP"  # =1: the SuperLink wakes this machine's SuperNodes by UDP (local target)
IDLE_POLL_ENV = "FLOTILLA_IDLE_POLL_S"
# A woken SuperNode's fallback poll of the SuperLink (a missed wake-up): as often as its heartbeat. Each poll is
# a signed request on a new connection (~8 ms of CPU); at 10 s they were a third of an idle device's CPU.
IDLE_POLL_S = 30.0


def poll_cap_s() -> float:
    return float(os.environ.get("FLOTILLA_POLL_S", "0.2"))


def wake_on_messages(idle_s: float | None = None):
    """In a SuperNode: sleep in its idle poll until woken by the SuperLink (a UDP socket on 127.0.0.1);
    returns the socket's port (for the node file) or None where the loop is not found."""
    import socket

    idle_s = float(os.environ.get(IDLE_POLL_ENV, str(IDLE_POLL_S))) if idle_s is None else idle_s
    try:
        import flwr.supernode.start_client_internal as sci
    except ImportError:
        return None
    if getattr(sci, "time", None) is not _time and not isinstance(getattr(sci, "time", None), CappedSleepTime):
        return None
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    sci.time = WakeableIdleTime(sock, idle_s)
    return sock.getsockname()[1]


def shorten_supernode_poll(cap_s: float | None = None) -> bool:
    """Cap the SuperNode loop's 3 s idle poll at cap_s and its 0.5 s in-process checks at LOCAL_CHECK_S."""
    cap_s = poll_cap_s() if cap_s is None else cap_s
    try:
        import flwr.supernode.start_client_internal as sci
    except ImportError:
        return False
    if isinstance(getattr(sci, "time", None), CappedSleepTime):
        return True
    if getattr(sci, "time", None) is not _time:
        return False
    sci.time = CappedSleepTime(cap_s)
    return True


def shorten_pull_backoff(initial_s: float = PULL_INITIAL_BACKOFF_S, cap_s: float = PULL_BACKOFF_CAP_S) -> bool:
    """Retry a not-yet-available object after initial_s (not 1 s), backing off to cap_s (not 10 s)."""
    try:
        from flwr.supercore.inflatable import inflatable_utils as iu
    except ImportError:
        return False
    funcs = [getattr(iu, n, None) for n in ("pull_objects", "pull_and_inflate_object_from_tree")]
    wanted = {"initial_backoff", "backoff_cap", "max_tries_per_object"}
    if not all(f is not None and wanted <= set(f.__kwdefaults__ or {}) for f in funcs):
        return False
    for f in funcs:
        f.__kwdefaults__.update(initial_backoff=initial_s, backoff_cap=cap_s, max_tries_per_object=PULL_MAX_TRIES)
    return True


_wake_fds: list[int] = []  # write ends of the pipes to this SuperNode's SuperExecs


def superexec_wake_pipe() -> int:
    """A pipe for one SuperExec: returns the read end to pass to it; the write end stays here."""
    r, w = os.pipe()
    os.set_blocking(w, False)
    _wake_fds.append(w)
    return r


def wake_pipe_from(write_fd: int) -> None:
    """A SuperExec started beside this SuperNode (not by it) reads the other end of this pipe."""
    os.set_blocking(write_fd, False)
    _wake_fds.append(write_fd)


def _wake_superexecs() -> None:
    for fd in list(_wake_fds):
        try:
            os.write(fd, b"t")
        except BlockingIOError:  # the pipe is full of unread wake-ups: it will wake anyway
            pass
        except OSError:  # the SuperExec is gone
            _wake_fds.remove(fd)


def wake_superexec_on_tasks() -> bool:
    """Make the SuperNode's state wake its SuperExec whenever it creates a task."""
    try:
        from flwr.supernode.nodestate.in_memory_nodestate import InMemoryNodeState
    except ImportError:
        return False
    shipped = getattr(InMemoryNodeState, "create_task", None)
    if shipped is None:
        return False
    if getattr(shipped, "_flotilla_wakes", False):
        return True

    def create_task(self, *args, **kwargs):
        task_id = shipped(self, *args, **kwargs)
        if task_id is not None:
            _wake_superexecs()
        return task_id

    create_task._flotilla_wakes = True
    InMemoryNodeState.create_task = create_task
    return True


def superexec_waits_for_wakeups() -> bool:
    """In a SuperExec started with a wake pipe: sleep in its loop until woken (or the fallback poll)."""
    fd = os.environ.get(WAKE_FD_ENV, "")
    if not fd.isdigit():  # not started by fast_supernode (or garbled): keep flwr's poll
        return False
    try:
        from flwr.supercore.superexec import run_superexec as rs
    except ImportError:
        return False
    if getattr(rs, "time", None) is not _time:
        return isinstance(getattr(rs, "time", None), WakeableTime)
    rs.time = WakeableTime(int(fd))
    return True


def reuse_built_supernode_app() -> bool:
    """A SuperNode builds its runtime API's FastAPI app as it starts: ~0.1 s of CPU analysing routes, a third of
    a forked SuperNode's start-up, and the same for every device. flwr.supernode.main already built one at import
    (in a shared fleet, once, in the zygote). The first create_app in a process hands back that app with this
    SuperNode's state set as create_app sets it; any later call (or one after the app served) builds anew."""
    try:
        import flwr.supernode.main as sm
    except ImportError:
        return False
    shipped, built = getattr(sm, "create_app", None), getattr(sm, "app", None)
    if shipped is None or built is None or not hasattr(built, "state"):
        return False
    if getattr(shipped, "_flotilla", False):
        return True
    handed_out = []

    def create_app(state_factory=None, superexec_auth_secret=None):
        if handed_out or getattr(built, "middleware_stack", None) is not None:
            return shipped(state_factory=state_factory, superexec_auth_secret=superexec_auth_secret)
        handed_out.append(True)
        built.state.runtime_state_factory = state_factory
        built.state.superexec_auth_secret = superexec_auth_secret
        return built

    create_app._flotilla = True
    sm.create_app = create_app
    return True


def slower_uvicorn_tick(tick_s: float = UVICORN_TICK_S) -> bool:
    """uvicorn wakes its event loop every 0.1 s for housekeeping (the Date header, max-requests, shutdown); an
    idle SuperNode's runtime API server spent most of its idle CPU there. Once a second does the same work
    (the header is refreshed once a second anyway); a shutdown then takes up to tick_s longer."""
    import asyncio

    try:
        import uvicorn.server as us
    except ImportError:
        return False
    server = getattr(us, "Server", None)
    if server is None or not hasattr(server, "main_loop") or not hasattr(server, "on_tick"):
        return False
    if getattr(server.main_loop, "_flotilla", False):
        return True
    steps = max(1, round(tick_s / 0.1))

    async def main_loop(self) -> None:
        counter = 0
        should_exit = await self.on_tick(counter)
        while not should_exit:
            counter = (counter + steps) % 864000  # on_tick does its once-a-second work when counter % 10 == 0
            await asyncio.sleep(tick_s)
            should_exit = await self.on_tick(counter - counter % 10)

    main_loop._flotilla = True
    server.main_loop = main_loop
    return True


def skip_unsent_telemetry() -> bool:
    """With telemetry off (FLWR_TELEMETRY_ENABLED=0, as Flotilla runs Flower), flwr still builds each event's
    payload, and platform.architecture() in it runs `file` on the interpreter: ~1.8 ms of CPU and a process
    per event, and every ClientApp (one per message) sends one. Off, an event is now an empty one."""
    try:
        from flwr.supercore import telemetry
    except ImportError:
        return False
    if getattr(telemetry, "FLWR_TELEMETRY_ENABLED", None) is None or not hasattr(telemetry, "create_event"):
        return False
    if telemetry.FLWR_TELEMETRY_ENABLED == "1" or getattr(telemetry, "FLWR_TELEMETRY_LOGGING", "0") == "1":
        return True  # sent or logged: as shipped

    def create_event(event_type, event_details) -> str:
        return "disabled"  # what flwr returns when it does not send

    telemetry.create_event = create_event
    return True
