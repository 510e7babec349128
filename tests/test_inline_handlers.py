"""The SuperNode's runtime API (flwr's own app) answers with its handlers on the event loop: no worker threads."""

import subprocess
import sys

SERVE = r"""
import sys, threading, time
import httpx, uvicorn
from flwr.supercore.object_store import ObjectStoreFactory
from flwr.supernode.main import create_app
from flwr.supernode.nodestate import NodeStateFactory
from flotilla.runtime.inline_handlers import run_handlers_inline
from flotilla.sandbox.procs import free_port

if sys.argv[1] == "inline":
    assert run_handlers_inline()
port = free_port()
app = create_app(state_factory=NodeStateFactory(objectstore_factory=ObjectStoreFactory()))
server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="critical"))
threading.Thread(target=server.run, daemon=True).start()
while not server.started:
    time.sleep(0.05)
codes = set()
with httpx.Client(base_url=f"http://127.0.0.1:{port}") as c:
    for _ in range(20):  # flwr's protobuf body, task-token and version dependencies, then its handler
        r = c.post("/v1/runtime/pull-task-input", content=b"", headers={"content-type": "application/protobuf"})
        codes.add(r.status_code)
        codes.add(c.get("/health").status_code)
workers = [t.name for t in threading.enumerate() if "AnyIO worker" in t.name]
print(sorted(codes), len(workers))
"""


def _serve(mode: str) -> tuple[str, int]:
    out = subprocess.run([sys.executable, "-c", SERVE, mode], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    codes, workers = out.stdout.strip().splitlines()[-1].rsplit(" ", 1)
    return codes, int(workers)


def test_the_supernode_api_answers_the_same_without_worker_threads():
    shipped_codes, shipped_workers = _serve("shipped")
    inline_codes, inline_workers = _serve("inline")
    assert shipped_workers > 0  # as shipped, each request's sync parts ran in AnyIO's worker threads
    assert inline_workers == 0
    assert inline_codes == shipped_codes == "[200, 401]"  # health, and flwr's token check refusing no token
