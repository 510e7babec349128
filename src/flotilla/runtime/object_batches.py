"""A message's objects move in a few batched requests, not one request each.

flwr 1.42 sends a message's content as objects (the message, its records,
each array and each array chunk) and moves every object with a request of
its own. Counted on a 10-device round of the example app, per device: the
ClientApp pulls 21 objects from its SuperNode and pushes 20 back, the
SuperNode pulls 20 from the SuperLink and pushes 22, the ServerApp pulls 20:
~100 requests of ~1-7 ms of CPU each, most of a message exchange's cost, paid
at the device (under its CPU limit) and at the one SuperLink. Every link
carries them: ClientApp <-> SuperNode and ServerApp <-> SuperLink (runtime
API), SuperNode <-> SuperLink (Fleet API), and Flotilla runs every process.

Server side: each API gets two routes beside flwr's own, `<api>/flotilla-
pull-objects` and `<api>/flotilla-push-objects`, with the dependencies of
flwr's `pull-object`/`push-object` routes (the runtime API's task token,
version checks; on the Fleet API the node-auth middleware checks the batch
like any Fleet request). For each object the route calls flwr's own handler
with the request flwr's client would have sent, so what is checked, stored
and counted is what flwr does.

Client side: flwr's `pull_objects` and `push_object_contents_from_iterable`
are handed flwr's per-object function; when it is one of flwr's (its closure
names the client, node, run and session) the objects go in batches. An
object not yet available is asked for again with flwr's back-off; a server
without the routes (404, e.g. a SuperLink Flotilla did not start) gets
flwr's per-object path from then on; any other function goes flwr's way.
"""

import functools
import random
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Annotated

# "0": flwr's per-object requests everywhere (to compare); "clients": clients try batches, servers do not serve
# them (a server Flotilla did not start: the clients' fallback)
ENABLE_ENV = "FLOTILLA_OBJECT_BATCHES"
PULL_PATH, PUSH_PATH = "flotilla-pull-objects", "flotilla-push-objects"
MAX_BATCH_OBJECTS = 64
MAX_BATCH_BYTES = 32 * 2**20  # a batch's contents; a reply may stop early, the client asks for the rest
PREFIX_OF_CLIENT = {"FleetHttpClient": "/v1/fleet", "RuntimeHttpClient": "/v1/runtime"}
_FILE = "flotilla/object_batch.proto"


def enabled(serving: bool = False) -> bool:
    import os

    value = os.environ.get(ENABLE_ENV, "1")
    return value != "0" and not (serving and value == "clients")


# -- the wire types (built at run time: no generated code to keep in step with flwr's protobuf) ----------------

def _message_types():
    from flwr.proto import message_pb2, node_pb2  # noqa: F401 - registers the files the batch types refer to
    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

    pool = descriptor_pool.Default()
    try:
        pool.FindFileByName(_FILE)
    except KeyError:
        f = descriptor_pb2.FileDescriptorProto(name=_FILE, package="flotilla", syntax="proto3",
                                               dependency=[node_pb2.DESCRIPTOR.name, message_pb2.DESCRIPTOR.name])
        fd = descriptor_pb2.FieldDescriptorProto
        req = f.message_type.add(name="ObjectBatchRequest")
        for name, num, typ, label, ref in (
                ("node", 1, fd.TYPE_MESSAGE, fd.LABEL_OPTIONAL, ".flwr.proto.Node"),
                ("run_id", 2, fd.TYPE_UINT64, fd.LABEL_OPTIONAL, None),
                ("session_id", 3, fd.TYPE_STRING, fd.LABEL_OPTIONAL, None),
                ("object_ids", 4, fd.TYPE_STRING, fd.LABEL_REPEATED, None),
                ("object_contents", 5, fd.TYPE_BYTES, fd.LABEL_REPEATED, None)):
            req.field.add(name=name, number=num, type=typ, label=label, **({"type_name": ref} if ref else {}))
        res = f.message_type.add(name="ObjectBatchResponse")
        res.field.add(name="pulled", number=1, type=fd.TYPE_MESSAGE, label=fd.LABEL_REPEATED,
                      type_name=".flwr.proto.PullObjectResponse")
        res.field.add(name="stored", number=2, type=fd.TYPE_BOOL, label=fd.LABEL_REPEATED)
        pool.AddSerializedFile(f.SerializeToString())
    get = message_factory.GetMessageClass
    return (get(pool.FindMessageTypeByName("flotilla.ObjectBatchRequest")),
            get(pool.FindMessageTypeByName("flotilla.ObjectBatchResponse")))


