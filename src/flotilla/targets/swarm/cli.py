"""`flotilla cluster nodes`: the swarm's nodes, as placement sees them."""

from __future__ import annotations

import json
from typing import Annotated

import typer

from flotilla.job import format_memory
from flotilla.targets.base import TargetError
from flotilla.targets.swarm.engine import cluster_nodes

NODES_HEADER = ["HOSTNAME", "ROLE", "STATE", "AVAILABILITY", "ARCH", "CPUS", "MEMORY", "LABELS"]


def nodes_table(nodes: list[dict]) -> list[list[str]]:
    """Rows for `flotilla cluster nodes`."""
    rows = []
    for n in nodes:
        labels = ",".join(f"{k}={v}" for k, v in sorted(n["labels"].items())) or "-"
        rows.append([n["hostname"], n["role"] + ("*" if n["leader"] else ""), n["state"], n["availability"],
                     n["arch"], f"{n['cpus']:g}", format_memory(n["memory"]) if n["memory"] else "-", labels])
    return rows


def cluster_nodes_command(
    json_out: Annotated[bool, typer.Option("--json", help="One JSON list instead of a table.")] = False,
    docker_host: Annotated[str | None, typer.Option("-H", "--host", help="Docker daemon of a swarm manager.")] = None,
) -> None:
    """`flotilla cluster nodes`: the swarm's nodes (hostname, arch, CPUs, memory, labels) placement can match."""

    try:
        nodes = cluster_nodes(docker_host)
    except TargetError as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(1) from None
    if json_out:
        typer.echo(json.dumps(nodes, indent=2))
        return
    rows = [NODES_HEADER, *nodes_table(nodes)]
    widths = [max(len(r[i]) for r in rows) for i in range(len(NODES_HEADER))]
    for r in rows:
        typer.echo("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
