"""Batched object transfers against flwr's real runtime and Fleet APIs, served in this process by uvicorn.

What a user would check: the objects that arrive are the ones sent, byte for byte; the batch routes refuse
what flwr's own object routes refuse (no task token, no node signature); a server without them still gets
every object, by flwr's per-object path.
"""

import json
import os
import socket
import threading
import time

import httpx
import numpy as np
import pytest
import uvicorn
from flwr.app import ArrayRecord
from flwr.proto.node_pb2 import Node  # pylint: disable=no-name-in-module
from flwr.supercore.constant import TaskType
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects, get_object_tree
from flwr.supercore.inflatable.inflatable_protobuf_utils import (
    make_pull_object_fn_protobuf,
    make_push_object_fn_protobuf,
)
from flwr.supercore.inflatable.inflatable_utils import (
    ObjectPullError,
    iterate_object_tree,
    pull_objects,
    push_object_contents_from_iterable,
)
from flwr.supercore.interceptors import RuntimeTokenHttpInterceptor, RuntimeVersionHttpInterceptor
from flwr.supercore.object_store import ObjectStoreFactory
from flwr.supercore.runtime import RuntimeHttpClient
from flwr.supernode.nodestate import NodeStateFactory

from conftest import cgroups_of, flotilla, processes_of
from flotilla.runs import find_run
from flotilla.runtime import object_batches as ob

RUN_ID = 7


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Served:
    def __init__(self, app) -> None:
        self.port = _free_port()
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        end = time.time() + 30
        while not self.server.started:
            assert time.time() < end, "the API did not start in 30 s"
            time.sleep(0.02)

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)


@pytest.fixture(params=[True, False], ids=["batch-routes", "flwr-routes-only"])
def supernode_api(request):
    """A SuperNode's runtime API (the ClientApp's side) with a claimed task, with or without the batch routes."""
    from flwr.supernode.main import create_app

    factory = NodeStateFactory(ObjectStoreFactory())
    app = create_app(state_factory=factory)
    if request.param:
        ob._register_request_types()
        app.include_router(ob.runtime_router("SuperNode"))
    state = factory.state()
    token = state.claim_task(state.create_task(task_type=TaskType.CLIENT_APP, run_id=RUN_ID))
    served = Served(app)
    client = RuntimeHttpClient.from_server_address(
        server_address=f"127.0.0.1:{served.port}", insecure=True, root_certificates=None,
        interceptors=[RuntimeVersionHttpInterceptor(component_name="flwr-clientapp"),
                      RuntimeTokenHttpInterceptor(token)], retry_invoker=None)
    ob._unsupported.clear()
    yield state, client, served, request.param
    served.close()
    ob._unsupported.clear()


def _model(n_arrays: int = 6):
    rng = np.random.default_rng(0)
    record = ArrayRecord([rng.standard_normal((32, 16)).astype(np.float32) for _ in range(n_arrays)])
    objects = get_all_nested_objects(record)
    return get_object_tree(record), {oid: obj.deflate() for oid, obj in objects.items()}


def test_pulled_objects_are_the_stored_ones_by_either_path(supernode_api):
    state, client, _, batched = supernode_api
    tree, contents = _model()
    state.object_store.preregister(RUN_ID, tree)
    for oid, blob in contents.items():
        state.object_store.put(oid, blob)
    fn = make_pull_object_fn_protobuf(client.PullObject, Node(node_id=1), RUN_ID)
    assert ob.target_of(fn) is not None  # flwr's own per-object function is recognised
    pulled = ob.batching_pull_objects(pull_objects)([t.object_id for t in iterate_object_tree(tree)], fn)
    assert pulled == contents
    assert (ob.target_of(fn) is None) == (not batched)  # a server without the routes: flwr's path from then on


def test_pushed_objects_land_in_the_store_by_either_path(supernode_api):
    state, client, _, batched = supernode_api
    tree, contents = _model()
    session = state.start_session(RUN_ID)
    missing = state.preregister_object_tree(tree, session)
    assert set(missing) == set(contents)
    fn = make_push_object_fn_protobuf(client.PushObject, Node(node_id=1), RUN_ID, session)
    ob.batching_push_contents(push_object_contents_from_iterable)(iter(contents.items()), fn)
    assert {oid: state.object_store.get(oid) for oid in contents} == contents
    assert bool(ob._unsupported) == (not batched)  # refused (404) once, then flwr's per-object pushes


def test_an_object_not_yet_there_is_waited_for_and_an_unknown_one_fails_as_in_flwr(supernode_api):
    state, client, _, _ = supernode_api
    tree, contents = _model(2)
    state.object_store.preregister(RUN_ID, tree)
    ids = list(contents)
    late = ids[-1]
    for oid in ids[:-1]:
        state.object_store.put(oid, contents[oid])
    threading.Timer(0.3, lambda: state.object_store.put(late, contents[late])).start()
    fn = make_pull_object_fn_protobuf(client.PullObject, Node(node_id=1), RUN_ID)
    pull = ob.batching_pull_objects(pull_objects)
    assert pull(ids, fn, initial_backoff=0.05, backoff_cap=0.2) == contents
    with pytest.raises(ObjectPullError, match="could not be found"):
        pull(["ab" * 32], fn)


