"""Flower's APIs run their handlers on the event loop, not in a worker thread per call.

FastAPI hands every synchronous dependency, and flwr's ProtobufRoute every
synchronous handler, to a worker thread (`run_in_threadpool`): a runtime
request at a SuperNode makes three or four such hops (the protobuf body, the
task token, the version check, the handler). Each hop wakes a thread that
must then take the GIL from the loop: at 100 devices on 2 cores, profiles of
the SuperNodes put ~35% of their API thread's time in that hand-off, more
than in the handlers themselves. A SuperNode's handlers (flwr 1.42's
`supernode.servicer.runtime.runtime_handlers` and Flotilla's batch routes)
only read and write its in-memory NodeState and object store, under locks
held for microseconds, and none waits for another request, so here they run
where the request arrives. The same holds for a SuperLink whose state is in
memory (the local target's); one on a database (the container targets':
sqlite can wait seconds for a lock) keeps its threads. What streams (Control
log streams, which sleep between polls) is iterated by Starlette's own
`iterate_in_threadpool`, which this leaves alone.
"""

from __future__ import annotations

# flwr 1.42 / FastAPI: the modules whose `run_in_threadpool` runs a request's synchronous parts
PATCHED = ("fastapi.dependencies.utils", "fastapi.routing", "flwr.supercore.protobuf.routing")


async def run_inline(func, *args, **kwargs):
    """`run_in_threadpool`'s contract (await the sync call's result), on the calling thread."""
    return func(*args, **kwargs)


def run_handlers_inline() -> bool:
    """Patch this process's APIs to call their synchronous parts inline; False where flwr/FastAPI moved them."""
    import importlib

    try:
        modules = [importlib.import_module(name) for name in PATCHED]
    except ImportError:
        return False
    if not all(callable(getattr(m, "run_in_threadpool", None)) for m in modules):
        return False
    for m in modules:
        m.run_in_threadpool = run_inline
    return True
