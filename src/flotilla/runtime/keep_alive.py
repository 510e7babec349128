"""uvicorn's keep-alive outlasts the clients' pools, so a reused connection is never closed under a request.

flwr 1.42's servers (the SuperLink; each SuperNode's runtime API) run uvicorn with
its 5 s keep-alive timeout, and its clients (httpx) keep idle connections for
5 s too. A client that reuses a connection just as the server closes it gets
"Server disconnected without sending a response" and flwr retries the call.
Seen on a loaded machine at 50 devices: a reply's push was retried, its objects
were then refused ("the push session may have expired or been replaced") and
the ServerApp waited for that session to expire before it gave up on the reply
(a 219 s round instead of ~60 s). This race is the likely cause (the retried
exception is only logged at DEBUG); with the fix no reply was lost at 50 and
100 devices. A device's connection idles about as long as it trains, so the
race is met every round. With the server holding idle connections for
KEEP_ALIVE_S, the client's pool always drops them first.
"""

from __future__ import annotations

import inspect

KEEP_ALIVE_S = 75  # well past httpx's 5 s pool expiry, even when a loaded machine runs a server late


def longer_keep_alive(seconds: int = KEEP_ALIVE_S) -> bool:
    """Make uvicorn servers created in this process keep idle connections `seconds` unless told otherwise."""
    try:
        import uvicorn.config as uc
    except ImportError:
        return False
    init = uc.Config.__init__
    if getattr(init, "_flotilla_keep_alive", False):
        return True
    params = list(inspect.signature(init).parameters)
    if "timeout_keep_alive" not in params:
        return False
    position = params.index("timeout_keep_alive") - 1  # without self

    def __init__(self, *args, **kwargs):
        if len(args) <= position:  # not given positionally
            kwargs.setdefault("timeout_keep_alive", seconds)
        init(self, *args, **kwargs)

    __init__._flotilla_keep_alive = True
    uc.Config.__init__ = __init__
    return True