ObjectBatchRequest, ObjectBatchResponse = _message_types()


# -- server side ---------------------------------------------------------------------------------------------

def _pull_each(request, pull_one) -> ObjectBatchResponse:
    from flwr.proto.message_pb2 import PullObjectRequest  # pylint: disable=no-name-in-module

    out, size = ObjectBatchResponse(), 0
    for oid in request.object_ids:
        if size >= MAX_BATCH_BYTES:
            break  # the client asks again for the ids it got no answer for
        res = pull_one(PullObjectRequest(node=request.node, run_id=request.run_id, object_id=oid))
        out.pulled.append(res)
        size += len(res.object_content)
    return out


def _push_each(request, push_one) -> ObjectBatchResponse:
    from flwr.proto.message_pb2 import PushObjectRequest  # pylint: disable=no-name-in-module

    out = ObjectBatchResponse()
    for oid, content in zip(request.object_ids, request.object_contents, strict=True):
        out.stored.append(push_one(PushObjectRequest(node=request.node, run_id=request.run_id, object_id=oid,
                                                     object_content=content,
                                                     session_id=request.session_id)).stored)
    return out


def fleet_router():
    """The Fleet API's batch routes (SuperLink), with the dependencies of flwr's Fleet router."""
    import importlib

    from fastapi import APIRouter
    from flwr.supercore.protobuf.routing import ProtobufRoute
    from flwr.supercore.protobuf.translation import PROTOBUF_REQUEST_DEPENDENCY
    from flwr.superlink.servicer.fleet import fleet_handlers

    fleet = importlib.import_module("flwr.superlink.routers.fleet.router")
    router = APIRouter(prefix=fleet.router.prefix, route_class=ProtobufRoute,
                       dependencies=list(fleet.router.dependencies))
    Batch = Annotated[ObjectBatchRequest, PROTOBUF_REQUEST_DEPENDENCY]  # noqa: N806

    def pull(request: Batch, state: fleet.LinkStateDependency) -> ObjectBatchResponse:
        return _pull_each(request, lambda r: fleet_handlers.pull_object(request=r, state=state))

    def push(request: Batch, state: fleet.LinkStateDependency) -> ObjectBatchResponse:
        return _push_each(request, lambda r: fleet_handlers.push_object(request=r, state=state))

    router.add_api_route(f"/{PULL_PATH}", pull, methods=["POST"])
    router.add_api_route(f"/{PUSH_PATH}", push, methods=["POST"])
    return router


def runtime_router(component: str):
    """The runtime API's batch routes (SuperLink, SuperNode), with the dependencies of flwr's runtime router."""
    import importlib

    from fastapi import APIRouter, Depends
    from flwr.supercore.dependencies.runtime import (
        RuntimeHandlersDependency,
        RuntimeStateDependency,
        TaskDependency,
    )
    from flwr.supercore.dependencies.version import VersionDependency
    from flwr.supercore.protobuf.routing import ProtobufRoute
    from flwr.supercore.protobuf.translation import PROTOBUF_REQUEST_DEPENDENCY

    runtime = importlib.import_module("flwr.supercore.routers.runtime.router")
    router = APIRouter(prefix=runtime.router.prefix, route_class=ProtobufRoute,
                       dependencies=list(runtime.router.dependencies))
    Batch = Annotated[ObjectBatchRequest, PROTOBUF_REQUEST_DEPENDENCY]  # noqa: N806

    def pull(request: Batch, state: RuntimeStateDependency, handlers: RuntimeHandlersDependency,
             task: TaskDependency) -> ObjectBatchResponse:
        return _pull_each(request, lambda r: handlers.pull_object(r, state, task))

    def push(request: Batch, state: RuntimeStateDependency, handlers: RuntimeHandlersDependency,
             task: TaskDependency) -> ObjectBatchResponse:
        return _push_each(request, lambda r: handlers.push_object(r, state, task))

    router.add_api_route(f"/{PULL_PATH}", pull, methods=["POST"])
    router.add_api_route(f"/{PUSH_PATH}", push, methods=["POST"])
    versioned = APIRouter(dependencies=[Depends(VersionDependency(
        component_name=component, connection_name=f"Caller <-> {component} Runtime API"))])
    versioned.include_router(router)
    return versioned


