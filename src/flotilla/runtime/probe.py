"""What one message of the app costs a device: the app's ClientApp run once on a real message, measured.

Forked from the run's zygote (which has imported the app's ClientApp module,
as every device's processes have) into a memory group of its own without a
limit: the fork holds the same shared pages a device's ClientApp fork does,
so the group's peak charge is what one such message adds to a device. The
message is the one the app's ServerApp built for a device of the class, with
that device's node config and the run's config, so the app loads the same
partition and trains the same way. The reply is thrown away.

    python -m flotilla.runtime.probe --record DIR --device NAME --message FILE --group JSON --out FILE
    out: {"peak_bytes", "start_bytes", "seconds", "ok", "error"?}
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import sys
import time
import tomllib
from pathlib import Path


def _charge(group) -> tuple[int, int]:
    """(charged now, peak so far) of the probe's own group (sandbox.DeviceCgroup)."""
    use = group.usage()
    return use["memory_bytes"], use["memory_peak_bytes"]


def run_config(record: Path) -> dict:
    """The run config a device's ClientApp sees: the app's declared defaults under what the job set."""
    from flotilla.appspec import AppSpec, flatten

    cfg = dict(AppSpec.load(record / "app").config)
    path = record / "run_config.toml"
    if path.is_file():
        cfg |= flatten(tomllib.loads(path.read_text()))
    return cfg


def probe(record: Path, device: str, message_file: Path, group) -> dict:
    from flwr.app import Context, RecordDict

    from flotilla.runtime import preload

    plan = json.loads((record / "plan.json").read_text())
    node_config = next(d["node_config"] for d in plan["devices"] if d["name"] == device)
    message = pickle.loads(message_file.read_bytes())
    preload.set_threads()
    preload.reseed()
    spec = preload.clientapp_ref(record / "app")
    app = preload.load_component(spec)
    context = Context(run_id=message.metadata.run_id, node_id=message.metadata.dst_node_id,
                      node_config=node_config, state=RecordDict(), run_config=run_config(record))
    start, _ = _charge(group)
    t0 = time.perf_counter()
    out = {"start_bytes": start, "ok": True}
    try:
        reply = app(message=message, context=context)
        if reply.has_error():
            out |= {"ok": False, "error": str(reply.error.reason)[:300]}
    except Exception as err:  # noqa: BLE001 - the app's own error: the device would reply with it too
        out |= {"ok": False, "error": f"{type(err).__name__}: {err}"[:300]}
    out["seconds"] = round(time.perf_counter() - t0, 3)
    out["peak_bytes"] = _charge(group)[1]
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description="Measure what one message of the app costs a device")
    ap.add_argument("--record", required=True)
    ap.add_argument("--device", required=True)
    ap.add_argument("--message", required=True)
    ap.add_argument("--group", required=True, help="this process's cgroup (DeviceCgroup.to_state(), JSON)")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    os.environ.pop("FLOTILLA_READY_FILE", None)
    from flotilla.sandbox.device_cgroup import DeviceCgroup

    result = probe(Path(args.record), args.device, Path(args.message), DeviceCgroup.from_state(json.loads(args.group)))
    tmp = f"{args.out}.tmp"
    Path(tmp).write_text(json.dumps(result))
    os.replace(tmp, args.out)
    print(f"flotilla probe {args.device}: {json.dumps(result)}", file=sys.stderr, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