@pytest.mark.parametrize("supernode_api", [True], indirect=True, ids=["batch-routes"])
def test_the_batch_routes_refuse_a_caller_without_a_task_token(supernode_api):
    state, client, served, _ = supernode_api
    tree, contents = _model(1)
    state.object_store.preregister(RUN_ID, tree)
    for oid, blob in contents.items():
        state.object_store.put(oid, blob)
    body = ob.ObjectBatchRequest(node=Node(node_id=1), run_id=RUN_ID, object_ids=list(contents)).SerializeToString()
    for headers in ({}, {"flwr-task-token": "not-a-token"}):
        r = httpx.post(f"http://127.0.0.1:{served.port}/v1/runtime/{ob.PULL_PATH}", content=body,
                       headers={"content-type": "application/protobuf", **headers})
        assert r.status_code == 401
        assert not any(blob in r.content for blob in contents.values())


def test_the_superlinks_fleet_batch_routes_authenticate_the_node_like_flwrs_own():
    """The real SuperLink app (its middleware gated as Flotilla runs it): no node signature, no objects."""
    import flwr.superlink.main as slmain

    from flotilla.runtime.lean_middleware import gate_superlink_middleware

    assert gate_superlink_middleware()
    ob._register_request_types()
    app = slmain.create_app()
    app.include_router(ob.fleet_router())
    served = Served(app)
    try:
        body = ob.ObjectBatchRequest(node=Node(node_id=123), run_id=1, object_ids=["a" * 64]).SerializeToString()
        for path in (ob.PULL_PATH, ob.PUSH_PATH, "pull-object"):
            r = httpx.post(f"http://127.0.0.1:{served.port}/v1/fleet/{path}", content=body,
                           headers={"content-type": "application/protobuf"})
            assert r.status_code == 401, (path, r.status_code, r.text)
    finally:
        served.close()


def test_functions_that_are_not_flwrs_go_flwrs_way():
    assert ob.target_of(lambda object_id: b"") is None
    assert ob.target_of(print) is None


@pytest.mark.e2e
def test_a_fleet_whose_servers_lack_the_batch_routes_runs_by_flwrs_path(job_file, tmp_path):
    """SuperLink and SuperNodes without the routes (as one Flotilla did not start): every client is refused once
    (404) and moves its objects one by one, as flwr does; the run completes, nothing left."""
    res = flotilla("run", job_file(rounds=1), "--json", cwd=tmp_path, timeout=600,
                   env=os.environ | {ob.ENABLE_ENV: "clients"})
    assert res.returncode == 0, res.stderr[-3000:]
    s = json.loads(res.stdout.strip().splitlines()[-1])
    assert s["status"] == "completed" and [r["round"] for r in s["rounds"]] == [1]
    assert s["final_accuracy"] > 0.3
    run = find_run(tmp_path / "runs", s["run_id"])
    superlink = run.log_path("superlink").read_text()
    refused = [ln for ln in superlink.splitlines() if '/flotilla-' in ln and 'HTTP/1.1" 404' in ln]
    # each SuperNode asked once, was refused, and moved its objects flwr's way from then on; so did the ServerApp
    assert sum("/v1/fleet/" in ln for ln in refused) == 2, refused
    assert sum("/v1/runtime/" in ln for ln in refused) == 1, refused
    # (a ClientApp refused by its SuperNode's runtime API: test_pulled_objects_... [flwr-routes-only] above)
    assert processes_of(run.dir) == [] and cgroups_of(s["run_id"]) == []


def _nested_codes(module):
    import types

    todo = [f.__code__ for f in vars(module).values() if isinstance(f, types.FunctionType)]
    todo += [f.__wrapped__.__code__ for f in vars(module).values() if hasattr(f, "__wrapped__")
             and isinstance(f.__wrapped__, types.FunctionType)]
    while todo:
        code = todo.pop()
        yield code
        todo.extend(c for c in code.co_consts if isinstance(c, types.CodeType))


def test_the_supernodes_closures_still_name_what_target_of_reads():
    """target_of reads the SuperNode's per-object functions from their closures (flwr builds them inside its
    connection): if flwr renames one, this fails here instead of the SuperNode quietly going object by object."""
    import flwr.supernode.fleet_http_connection as conn
    import flwr.supernode.start_client_internal as sci

    inner = {c.co_name: set(c.co_freevars) for c in _nested_codes(conn)}
    assert {"client", "node", "retry_invoker"} <= inner["pull_object"]
    assert {"client", "node", "retry_invoker"} <= inner["push_object"]
    lambdas = [set(c.co_freevars) for c in _nested_codes(sci) if c.co_name == "<lambda>"]
    assert {"pull_object", "run_id"} in lambdas