def _register_request_types() -> None:
    """flwr's translation layer parses a route's body only for paths it knows (and the Fleet node-auth
    middleware authenticates only parsed requests): the batch paths are made known with the batch type. Like
    flwr's object routes they are routine: uvicorn's access log shows them only when they fail."""
    from flwr.supercore import http_logging
    from flwr.supercore.protobuf.translation import PROTOBUF_REQUEST_TYPES

    paths = [f"{prefix}/{path}" for prefix in PREFIX_OF_CLIENT.values() for path in (PULL_PATH, PUSH_PATH)]
    for path in paths:
        PROTOBUF_REQUEST_TYPES[("POST", path)] = ObjectBatchRequest
    routine = getattr(http_logging, "ROUTINE_ACCESS_PATHS", None)
    if isinstance(routine, frozenset):
        http_logging.ROUTINE_ACCESS_PATHS = routine | set(paths)


def serve_batches_superlink() -> bool:
    """The SuperLink's app gets the Fleet and runtime batch routes; False where flwr lacks the names."""
    try:
        import flwr.superlink.main as slmain
    except ImportError:
        return False
    shipped = getattr(slmain, "create_app", None)
    if shipped is None:
        return False
    if getattr(shipped, "_flotilla_batches", False):
        return True
    _register_request_types()

    @functools.wraps(shipped)
    def create_app(*args, **kwargs):
        app = shipped(*args, **kwargs)
        app.include_router(fleet_router())
        app.include_router(runtime_router("SuperLink"))
        return app

    create_app._flotilla_batches = True
    slmain.create_app = create_app
    return True


def _with_runtime_routes(app):
    """The SuperNode's app with the batch routes, added once."""
    if not getattr(app.state, "flotilla_batches", False):
        app.include_router(runtime_router("SuperNode"))
        app.state.flotilla_batches = True
    return app


def serve_batches_supernode() -> bool:
    """The SuperNode's runtime API (its ClientApps') gets the batch routes: the app flwr built at import and
    any it builds later."""
    try:
        import flwr.supernode.main as snmain
    except ImportError:
        return False
    shipped, built = getattr(snmain, "create_app", None), getattr(snmain, "app", None)
    if shipped is None:
        return False
    if getattr(shipped, "_flotilla_batches", False):
        return True
    _register_request_types()
    if built is not None:
        _with_runtime_routes(built)

    @functools.wraps(shipped)  # copies engine_tuning's marker too: its wrapper is inside this one
    def create_app(*args, **kwargs):
        return _with_runtime_routes(shipped(*args, **kwargs))

    create_app._flotilla_batches = True
    snmain.create_app = create_app
    return True


# -- client side ---------------------------------------------------------------------------------------------

@dataclass
class Target:
    """Where flwr's per-object function sends its requests, read from its closure."""
    client: object
    prefix: str
    node: object
    run_id: int
    session_id: str = ""
    invoker: object = None  # the SuperNode's retry invoker (the runtime clients retry inside)

    def call(self, path: str, request) -> ObjectBatchResponse:
        api = "Fleet" if self.prefix.endswith("fleet") else "Runtime"
        rpc = f"/flwr.proto.{api}/{'PullObject' if path == PULL_PATH else 'PushObject'}"

        def send(req):
            return self.client._unary_unary(path=f"{self.prefix}/{path}", rpc_method=rpc, request=req,
                                            response_type=ObjectBatchResponse)

        return self.invoker.invoke(send, request) if self.invoker is not None else send(request)

    @property
    def key(self) -> tuple:
        return (getattr(self.client, "_base_url", id(self.client)), self.prefix)


_unsupported: set[tuple] = set()  # (server, api) that answered 404: flwr's per-object path from then on


def _closure(fn) -> dict:
    code, cells = getattr(fn, "__code__", None), getattr(fn, "__closure__", None) or ()
    if code is None:
        return {}
    out = {}
    for name, cell in zip(code.co_freevars, cells):
        try:
            out[name] = cell.cell_contents
        except ValueError:  # an empty cell
            continue
    return out


