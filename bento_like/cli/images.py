"""``pkg containerize`` and ``pkg push``: a bento as an OCI image, and that image into a registry."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import click

from .bentos import _bento_errors


class _Progress:
    """One line per blob on stderr, redrawn in place on a terminal; never prints credentials."""

    def __init__(self) -> None:
        self.tty = sys.stderr.isatty()
        self.last: dict[str, int] = {}

    def __call__(self, step: Any) -> None:
        short = step.digest.split(":")[-1][:12]
        if step.action in ("exists", "mounted"):
            click.echo(f"  {short}  {step.action}", err=True)
            return
        percent = 100 * step.done // max(1, step.total)
        if self.tty:
            bar = "#" * (percent // 4)
            end = "\n" if step.done >= step.total else ""
            click.echo(f"\r  {short}  {step.action} [{bar:<25}] {percent:3d}% {step.done / 1e6:8.1f} MB", err=True, nl=False)
            if end:
                click.echo("", err=True)
        elif step.done >= step.total or percent - self.last.get(short, -100) >= 25:
            self.last[short] = percent
            click.echo(f"  {short}  {step.action} {percent:3d}% of {step.total / 1e6:.1f} MB", err=True)


def _registry_errors(command):  # type: ignore[no-untyped-def]
    import functools

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> None:
        from ..builders.oci import ImageError
        from ..builders.registry import RegistryError

        try:
            command(*args, **kwargs)
        except (ImageError, RegistryError) as exc:
            raise click.ClickException(str(exc)) from exc

    return wrapper


@click.command()
@click.argument("ref")
@click.option("--base", help="Base image with python3: oci:DIR:TAG, oci-archive:FILE:TAG or a registry reference.")
@click.option("--output", type=click.Path(file_okay=False), help="OCI layout directory [$BENTO_LIKE_HOME/images/NAME].")
@click.option("--archive", type=click.Path(dir_okay=False), help="Also write the image as an OCI archive (tar).")
@click.option("--tag", help="Tag in the layout [the bento's version].")
@click.option("--push", "push_to", help="Then push to REGISTRY/REPO:TAG.")
@click.option("--backend", type=click.Choice(["oci", "docker"]), default="oci", show_default=True,
              help="oci writes the image directly; docker renders a Dockerfile and builds through a Docker API.")
@click.option("--insecure", is_flag=True, help="Plain HTTP to registries (always allowed for 127.0.0.1/localhost).")
@_bento_errors
@_registry_errors
def containerize(ref: str, base: str | None, output: str | None, archive: str | None, tag: str | None,
                 push_to: str | None, backend: str, insecure: bool) -> None:
    """Turn the bento REF into an OCI image.

    The default backend writes the image itself and needs no Docker daemon; `--backend docker` builds it through
    the Docker API that DOCKER_HOST names (dockerd, or podman's service) and leaves it in that daemon's store."""
    if backend == "docker":
        unused = [flag for flag, value in (("--output", output), ("--archive", archive), ("--push", push_to),
                                           ("--insecure", insecure)) if value]
        if unused:
            raise click.UsageError(
                f"{', '.join(unused)} only apply to --backend oci: the docker backend leaves the image in the "
                "daemon's store (push it from there, or build with the default backend)")
        from ..builders.docker_backend import build_with_docker

        image = build_with_docker(ref, base=base, tag=tag, progress=lambda line: click.echo(line, err=True))
        click.echo(image)
        return
    from ..builders.containerize import containerize as build

    result = build(ref, base=base, output=output, archive=archive, tag=tag, insecure_base=insecure, progress=click.echo)
    for layer in result.layers:
        click.echo(f"  {layer.digest.split(':')[1][:12]}  {layer.size / 1e6:9.2f} MB  {layer.source:<6}  {layer.comment}")
    click.echo(f"{result.reference}  {result.manifest_digest}  ({result.seconds:.1f} s)")
    if push_to:
        _push(result.layout, result.tag, push_to, insecure, None)


@click.command()
@click.argument("image")
@click.argument("destination")
@click.option("--mount-from", help="Another repository of the same registry that may already hold the layers.")
@click.option("--insecure", is_flag=True, help="Plain HTTP (always allowed for 127.0.0.1/localhost).")
@_bento_errors
@_registry_errors
def push(image: str, destination: str, mount_from: str | None, insecure: bool) -> None:
    """Push IMAGE (oci:DIR:TAG, or a bento name:version that was containerized) to REGISTRY/REPO:TAG.

    Credentials come from BENTO_LIKE_REGISTRY_USER/BENTO_LIKE_REGISTRY_PASSWORD or ~/.docker/config.json."""
    layout, tag = _image_location(image)
    _push(layout, tag, destination, insecure, mount_from)


def _image_location(image: str) -> tuple[Path, str]:
    if image.startswith("oci:"):
        location, _, tag = image[4:].rpartition(":")
        if not location:
            location, tag = tag, ""
        return Path(location), tag or "latest"
    from ..bentos import BentoStore
    from ..builders.containerize import store_image_dir

    bento = BentoStore().get(image)
    return store_image_dir(bento.info.name), bento.info.version


def _push(layout: Path, tag: str, destination: str, insecure: bool, mount_from: str | None) -> None:
    from ..builders.registry import push_image

    report = push_image(layout, destination, source_tag=tag, insecure=insecure, mount_from=mount_from, progress=_Progress())
    click.echo(
        f"{report.reference}@{report.manifest_digest}: {len(report.uploaded)} uploaded "
        f"({report.bytes_uploaded / 1e6:.1f} MB), {len(report.existing)} already there, {len(report.mounted)} mounted "
        f"({report.seconds:.1f} s)"
    )


COMMANDS = [containerize, push]
