"""Device side of observation: each ClientApp reply carries its compute time to the ServerApp's observer.

Installed in every ClientApp process a Flotilla device starts (the fork
server's children). Wraps `ClientApp.__call__`, which runs the app's handler
for every API style (Message API, legacy client_fn/NumPyClient), and adds a
small ConfigRecord to the reply: the device's name and class (from its node
config), the handler's wall time and CPU seconds, and how long the message
waited on the device before the handler started. The ServerApp's
ObservingGrid removes the record before the app sees the reply, so the app's
view is exactly what its ClientApp returned.
"""

from __future__ import annotations

import resource
import time

from flotilla.contracts import STAMP_KEY

_launched_at: float | None = None  # when the SuperExec launched this task (set by the fork's entry)


def _cpu_s() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def stamp_replies(launched_at: float | None = None) -> bool:
    global _launched_at
    _launched_at = launched_at
    try:
        from flwr.app import ConfigRecord
        from flwr.clientapp import ClientApp
    except ImportError:
        return False
    shipped = ClientApp.__call__
    if getattr(shipped, "_flotilla", False):
        return True

    def __call__(self, message, context):  # noqa: N807 (the method it wraps)
        t0, c0 = time.time(), _cpu_s()
        reply = shipped(self, message, context)
        t1 = time.time()
        try:
            if reply.has_content():
                cfg = context.node_config
                reply.content[STAMP_KEY] = ConfigRecord({
                    "device": str(cfg.get("device", "")), "class": str(cfg.get("device-class", "")),
                    "compute_s": t1 - t0, "cpu_s": _cpu_s() - c0, "t_start": t0, "t_end": t1,
                    "queued_s": t0 - _launched_at if _launched_at else 0.0,
                    "maxrss_kb": int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss),
                })
        except Exception:  # noqa: BLE001 - observation must never break the app's reply
            pass
        return reply

    __call__._flotilla = True
    ClientApp.__call__ = __call__
    return True
