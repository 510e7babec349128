"""`flotilla images ...`: build the container image and the wheelhouse it can be built from.

Wired into the main CLI with `app.add_typer(images_app, name="images")`.
"""

from __future__ import annotations

import json
from pathlib import Path

import typer

from flotilla.images.build import DEFAULT_BASE_IMAGE, ImageError, build_image, make_wheelhouse

images_app = typer.Typer(help="Build Flotilla's container image (one image for every role).", no_args_is_help=True)


def _platforms(value: str | None) -> list[str] | None:
    return [p.strip() for p in value.split(",") if p.strip()] if value else None


@images_app.command("build")
def build(
    base_image: str = typer.Option(DEFAULT_BASE_IMAGE, "--base-image", envvar="FLOTILLA_BASE_IMAGE",
                                   help="Base image with Python 3.11 (python3 -m venv must work)."),
    wheelhouse: Path | None = typer.Option(None, "--wheelhouse", file_okay=False,
                                           help="Install only from these wheels (no index): air-gapped builds."),
    platform: str | None = typer.Option(None, "--platform",
                                        help="e.g. linux/arm64,linux/amd64: buildx multi-platform; needs --push."),
    push: str | None = typer.Option(None, "--push", help="REGISTRY/PROJECT to push the image to."),
    tag: str | None = typer.Option(None, "--tag", help="Image name[:tag]; default flotilla:<version> "
                                                       "(also with --app)."),
    app: list[Path] | None = typer.Option(None, "--app", file_okay=False,
                                          help="A Flower App directory: its dependencies and source go into the "
                                               "image (devices preload it). Repeat for several apps."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as one JSON line."),
) -> None:
    """Build the image: flotilla in a venv on BASE_IMAGE, tagged with flotilla's version."""
    try:
        res = build_image(base_image=base_image, wheelhouse=wheelhouse, platforms=_platforms(platform), push=push,
                          tag=tag, app=app or None)
    except ImageError as err:
        typer.echo(f"flotilla images build: {err}", err=True)
        raise typer.Exit(2) from None
    if as_json:
        typer.echo(json.dumps({"tag": res.tag, "seconds": round(res.seconds, 1), "size_bytes": res.size_bytes,
                               "apps": res.apps}))
    else:
        size = f", {res.size_bytes / 1e6:.0f} MB" if res.size_bytes else ""
        apps = f" with app {', '.join(res.apps)}" if res.apps else ""
        typer.echo(f"built {res.tag}{apps} in {res.seconds:.0f} s{size}" + (f"; pushed to {push}" if push else ""))


@images_app.command("wheelhouse")
def wheelhouse_cmd(
    directory: Path = typer.Argument(..., file_okay=False, help="Where to put the wheels."),
    platform: str | None = typer.Option(None, "--platform", help="Also fetch wheels for these platforms."),
    app: list[Path] | None = typer.Option(None, "--app", file_okay=False,
                                          help="Also collect the wheels this Flower App's dependencies need "
                                               "(for `images build --app`). Repeatable."),
) -> None:
    """Collect wheels of flotilla and every dependency, for `images build --wheelhouse DIR`."""
    try:
        wheels = make_wheelhouse(directory, platforms=_platforms(platform), app=app or None)
    except ImageError as err:
        typer.echo(f"flotilla images wheelhouse: {err}", err=True)
        raise typer.Exit(2) from None
    typer.echo(f"{len(wheels)} wheels in {directory}")


if __name__ == "__main__":  # python -m flotilla.images.cli build ... (before the main CLI wires it in)
    images_app()
