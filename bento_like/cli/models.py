"""``pkg models``: list, inspect, delete, export and import stored models, and pull them from a modelcar image."""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from typing import Any

import click

OUTPUT = click.option(
    "-o", "--output", type=click.Choice(["table", "json"]), default="table", show_default=True,
    help="json prints one JSON document for scripts.",
)


def _store_errors(command: Callable[..., None]) -> Callable[..., None]:
    """Turn model store errors into a one-line message and exit status 1."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> None:
        from ..models import ModelStoreError

        try:
            command(*args, **kwargs)
        except ModelStoreError as exc:
            raise click.ClickException(str(exc)) from exc

    return wrapper


def _human(size: int) -> str:
    units = ["B", "KiB", "MiB", "GiB", "TiB"]
    value, unit = float(size), 0
    while value >= 1024 and unit < len(units) - 1:
        value /= 1024
        unit += 1
    return f"{size} B" if unit == 0 else f"{value:.1f} {units[unit]}"


def _document(model: Any) -> dict[str, Any]:
    import msgspec

    return {"tag": model.tag, "path": str(model.path), **msgspec.to_builtins(model.info)}


def _table(rows: list[list[str]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows)


def _signature(signature: Any) -> str:
    def specs(items: list[Any]) -> str:
        return ", ".join(f"{s.name}: {s.dtype}{s.shape}" for s in items)

    return f"{signature.name}({specs(signature.inputs)}) -> {specs(signature.outputs)}"


def _parse_labels(values: tuple[str, ...]) -> dict[str, str]:
    labels = {}
    for value in values:
        key, sep, label = value.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"{value!r} is not KEY=VALUE", param_hint="--label")
        labels[key] = label
    return labels


@click.group("models")
def models_group() -> None:
    """The local model store ($BENTO_LIKE_HOME/models)."""


@models_group.command("list")
@click.argument("name", required=False)
@click.option("-l", "--label", "labels", multiple=True, metavar="KEY=VALUE", help="Only models with this label.")
@OUTPUT
@_store_errors
def list_command(name: str | None, labels: tuple[str, ...], output: str) -> None:
    """List stored models, newest first within a name; NAME keeps one name."""
    from .. import models

    found = models.list(name, labels=_parse_labels(labels))
    if output == "json":
        click.echo(json.dumps([_document(model) for model in found], indent=2))
        return
    if not found:
        click.echo("no models")
        return
    rows = [["TAG", "FRAMEWORK", "SIZE", "CREATED", "LABELS"]]
    for model in found:
        info = model.info
        labels_text = ",".join(f"{k}={v}" for k, v in sorted(info.labels.items()))
        created = info.created_at.strftime("%Y-%m-%d %H:%M:%S")
        rows.append([model.tag, info.framework, _human(info.size), created, labels_text])
    click.echo(_table(rows))


@models_group.command("get")
@click.argument("tag")
@OUTPUT
@_store_errors
def get_command(tag: str, output: str) -> None:
    """Show one model's manifest; TAG is name:version, name:latest or name."""
    from .. import models

    model = models.get(tag)
    if output == "json":
        click.echo(json.dumps(_document(model), indent=2))
        return
    info = model.info
    lines = [
        ("tag", model.tag),
        ("path", str(model.path)),
        ("framework", info.framework),
        ("created", info.created_at.isoformat()),
        ("size", _human(info.size)),
        ("digest", info.digest),
        ("labels", ", ".join(f"{k}={v}" for k, v in sorted(info.labels.items()))),
        ("metadata", json.dumps(info.metadata)),
        ("details", json.dumps(info.details)),
        ("libraries", ", ".join(f"{k} {v}" for k, v in info.library_versions.items())),
    ]
    lines += [("signature", _signature(signature)) for signature in info.signatures]
    lines += [("file", f"{entry.path} ({_human(entry.size)})") for entry in info.files]
    click.echo("\n".join(f"{key + ':':<11} {value}" for key, value in lines))