def _target(client, node, run_id, session_id="", invoker=None) -> Target | None:
    prefix = PREFIX_OF_CLIENT.get(type(client).__name__)
    if prefix is None or node is None or not hasattr(client, "_unary_unary"):
        return None
    t = Target(client, prefix, node, int(run_id), session_id or "", invoker)
    return None if t.key in _unsupported else t


def target_of(fn) -> Target | None:
    """The batch target of one of flwr's per-object functions; None for any other function."""
    try:
        if isinstance(fn, functools.partial):  # the SuperNode's push: partial(push_object, run_id, session_id)
            inner = _closure(fn.func)
            if "client" in inner and len(fn.args) == 2 and not fn.keywords:
                return _target(inner["client"], inner.get("node"), fn.args[0], fn.args[1], inner.get("retry_invoker"))
            return None
        cv = _closure(fn)
        call = cv.get("pull_object_protobuf") or cv.get("push_object_protobuf")
        if call is not None and "node" in cv and "run_id" in cv:  # flwr's make_pull/push_object_fn_protobuf
            client, invoker = getattr(call, "__self__", None), None
            if client is None:  # the SuperNode's: lambda request: retry_invoker.invoke(client.PullObject, request)
                inner = _closure(call)
                client, invoker = inner.get("client"), inner.get("retry_invoker")
            return _target(client, cv["node"], cv["run_id"], cv.get("session_id", ""), invoker)
        if "pull_object" in cv and "run_id" in cv:  # the SuperNode's pull: lambda obj_id: pull_object(run_id, obj_id)
            inner = _closure(cv["pull_object"])
            if "client" in inner:
                return _target(inner["client"], inner.get("node"), cv["run_id"], "", inner.get("retry_invoker"))
    except Exception:  # noqa: BLE001 - anything unexpected: flwr's own path
        return None
    return None


class NotServed(Exception):
    """The server has no batch routes; `unsent`: the (id, content) pairs taken for the refused batch."""

    def __init__(self, unsent: list | None = None) -> None:
        super().__init__("no batch routes")
        self.unsent = unsent or []


def _guard(t: Target, path: str, request) -> ObjectBatchResponse:
    import httpx

    try:
        return t.call(path, request)
    except httpx.HTTPStatusError as err:
        if err.response.status_code in (404, 405):
            _unsupported.add(t.key)
            raise NotServed from err
        raise


def batched_pull(t: Target, object_ids: list[str], *, max_time: float, max_tries: int, initial_backoff: float,
                 backoff_cap: float) -> dict[str, bytes]:
    """flwr's pull_objects in batches: the same errors, the same back-off for objects not yet available."""
    from flwr.supercore.inflatable.inflatable_utils import ObjectPullError

    results: dict[str, bytes] = {}
    todo, tries, delay, start = list(dict.fromkeys(object_ids)), 0, initial_backoff, time.monotonic()
    while todo:
        waiting: list[str] = []
        while todo:
            chunk, todo = todo[:MAX_BATCH_OBJECTS], todo[MAX_BATCH_OBJECTS:]
            res = _guard(t, PULL_PATH, ObjectBatchRequest(node=t.node, run_id=t.run_id, object_ids=chunk))
            for oid, r in zip(chunk, res.pulled):
                if not r.object_found:
                    raise ObjectPullError(oid, "the object could not be found.")
                if r.object_available:
                    results[oid] = r.object_content
                else:
                    waiting.append(oid)
            todo = chunk[len(res.pulled):] + todo  # a reply that stopped at its size cap: the rest next
        if not waiting:
            break
        tries += 1
        if tries >= max_tries or time.monotonic() - start >= max_time:
            raise ObjectPullError(waiting[0], "timeout or retry limit reached")
        time.sleep(delay * (1 + random.uniform(-0.2, 0.2)))
        delay = min(delay * 2, backoff_cap)
        todo = waiting
    return results


