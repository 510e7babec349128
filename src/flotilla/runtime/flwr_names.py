"""Every flwr name Flotilla's runtime reaches into beyond Flower's documented API, and why.

Checked against flwr FLWR_CHECKED (pyproject pins it; tests/test_flwr_names.py
fails loudly when the installed flwr differs, or when any name below moved).
Each patch in flotilla.runtime also checks its own target at run time and runs
flwr as shipped, with a line on stderr, if it is gone.

    module                                          name                            used by: for
"""

from __future__ import annotations

import importlib

FLWR_CHECKED = "1.42.0"

# (module, dotted attribute, who uses it and why)
NAMES: list[tuple[str, str, str]] = [
    # the SuperNode (flotilla.runtime.supernode, engine_tuning)
    ("flwr.supernode.start_client_internal", "time", "engine_tuning: its 3 s idle poll and 0.5 s checks shortened"),
    ("flwr.supernode.start_client_internal", "subprocess", "supernode: starts Flotilla's SuperExec"),
    ("flwr.supernode.nodestate.in_memory_nodestate", "InMemoryNodeState.create_task",
     "engine_tuning: wakes the SuperExec on each new task"),
    ("flwr.supernode.nodestate.in_memory_nodestate", "InMemoryNodeState.set_node_id",
     "supernode: writes the device's node id to the record"),
    ("flwr.supernode.cli", "flower_supernode", "supernode: the SuperNode itself"),
    ("flwr.supernode.main", "create_app", "engine_tuning: the first call reuses the app built at import"),
    ("flwr.supernode.main", "app", "engine_tuning: the SuperNode API app built at import"),
    ("flwr.supercore.inflatable.inflatable_utils", "pull_objects", "engine_tuning: object pull back-off 50 ms"),
    ("flwr.supercore.inflatable.inflatable_utils", "pull_and_inflate_object_from_tree",
     "engine_tuning: object pull back-off 50 ms"),
    # the SuperExec (flotilla.runtime.superexec)
    ("flwr.supercore.superexec.run_superexec", "get_executor", "superexec: Flotilla's executor"),
    ("flwr.supercore.superexec.run_superexec", "time", "engine_tuning: the SuperExec sleeps on the wake pipe"),
    ("flwr.supercore.superexec.executor", "LaunchResult", "superexec: the Executor protocol"),
    ("flwr.supercore.superexec.executor.types", "ExecutionSpec", "superexec: the Executor protocol"),
    ("flwr.supercore.superexec.executor.subprocess_executor", "SubprocessExecutor", "superexec: the fallback"),
    ("flwr.supercore.constant", "TaskType", "superexec: ClientApp vs ServerApp tasks"),
    ("flwr.supercore.constant", "ExecutorType", "superexec: only the subprocess executor is replaced"),
    ("flwr.supercore.constant", "TASK_TYPE_TO_APPIO_API_ADDRESS_ARG", "superexec: a task's arguments"),
    ("flwr.supercore.cli", "flower_superexec", "superexec: the SuperExec itself"),
    ("flwr.supercore.tls", "validate_and_resolve_root_certificates", "superexec: a forked ClientApp's TLS"),
    ("flwr.supernode.runtime.run_clientapp", "run_clientapp", "superexec: what a forked ClientApp runs"),
    # imports deferred until used (flotilla.runtime.lean_imports)
    ("flwr.supercore.object_store.sql_object_store", "SqlObjectStore", "lean_imports: the SuperNode's SQL store"),
    ("flwr.supercore.cli.flwr_agentapp", "flwr_agentapp", "lean_imports: an entry point the SuperExec never runs"),
    ("flwr.supercore.cli.flwr_connector", "flwr_connector", "lean_imports: the same"),
    ("flwr.supercore.cli.flwr_model", "flwr_model", "lean_imports: the same"),
    # a dead ClientApp's message answered at once (flotilla.runtime.dead_clientapps)
    ("flwr.supernode.nodestate.in_memory_nodestate", "InMemoryNodeState.finish_task",
     "dead_clientapps: a FAILED ClientApp task answers its message"),
    ("flwr.supernode.nodestate.in_memory_nodestate", "InMemoryNodeState._store_error_replies",
     "dead_clientapps: Flower's own error replies (as on token expiry)"),
    ("flwr.common.constant", "ErrorCode.CLIENT_APP_CRASHED", "dead_clientapps: the error reply's code"),
    ("flwr.common.constant", "SubStatus.FAILED", "dead_clientapps: the task's final status"),
    ("flwr.supercore.constant", "TaskType.CLIENT_APP", "dead_clientapps: only ClientApp tasks"),
    ("flwr.supercore.interceptors", "RuntimeTokenHttpInterceptor", "dead_clientapps: the dead task's token"),
    ("flwr.supercore.retry", "make_simple_http_retry_invoker", "dead_clientapps: a short retry"),
    ("flwr.proto.runtime_pb2", "PushTaskOutputRequest", "dead_clientapps: the task's FAILED status"),
    ("flwr.supercore.exit", "ExitCode.TASK_PROC_EXCEPTION", "dead_clientapps: a ClientApp that replied itself"),
    ("flwr.clientapp.utils", "load_app", "preload: compares the FAB with the preloaded code first"),
    ("flwr.clientapp", "ClientApp.__call__", "stamp: a reply's compute time"),
    # the SuperLink and the ServerApp (flotilla.runtime.superlink, serverapp, observer)
    ("flwr.superlink.cli.flower_superlink", "subprocess", "superlink: starts Flotilla's SuperExec"),
    ("flwr.superlink.cli", "flower_superlink", "superlink: the SuperLink itself"),
    ("flwr.server.superlink.linkstate.in_memory_linkstate", "InMemoryLinkState.store_message_ins",
     "superlink: wakes a SuperNode when a message for it is stored"),
    ("flwr.server.superlink.linkstate.in_memory_linkstate", "InMemoryLinkState.get_message_res",
     "whole_replies: a reply is listed once its objects are all in"),
    ("flwr.supercore.object_store.in_memory_object_store", "InMemoryObjectStore.preregister",
     "whole_replies: reads its `store` entries (is_available, child_object_ids)"),
    # batched object transfers (flotilla.runtime.object_batches), every process of the fleet
    ("flwr.supercore.inflatable.inflatable_utils", "pull_objects", "object_batches: a message's pulls batched"),
    ("flwr.supercore.inflatable.inflatable_utils", "push_object_contents_from_iterable",
     "object_batches: a message's pushes batched"),
    ("flwr.supernode.start_client_internal", "pull_objects", "object_batches: the SuperNode's pulls"),
    ("flwr.supernode.start_client_internal", "push_object_contents_from_iterable",
     "object_batches: the SuperNode's pushes"),
    ("flwr.superlink.grid.http_grid", "pull_objects", "object_batches: the ServerApp's pulls"),
    ("flwr.supercore.inflatable.inflatable_protobuf_utils", "make_pull_object_fn_protobuf",
     "object_batches: its closure (pull_object_protobuf, node, run_id) names the target"),
    ("flwr.supercore.protobuf.client", "ProtobufClient._unary_unary", "object_batches: a batch request"),
    ("flwr.supercore.runtime", "RuntimeHttpClient", "object_batches: runtime API clients"),
    ("flwr.supernode.fleet_http_client", "FleetHttpClient", "object_batches: Fleet API clients"),
    ("flwr.supercore.protobuf.translation", "PROTOBUF_REQUEST_TYPES", "object_batches: the batch routes' body"),
    ("flwr.supercore.protobuf.routing", "ProtobufRoute", "object_batches: the batch routes"),
    ("flwr.superlink.routers.fleet.router", "LinkStateDependency", "object_batches: the Fleet batch routes"),
    ("flwr.superlink.servicer.fleet.fleet_handlers", "pull_object", "object_batches: flwr's handler, per object"),
    ("flwr.superlink.servicer.fleet.fleet_handlers", "push_object", "object_batches: flwr's handler, per object"),
    ("flwr.supercore.dependencies.runtime", "TaskDependency", "object_batches: the runtime batch routes' auth"),
    ("flwr.supercore.dependencies.version", "VersionDependency", "object_batches: the runtime batch routes"),
    ("flwr.supercore.http_logging", "ROUTINE_ACCESS_PATHS", "object_batches: batch requests are routine"),
    ("flwr.superlink.main", "create_app", "object_batches: the SuperLink's app gets the batch routes"),
    ("fastapi.dependencies.utils", "run_in_threadpool", "inline_handlers: sync dependencies, inline"),
    ("fastapi.routing", "_IncludedRouter.effective_candidates", "zygote: a SuperNode's routes worked out once"),
    ("fastapi.routing", "_IncludedRouter.effective_low_priority_routes", "zygote: the same"),
    ("flwr.supercore.telemetry", "create_event", "engine_tuning: no payload built for telemetry that is off"),
    ("flwr.supercore.telemetry", "FLWR_TELEMETRY_ENABLED", "engine_tuning: the same"),
    ("fastapi.routing", "run_in_threadpool", "inline_handlers: sync endpoints, inline"),
    ("flwr.supercore.protobuf.routing", "run_in_threadpool", "inline_handlers: flwr's protobuf handlers, inline"),
    ("flwr.superlink.main", "_get_middleware", "lean_middleware: each layer only for the API it serves"),
    ("flwr.superlink.routers.control.middlewares", "_is_control_path", "lean_middleware: the Control layers' test"),
    ("flwr.superlink.cli", "flwr_serverapp", "serverapp: the ServerApp process itself"),
    ("flwr.superlink.runtime.run_serverapp", "run_", "serverapp: hands the app the observing grid"),
    ("flwr.serverapp.server_app", "ServerApp.__call__", "serverapp: the app held until the fleet is connected"),
    ("flwr.serverapp.strategy", "Strategy.start", "serverapp: the app's aggregates and central evaluation"),
    ("flwr.server.history", "History.add_loss_centralized", "serverapp: legacy API rounds"),
    ("flwr.server.history", "History.add_metrics_centralized", "serverapp: legacy API rounds"),
    ("flwr.server.history", "History.add_loss_distributed", "serverapp: legacy API rounds"),
    ("flwr.server.history", "History.add_metrics_distributed", "serverapp: legacy API rounds"),
    ("flwr.server.history", "History.add_metrics_distributed_fit", "serverapp: legacy API rounds"),
    ("flwr.server.server", "Server.fit", "serverapp: the legacy API's final model"),
    ("flwr.server.server", "Server.fit_round", "serverapp: the legacy API's model after each round (checkpoint)"),
    ("flwr.common.constant", "ErrorCode.NODE_UNAVAILABLE", "observer: a lost device's pending messages"),
    # the driver (flotilla.flower_control)
    ("flwr.supercore.control.control_http_client", "ControlHttpClient", "flower_control: Control API in-process"),
    ("flwr.supercore.interceptors", "RuntimeVersionHttpInterceptor", "flower_control: Control API in-process"),
    ("flwr.proto.control_pb2", "ListNodesRequest", "flower_control: nodes online"),
    ("flwr.proto.control_pb2", "ListRunsRequest", "flower_control: a run's status"),
    ("flwr.proto.control_pb2", "StopRunRequest", "flower_control: stopping a run"),
]


def missing(names: list[tuple[str, str, str]] = NAMES) -> list[str]:
    """The names above that the installed flwr lacks ("module:attr")."""
    out = []
    for module, attr, _ in names:
        try:
            obj = importlib.import_module(module)
            for part in attr.split("."):
                obj = getattr(obj, part)
        except (ImportError, AttributeError):
            out.append(f"{module}:{attr}")
    return out
