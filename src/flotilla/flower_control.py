"""Flower's Control API, in-process: which nodes are online, a run's status, stopping a run.

`flwr ls` costs a Python start and ~1.4 s of CPU per call; a request on
Flower's own Control API client costs ~10 ms, so the driver can ask every
second and notice the end of a run (or a dead SuperLink) within one.
"""

from __future__ import annotations

from dataclasses import dataclass

from flotilla.errors import RunFailure


class ControlError(RunFailure):
    """The SuperLink's Control API did not answer."""


@dataclass(frozen=True)
class RunState:
    status: str  # pending | starting | running | finished
    sub_status: str  # completed | failed | stopped (when finished)
    details: str

    @property
    def finished(self) -> bool:
        return self.status == "finished"

    def __str__(self) -> str:
        return f"{self.status}:{self.sub_status}" if self.sub_status else self.status


class FlowerControl:
    def __init__(self, address: str, insecure: bool = True, root_certificates: str | None = None,
                 timeout_s: float = 10.0) -> None:
        from flwr.supercore.control.control_http_client import ControlHttpClient
        from flwr.supercore.interceptors import RuntimeVersionHttpInterceptor

        certs = None
        if not insecure and root_certificates:
            with open(root_certificates, "rb") as fh:
                certs = fh.read()
        self._client = ControlHttpClient.from_server_address(
            address, insecure=insecure, root_certificates=certs,
            interceptors=[RuntimeVersionHttpInterceptor(component_name="flwr CLI")],
        )
        self.timeout_s = timeout_s

    def online_nodes(self) -> list[int]:
        from flwr.proto.control_pb2 import ListNodesRequest

        res = self._call("ListNodes", ListNodesRequest())
        return [n.node_id for n in res.nodes_info if n.status == "online"]

    def run_state(self, run_id: int) -> RunState | None:
        from flwr.proto.control_pb2 import ListRunsRequest

        res = self._call("ListRuns", ListRunsRequest(run_id=run_id))
        run = res.run_dict.get(run_id)
        if run is None:
            return None
        return RunState(run.status.status, run.status.sub_status, run.status.details)

    def stop_run(self, run_id: int) -> None:
        from flwr.proto.control_pb2 import StopRunRequest

        self._call("StopRun", StopRunRequest(run_id=run_id))

    def _call(self, method: str, request):
        try:
            return getattr(self._client, method)(request)
        except Exception as err:  # noqa: BLE001 - httpx, protobuf and Flower's own errors alike
            raise ControlError(f"the SuperLink's Control API did not answer {method}: {err}") from err

    def close(self) -> None:
        try:
            self._client.close()
        except Exception:  # noqa: BLE001
            pass
