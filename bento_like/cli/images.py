"""``pkg containerize`` and ``pkg push``: a bento as an OCI image, and that image into a registry."""

from __future__ import annotations

import json
import sys
import threading
from pathlib import Path
from typing import Any

import click

from .bentos import _bento_errors
from .models import OUTPUT


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


class _Steps:
    """containerize's progress lines. On a terminal the layers' lines (they compress in parallel, so their
    lines would interleave) are one block, each layer's line rewritten in place as it goes; elsewhere, and for
    every other step, one line each."""

    def __init__(self, stream: Any) -> None:
        self.stream = stream
        self.tty = bool(getattr(stream, "isatty", lambda: False)())
        self.layers: dict[str, str] = {}  # "layer 2/4" -> its latest line, in the order they first came
        self.drawn = 0  # lines of the block on screen now
        self.lock = threading.Lock()

    def __call__(self, line: str) -> None:
        with self.lock:
            if not self.tty or not line.startswith("layer "):
                if self.tty:
                    self.layers.clear()
                    self.drawn = 0  # the block is done: what follows goes below it
                self.stream.write(line + "\n")
            else:
                self.layers[line.split(":", 1)[0]] = line
                up = f"\x1b[{self.drawn}A" if self.drawn else ""
                self.stream.write(up + "".join(f"\r\x1b[2K{text}\n" for text in self.layers.values()))
                self.drawn = len(self.layers)
            self.stream.flush()


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
@click.option("--base", help="Base image with python3 (with /bin/sh for --model-only): oci:DIR:TAG, "
                            "oci-archive:FILE:TAG or a registry reference [the bento's].")
@click.option("--output", type=click.Path(file_okay=False), help="OCI layout directory [$BENTO_LIKE_HOME/images/NAME].")
@click.option("--archive", type=click.Path(dir_okay=False), help="Also write the image as an OCI archive (tar).")
@click.option("--tag", help="Tag in the layout [the bento's version].")
@click.option("--push", "push_to", help="Then push to REGISTRY/REPO:TAG.")
@click.option("--backend", type=click.Choice(["oci", "docker"]), default="oci", show_default=True,
              help="oci writes the image directly; docker renders a Dockerfile and builds through a Docker API.")
@click.option("--insecure", is_flag=True, help="Plain HTTP to registries (always allowed for 127.0.0.1/localhost).")
@click.option("--model-only", is_flag=True,
              help="Only the models, under /models: a KServe modelcar (storageUri oci://...) [tag VERSION-models]; "
                   "--base scratch builds it on no base (KServe's native OCI mode runs nothing).")
@click.option("--without-models", is_flag=True,
              help="The serving image without its models, which it reads from /mnt/models (BENTO_LIKE_MODELS_DIR), "
                   "where KServe shows a modelcar's [tag VERSION-without-models].")
@click.option("-o", "--out", "out", type=click.Choice(["table", "json"]), default="table", show_default=True,
              help="json prints one JSON document (digest, layers, push) on stdout; progress goes to stderr.")
@_bento_errors
@_registry_errors
def containerize(ref: str, base: str | None, output: str | None, archive: str | None, tag: str | None,
                 push_to: str | None, backend: str, insecure: bool, model_only: bool, without_models: bool,
                 out: str) -> None:
    """Turn the bento REF into an OCI image.

    The default backend writes the image itself and needs no Docker daemon; `--backend docker` builds it through
    the Docker API that DOCKER_HOST names (dockerd, or podman's service) and leaves it in that daemon's store."""
    as_json = out == "json"
    if model_only and without_models:
        raise click.UsageError("--model-only and --without-models make the two halves of one deployment: "
                               "build them one at a time")
    if backend == "docker":
        unused = [flag for flag, value in (("--output", output), ("--archive", archive), ("--push", push_to),
                                           ("--insecure", insecure), ("--model-only", model_only),
                                           ("--without-models", without_models)) if value]
        if unused:
            raise click.UsageError(
                f"{', '.join(unused)} only apply to --backend oci: the docker backend leaves the image in the "
                "daemon's store (push it from there, or build with the default backend)")
        from ..builders.docker_backend import build_with_docker

        image = build_with_docker(ref, base=base, tag=tag, progress=lambda line: click.echo(line, err=True))
        click.echo(json.dumps({"backend": "docker", "image": image}) if as_json else image)
        return
    steps = _Steps(sys.stderr if as_json else sys.stdout)
    if model_only:
        from ..builders.modelcar import containerize_models

        result = containerize_models(ref, base=base, output=output, archive=archive, tag=tag, insecure_base=insecure,
                                     progress=steps)
    else:
        from ..builders.containerize import containerize as build

        result = build(ref, base=base, output=output, archive=archive, tag=tag, insecure_base=insecure,
                       without_models=without_models, progress=steps)
    document: dict[str, Any] = {
        "reference": result.reference, "layout": str(result.layout), "tag": result.tag,
        "digest": result.manifest_digest, "config_digest": result.config_digest,
        "archive": str(result.archive) if result.archive else None, "seconds": round(result.seconds, 3),
        "layers": [{"digest": layer.digest, "size": layer.size, "source": layer.source, "comment": layer.comment}
                   for layer in result.layers],
    }
    if not as_json:
        for layer in result.layers:
            click.echo(f"  {layer.digest.split(':')[1][:12]}  {layer.size / 1e6:9.2f} MB  {layer.source:<6}  {layer.comment}")
        click.echo(f"{result.reference}  {result.manifest_digest}  ({result.seconds:.1f} s)")
    if push_to:
        document["push"] = _push(result.layout, result.tag, push_to, insecure, None, as_json)
    if as_json:
        click.echo(json.dumps(document))