@models_group.command("delete")
@click.argument("tags", nargs=-1, required=True)
@click.option("-y", "--yes", is_flag=True, help="Do not ask for confirmation.")
@_store_errors
def delete_command(tags: tuple[str, ...], yes: bool) -> None:
    """Delete model versions (name:version or name:latest)."""
    from .. import models

    resolved = [models.get(tag).tag for tag in tags]  # a wrong tag is an error before anything is asked
    if not yes:
        click.confirm(f"Delete {', '.join(resolved)}?", abort=True)
    for tag in resolved:
        click.echo(f"deleted {models.delete(tag)}")


@models_group.command("export")
@click.argument("tag")
@click.argument("path", type=click.Path(dir_okay=False, writable=True))
@_store_errors
def export_command(tag: str, path: str) -> None:
    """Write one model to the archive PATH (gzip-compressed when PATH ends in .gz or .tgz)."""
    from .. import models

    click.echo(str(models.export_model(tag, path)))


@models_group.command("import")
@click.argument("path", type=click.Path(dir_okay=False, exists=True))
@click.option(
    "--trust", is_flag=True,
    help="Accept a model that is unpickled at load (pickle, torch): loading it runs code from the archive.",
)
@OUTPUT
@_store_errors
def import_command(path: str, trust: bool, output: str) -> None:
    """Add the model in the archive PATH to the store and print its tag.

    The archive is checked before it is installed: its manifest comes first (at most $BENTO_LIKE_MAX_MANIFEST_MB
    MiB, default 16, and no YAML aliases), and each file must be one the manifest lists, at its size and sha256."""
    from .. import models

    tag = models.import_model(path, trust=trust)
    click.echo(json.dumps({"tag": tag}) if output == "json" else tag)


@models_group.command("pull")
@click.argument("image")
@click.option("--insecure", is_flag=True, help="Plain HTTP to the registry (always allowed for 127.0.0.1/localhost).")
@click.option(
    "--trust", is_flag=True,
    help="Accept models that are unpickled at load (pickle, torch): serving them runs code from the image.",
)
@click.option("--watch", type=click.FloatRange(min=0.05), metavar="SECONDS",
              help="Keep polling IMAGE's digest every SECONDS and pull each new image, until SIGTERM or Ctrl-C.")
@OUTPUT
@_store_errors
def pull_command(image: str, insecure: bool, trust: bool, watch: float | None, output: str) -> None:
    """Add the models of the modelcar IMAGE (pkg containerize --model-only) to the store.

    Only the layers of models the store lacks are fetched; each model is checked as `pkg models import` checks an
    archive, and added whole or not at all. With --watch, `pkg serve --watch-models` over this store swaps in each
    new version pushed to IMAGE's tag."""
    from ..builders.oci import ImageError
    from ..builders.registry import RegistryError

    try:
        if watch is not None:
            _watch(image, insecure, trust, watch)
            return
        from ..builders.models_pull import pull_models
        from .images import _Progress

        report = pull_models(image, insecure=insecure, trust=trust, progress=_Progress())
    except (ImageError, RegistryError) as exc:
        raise click.ClickException(str(exc)) from exc
    if output == "json":
        click.echo(json.dumps({"reference": report.reference, "digest": report.digest, "added": report.added,
                               "existing": report.existing, "bytes_downloaded": report.bytes_downloaded,
                               "seconds": round(report.seconds, 3)}))
        return
    for tag in report.added:
        click.echo(f"added {tag}")
    click.echo(f"{report.reference}@{report.digest}: {len(report.added)} added, {len(report.existing)} already "
               f"there ({report.seconds:.1f} s)")


def _watch(image: str, insecure: bool, trust: bool, interval: float) -> None:
    """Poll until SIGTERM or SIGINT, which end it with status 0 once the pull under way (if any) is done."""
    import signal
    import threading
    import time

    from ..builders.models_pull import watch_models

    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    click.echo(f"watching {image} every {interval:g} s", err=True)
    watch_models(image, interval=interval, stop=stop, insecure=insecure, trust=trust,
                 report=lambda line: click.echo(f"{time.strftime('%H:%M:%S')} {line}", err=True))