def batched_push(t: Target, contents: Iterable[tuple[str, bytes]]) -> None:
    """flwr's push_object_contents_from_iterable in batches (by count and size); ObjectPushError if one is
    not stored, as flwr raises."""
    from flwr.supercore.inflatable.inflatable_utils import ObjectPushError

    def flush(ids: list[str], blobs: list[bytes]) -> None:
        try:
            res = _guard(t, PUSH_PATH, ObjectBatchRequest(node=t.node, run_id=t.run_id, session_id=t.session_id,
                                                          object_ids=ids, object_contents=blobs))
        except NotServed as err:
            raise NotServed(list(zip(ids, blobs))) from err
        for oid, stored in zip(ids, res.stored, strict=True):
            if not stored:
                raise ObjectPushError(oid, t.run_id, t.session_id)

    ids: list[str] = []
    blobs: list[bytes] = []
    size = 0
    for oid, content in contents:
        if ids and (len(ids) >= MAX_BATCH_OBJECTS or size + len(content) > MAX_BATCH_BYTES):
            flush(ids, blobs)
            ids, blobs, size = [], [], 0
        ids.append(oid)
        blobs.append(content)
        size += len(content)
    if ids:
        flush(ids, blobs)


def batching_pull_objects(shipped: Callable) -> Callable:
    """flwr's pull_objects, in batches where its per-object function is one of flwr's."""
    defaults = dict(shipped.__kwdefaults__ or {})

    def pull_objects(object_ids: list[str], pull_object_fn: Callable[[str], bytes], *,
                     max_concurrent_pulls=defaults.get("max_concurrent_pulls"),
                     max_time=defaults.get("max_time"), max_tries_per_object=defaults.get("max_tries_per_object"),
                     initial_backoff=defaults.get("initial_backoff"), backoff_cap=defaults.get("backoff_cap")):
        t = target_of(pull_object_fn)
        if t is not None:
            try:
                return batched_pull(t, list(object_ids), max_time=float("inf") if max_time is None else max_time,
                                    max_tries=int(1e9) if max_tries_per_object is None else max_tries_per_object,
                                    initial_backoff=initial_backoff, backoff_cap=backoff_cap)
            except NotServed:
                pass
        return shipped(object_ids, pull_object_fn, max_concurrent_pulls=max_concurrent_pulls, max_time=max_time,
                       max_tries_per_object=max_tries_per_object, initial_backoff=initial_backoff,
                       backoff_cap=backoff_cap)

    pull_objects._flotilla_batches = True
    return pull_objects


def batching_push_contents(shipped: Callable) -> Callable:
    """flwr's push_object_contents_from_iterable, in batches where its per-object function is one of flwr's."""

    def push_object_contents_from_iterable(object_contents, push_object_fn, **kw):
        t = target_of(push_object_fn)
        if t is None:
            return shipped(object_contents, push_object_fn, **kw)
        items = iter(object_contents)
        try:
            return batched_push(t, items)
        except NotServed as err:  # the first batch was refused whole: it and the rest go flwr's way
            return shipped(_chain(err.unsent, items), push_object_fn, **kw)

    push_object_contents_from_iterable._flotilla_batches = True
    return push_object_contents_from_iterable


def batch_objects() -> bool:
    """Route flwr's object pulls and pushes through the batches where it can (in every module that imported
    the functions by name); False where flwr lacks them."""
    import sys

    try:
        from flwr.supercore.inflatable import inflatable_utils as iu
    except ImportError:
        return False
    shipped_pull = getattr(iu, "pull_objects", None)
    shipped_push = getattr(iu, "push_object_contents_from_iterable", None)
    if shipped_pull is None or shipped_push is None:
        return False
    if getattr(shipped_pull, "_flotilla_batches", False):
        return True
    pull, push = batching_pull_objects(shipped_pull), batching_push_contents(shipped_push)
    iu.pull_objects, iu.push_object_contents_from_iterable = pull, push
    # the modules that imported the names, where loaded (one loaded later imports the patched ones): a ClientApp
    # fork runs this for every message and must not load what it does not use
    for modname in ("flwr.supernode.start_client_internal", "flwr.superlink.grid.http_grid",
                    "flwr.supernode.runtime.run_clientapp"):
        mod = sys.modules.get(modname)
        if mod is None:
            continue
        if getattr(mod, "pull_objects", None) is shipped_pull:
            mod.pull_objects = pull
        if getattr(mod, "push_object_contents_from_iterable", None) is shipped_push:
            mod.push_object_contents_from_iterable = push
    return True


def _chain(head, rest):
    yield from head
    yield from rest
