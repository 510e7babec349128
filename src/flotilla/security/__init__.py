"""Security by default off-localhost: TLS for the SuperLink, authenticated SuperNodes.

`flotilla certs JOB [-o DIR]` (wired by the CLI as `certs_command`) makes the
CA, the SuperLink certificate with the job's SANs and one auth key pair per
device. Swarm and Kubernetes targets use the bundle unless `--insecure`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from flotilla.security.certs import (
    MANIFEST,
    CertBundle,
    CertError,
    NodeKey,
    default_sans,
    flwr_connection_toml,
    load_bundle,
    make_certs,
    private_key_markers,
    register_nodes,
)

CERTS_ROOT = Path("certs")  # relative to the working directory, like runs_dir


def default_cert_dir(job_name: str) -> Path:
    return CERTS_ROOT / job_name


def bundle_for_plan(plan, out_dir: Path | None = None, extra_sans: list[str] | tuple[str, ...] = (),
                    namespace: str | None = None) -> CertBundle:
    """The job's bundle, made or completed (new devices get keys) as needed.

    SANs a user added with `flotilla certs --san` are kept: a target never drops a name.
    """
    job = plan.job
    out = Path(out_dir or default_cert_dir(job.name))
    try:
        kept = json.loads((out / MANIFEST).read_text())["sans"]
    except (OSError, ValueError, KeyError):
        kept = []
    sans = default_sans(job.name, namespace=namespace, extra=[*kept, *extra_sans])
    return make_certs(out, sans, [d.name for d in plan.devices])


def certs_command(
    job: Annotated[Path, typer.Argument(help="Job file (YAML).")],
    out: Annotated[Path | None, typer.Option("-o", "--out",
                                             help="Directory for the bundle [default: certs/<job>].")] = None,
    san: Annotated[list[str] | None, typer.Option("--san", help="Extra DNS name or IP of the SuperLink (repeatable), "
                                                  "e.g. the Swarm manager's address.")] = None,
    days: Annotated[int, typer.Option(help="Validity in days.")] = 365,
    force: Annotated[bool, typer.Option("--force", help="Make a new CA and keys even if a bundle exists.")] = False,
) -> None:
    """Make the CA, the SuperLink certificate and SuperNode auth keys for JOB."""
    from flotilla.job import JobError, load_job
    from flotilla.plan import make_plan

    try:
        plan = make_plan(load_job(job, check_paths=False))
        out_dir = out or default_cert_dir(plan.job.name)
        b = make_certs(out_dir, default_sans(plan.job.name, extra=san or []), [d.name for d in plan.devices],
                       days=days, force=force)
    except (JobError, CertError) as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(2) from None
    typer.echo(f"certificates for {plan.job.name} in {b.dir}")
    typer.echo(f"  CA           {b.ca_cert}")
    typer.echo(f"  SuperLink    {b.server_cert} (SANs: {', '.join(b.sans)})")
    typer.echo(f"  SuperNodes   {len(b.nodes)} key pairs in {b.dir / 'supernodes'} (private keys 0600)")
    typer.echo("Swarm and k8s targets use this bundle; keep the *.key files private.")


__all__ = [
    "CertBundle", "CertError", "NodeKey", "bundle_for_plan", "certs_command", "default_cert_dir", "default_sans",
    "flwr_connection_toml", "load_bundle", "make_certs", "private_key_markers", "register_nodes",
]
