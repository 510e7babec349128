"""The SuperLink's middleware gates: a layer runs for its own API's paths, never skipped there."""

import asyncio

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.base import BaseHTTPMiddleware
from starlette.responses import Response
from starlette.routing import Route

from flotilla.runtime.lean_middleware import CONTROL, FLEET, GATED, gate


def _call(app, path: str) -> int:
    sent = []

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": path, "raw_path": path.encode(), "root_path": "",
             "query_string": b"", "headers": [(b"host", b"127.0.0.1:9091")], "http_version": "1.1",
             "scheme": "http", "server": ("127.0.0.1", 9091), "client": ("127.0.0.1", 5000)}
    asyncio.run(app(scope, receive, send))
    return next(m["status"] for m in sent if m["type"] == "http.response.start")


def _app_with(classes: list[type]) -> tuple[Starlette, list[str]]:
    async def endpoint(request):
        return Response(b"ok")

    routes = [Route(p + "x", endpoint, methods=["POST"]) for p in (CONTROL, FLEET, "/v1/runtime/")]
    return Starlette(routes=routes, middleware=gate([Middleware(c) for c in classes])), []


def _recording(name: str, seen: list[str]) -> type:
    class Layer(BaseHTTPMiddleware):
        async def dispatch(self, request, call_next):
            seen.append(f"{name} {request.url.path}")
            return await call_next(request)

    Layer.__name__ = name
    return Layer


def test_each_layer_runs_for_its_own_api_and_is_skipped_elsewhere():
    seen: list[str] = []
    layers = [_recording(n, seen) for n in ("ControlAuthenticationMiddleware", "NodeAuthMiddleware",
                                            "ProtobufTranslationMiddleware")]
    app, _ = _app_with(layers)
    for path in (CONTROL + "x", FLEET + "x", "/v1/runtime/x"):
        assert _call(app, path) == 200
    assert seen == [
        "ControlAuthenticationMiddleware /v1/control/x", "ProtobufTranslationMiddleware /v1/control/x",
        "NodeAuthMiddleware /v1/fleet/x", "ProtobufTranslationMiddleware /v1/fleet/x",
        "ProtobufTranslationMiddleware /v1/runtime/x",  # a layer the gate does not know runs for every path
    ]


def test_a_gated_layer_still_refuses_what_it_refuses():
    class ControlAuthenticationMiddleware(BaseHTTPMiddleware):
        async def dispatch(self, request, call_next):
            if request.url.path.startswith(CONTROL):
                return Response(b"no", status_code=401)
            return await call_next(request)

    app, _ = _app_with([ControlAuthenticationMiddleware])
    assert _call(app, CONTROL + "x") == 401
    assert _call(app, "/v1/runtime/x") == 200


def test_flwr_superlink_layers_are_gated_in_order_by_the_prefix_their_own_test_reads():
    import flwr.superlink.main as slmain
    from flwr.superlink.routers.control.middlewares import _is_control_path

    shipped = slmain._get_middleware()
    gated = gate(shipped)
    assert len(gated) == len(shipped)
    names = [m.cls.__name__ for m in shipped]
    assert set(GATED) <= set(names), set(GATED) - set(names)  # every layer named here is one flwr has
    for before, after in zip(shipped, gated):
        if before.cls.__name__ in GATED:
            assert after.kwargs["inner"] is before.cls and after.kwargs["prefix"] == GATED[before.cls.__name__]
        else:
            assert after is before
    assert _is_control_path(CONTROL + "list-runs") and not _is_control_path("/v1/runtime/pull-object")