@click.command()
@click.argument("image")
@click.argument("destination")
@click.option("--mount-from", help="Another repository of the same registry that may already hold the layers.")
@click.option("--insecure", is_flag=True, help="Plain HTTP (always allowed for 127.0.0.1/localhost).")
@OUTPUT
@_bento_errors
@_registry_errors
def push(image: str, destination: str, mount_from: str | None, insecure: bool, output: str) -> None:
    """Push IMAGE (oci:DIR:TAG, or a bento name:version that was containerized) to REGISTRY/REPO:TAG.

    Credentials come from BENTO_LIKE_REGISTRY_USER/BENTO_LIKE_REGISTRY_PASSWORD or ~/.docker/config.json."""
    layout, tag = _image_location(image)
    document = _push(layout, tag, destination, insecure, mount_from, output == "json")
    if output == "json":
        click.echo(json.dumps(document))


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


def _push(layout: Path, tag: str, destination: str, insecure: bool, mount_from: str | None,
          quiet: bool) -> dict[str, Any]:
    """Push, print the summary line unless `quiet`, and return the report as a JSON-ready document."""
    from ..builders.registry import push_image

    report = push_image(layout, destination, source_tag=tag, insecure=insecure, mount_from=mount_from, progress=_Progress())
    if not quiet:
        click.echo(
            f"{report.reference}@{report.manifest_digest}: {len(report.uploaded)} uploaded "
            f"({report.bytes_uploaded / 1e6:.1f} MB), {len(report.existing)} already there, {len(report.mounted)} mounted "
            f"({report.seconds:.1f} s)"
        )
    return {"reference": report.reference, "digest": report.manifest_digest, "uploaded": report.uploaded,
            "existing": report.existing, "mounted": report.mounted, "bytes_uploaded": report.bytes_uploaded,
            "seconds": round(report.seconds, 3)}


@click.group()
def base() -> None:
    """Base images for `pkg containerize`: an image with the bento's python3 that the layers go on."""


@base.command("create")
@click.option("--python", "python_version", help="The Python of the image: 3.11 (Debian bookworm) or 3.13 (trixie) [this Python's, else 3.11].")
@click.option("--output", type=click.Path(file_okay=False), help="OCI layout directory [$BENTO_LIKE_HOME/images/base].")
@click.option("--tag", help="Tag in the layout [pythonX.Y].")
@click.option("--mirror", help="Debian mirror [the one apt uses here, else deb.debian.org].")
@click.option("--push", "push_to", help="Then push it to REGISTRY/REPO:TAG.")
@click.option("--insecure", is_flag=True, help="Plain HTTP to the registry (always allowed for 127.0.0.1/localhost).")
@_registry_errors
def create_base_command(python_version: str | None, output: str | None, tag: str | None, mirror: str | None,
                        push_to: str | None, insecure: bool) -> None:
    """Make a Debian minbase + python3 base image with debootstrap (root), without any registry.

    Prints the reference to pass to `pkg containerize --base`."""
    from ..bentos import home
    from ..builders.base import create_base

    out = Path(output) if output else home() / "images" / "base"
    created = create_base(out, python_version=python_version, tag=tag, mirror=mirror,
                          progress=lambda line: click.echo(line, err=True))
    click.echo(f"base: Debian {created.suite} + python{created.python_version}, "
               f"{sum(layer.size for layer in created.image.layers) / 1e6:.1f} MB, {created.seconds:.0f} s", err=True)
    reference = created.reference
    if push_to:
        _push(created.image.layout, created.image.tag, push_to, insecure, None, quiet=True)
        reference = push_to
    click.echo(f"use it: pkg containerize BENTO --base {reference}", err=True)
    click.echo(reference)


COMMANDS = [containerize, push, base]
