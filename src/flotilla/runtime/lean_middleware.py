"""The SuperLink's HTTP middleware, each layer run only for the API it serves.

flwr 1.42's SuperLink serves the Fleet, Control and runtime (ServerAppIo)
APIs from one FastAPI app wrapped in eight `BaseHTTPMiddleware` layers, and
every request passes all eight, though four act only on Control paths and
two only on Fleet paths: for the rest their dispatch is just
`await call_next(request)`. A `BaseHTTPMiddleware` layer costs ~0.55 ms of
CPU per request even then (a task group and memory streams per call), and
a message exchange with one device is ~80 requests at the SuperLink (each
model array and chunk is an object pulled and pushed on its own), so the
idle layers were ~30% of the SuperLink's CPU per message, and the SuperLink
is one process whatever the fleet's size.

Here each such layer sits behind a pure-ASGI gate that hands a request on
directly when its path is outside the layer's API: the same predicate the
layer itself tests first, so what runs for a request is exactly what ran
before. Layers the gate does not know (extensions, translation, error
mapping) run for every request as shipped.
"""

from __future__ import annotations

from starlette.datastructures import URL

# middleware class name -> the path prefix its dispatch acts on (flwr 1.42: `_is_control_path` tests
# "/v1/control/"; NodeAuthMiddleware and FleetEventLogMiddleware test "/v1/fleet/" before anything else)
CONTROL, FLEET = "/v1/control/", "/v1/fleet/"
GATED: dict[str, str] = {
    "ControlSensitiveResponseMiddleware": CONTROL,  # acts on sensitive Control routes only
    "ControlAuthenticationMiddleware": CONTROL,
    "ControlLicenseMiddleware": CONTROL,
    "ControlEventLogMiddleware": CONTROL,
    "NodeAuthMiddleware": FLEET,
    "FleetEventLogMiddleware": FLEET,
}


class PathGate:
    """ASGI middleware: `inner` (a middleware class) handles the requests whose path starts with `prefix`;
    every other request (and lifespan) goes straight to the wrapped app."""

    def __init__(self, app, *, inner, prefix: str, args=(), kwargs=None) -> None:
        self.app, self.prefix = app, prefix
        self.inner = inner(app, *args, **(kwargs or {}))

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and _path(scope).startswith(self.prefix):
            await self.inner(scope, receive, send)
        else:
            await self.app(scope, receive, send)


def _path(scope) -> str:
    return URL(scope=scope).path  # exactly what the layer's own test reads (`request.url.path`)


def gate(middleware: list) -> list:
    """flwr's middleware list with every known layer behind its path gate (order unchanged)."""
    from starlette.middleware import Middleware

    out = []
    for mw in middleware:
        prefix = GATED.get(getattr(mw.cls, "__name__", ""))
        if prefix is None:
            out.append(mw)
        else:
            out.append(Middleware(PathGate, inner=mw.cls, prefix=prefix, args=tuple(mw.args), kwargs=dict(mw.kwargs)))
    return out


def gate_superlink_middleware() -> bool:
    """Patch flwr.superlink.main so the app it creates gates its layers; False where flwr lacks the hook."""
    try:
        import flwr.superlink.main as slmain
    except ImportError:
        return False
    build = getattr(slmain, "_get_middleware", None)
    if build is None or getattr(build, "_flotilla_gated", False):
        return build is not None

    def gated():
        return gate(build())

    gated._flotilla_gated = True
    slmain._get_middleware = gated
    return True
