"""Why a run or a device failed, in the app's own words: the last exception line of its logs."""

from __future__ import annotations

import re
from pathlib import Path

# The last line of a Python traceback: "ValueError: ...", "sklearn.utils._param_validation.InvalidParameterError: ..."
_EXC_LINE = re.compile(r"^(?:[A-Za-z_][\w]*\.)*[A-Za-z_]\w*(?:Error|Exception|Exit|Interrupt|Warning)\b(?::.*)?$")
MAX_QUOTE = 300


def last_exception(text: str) -> str | None:
    """The final 'SomeError: message' line of the last traceback in `text` (None if there is none)."""
    lines = text.splitlines()
    last = None
    in_tb = False
    for line in lines:
        if line.startswith("Traceback (most recent call last)"):
            in_tb = True
            continue
        if in_tb and not line.startswith((" ", "\t")) and line.strip():
            stripped = line.strip()
            if _EXC_LINE.match(stripped):
                last = stripped
                in_tb = False
            elif not stripped.startswith(("During handling", "The above exception")):
                in_tb = False
    return last[:MAX_QUOTE] if last else None


def log_exception(path: Path) -> str | None:
    try:
        return last_exception(path.read_text(errors="replace"))
    except OSError:
        return None


def app_failure(details: str, serverapp_log: Path, device_logs: dict[str, Path]) -> str:
    """One line: what Flower said, the ServerApp's own error and the first ClientApp error, with where to look."""
    parts = []
    server = log_exception(serverapp_log)
    if server:
        parts.append(f"ServerApp raised {server}")
    elif details:
        parts.append(details.strip().splitlines()[0][:MAX_QUOTE])
    for name, path in sorted(device_logs.items()):
        client = log_exception(path)
        if client:
            parts.append(f"ClientApp on {name} raised {client} (logs/{path.name})")
            break
    if not parts:
        parts.append("the Flower run failed without an error message")
    return "; ".join(parts) + f" (ServerApp log: {serverapp_log})"
