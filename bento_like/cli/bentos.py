"""``pkg build`` and the bento store commands: ``pkg list|get|delete|export|import``."""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from typing import Any

import click

from .models import OUTPUT, _human, _table


def _bento_errors(command: Callable[..., None]) -> Callable[..., None]:
    """Turn build and bento store errors (all BentoError, model store or service errors) into a message and exit 1."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> None:
        from ..bentos import BentoError
        from ..models import ModelStoreError
        from ..sdk.api import ServiceDefinitionError

        try:
            command(*args, **kwargs)
        except (BentoError, ModelStoreError, ServiceDefinitionError) as exc:
            raise click.ClickException(str(exc)) from exc

    return wrapper


def _document(bento: Any) -> dict[str, Any]:
    import msgspec

    return {"tag": bento.tag, "path": str(bento.path), **msgspec.to_builtins(bento.info)}


@click.command()
@click.argument("context", default=".", type=click.Path(exists=True, file_okay=False))
@click.option("-f", "--file", "config_file", type=click.Path(exists=True, dir_okay=False), help="Build config [CONTEXT/bentofile.yaml].")
@click.option("--refresh-lock", is_flag=True, help="Resolve the Python requirements again instead of reusing the cached lock.")
@click.option("--allow-secrets", is_flag=True,
              help="Ship files that look like secrets (keys, tokens, .env) instead of refusing to build.")
@OUTPUT
@_bento_errors
def build(context: str, config_file: str | None, refresh_lock: bool, allow_secrets: bool, output: str) -> None:
    """Build the service in CONTEXT into a bento: code, exact models, locked environment, API spec.

    Secrets and junk are left out by default; CONTEXT/.bentoignore (gitignore syntax) excludes more."""
    from ..builders.bento import build_bento

    quiet = output == "json"
    result = build_bento(
        context, config_file=config_file, refresh_lock=refresh_lock, allow_secrets=allow_secrets,
        progress=(lambda _: None) if quiet else click.echo,
    )
    for warning in result.warnings:
        click.echo(f"Warning: {warning}", err=True)
    if quiet:
        click.echo(json.dumps({"tag": result.bento.tag, "path": str(result.bento.path), "created": result.created}))
    else:
        click.echo(f"{result.bento.tag}  ({result.seconds:.1f} s)")


@click.command(name="list")
@click.argument("name", required=False)
@OUTPUT
@_bento_errors
def list_bentos(name: str | None, output: str) -> None:
    """List bentos, newest first within a name."""
    from ..bentos import BentoStore

    bentos = BentoStore().list(name)
    if output == "json":
        click.echo(json.dumps([{"tag": b.tag, "path": str(b.path), "created_at": b.info.build.created_at} for b in bentos]))
        return
    rows = [["TAG", "SERVICE", "MODELS", "SIZE", "CREATED"]]
    for b in bentos:
        size = sum(f.size for f in b.info.files) + sum(m.size for m in b.info.models)
        rows.append([b.tag, b.info.service, str(len(b.info.models)), _human(size), b.info.build.created_at])
    click.echo(_table(rows))


@click.command()
@click.argument("ref")
@OUTPUT
@_bento_errors
def get(ref: str, output: str) -> None:
    """Show one bento's manifest (REF: name:version, name:latest, name, or a bento directory)."""
    from ..bentos import BentoStore, encode_manifest

    bento = BentoStore().get(ref)
    if output == "json":
        click.echo(json.dumps(_document(bento)))
    else:
        click.echo(f"# {bento.path}")
        click.echo(encode_manifest(bento.info).decode(), nl=False)


@click.command()
@click.argument("ref")
@click.option("-y", "--yes", is_flag=True, help="Don't ask for confirmation.")
@_bento_errors
def delete(ref: str, yes: bool) -> None:
    """Delete a bento."""
    from ..bentos import BentoStore

    store = BentoStore()
    tag = store.get(ref).tag
    if not yes:
        click.confirm(f"delete bento {tag}?", abort=True)
    click.echo(f"deleted {store.delete(tag)}")


@click.command(name="export")
@click.argument("ref")
@click.argument("path", type=click.Path(dir_okay=False))
@_bento_errors
def export_bento(ref: str, path: str) -> None:
    """Write a bento to the archive PATH (gzip-compressed when PATH ends in .gz or .tgz)."""
    from ..bentos import BentoStore

    click.echo(str(BentoStore().export(ref, path)))


@click.command(name="import")
@click.argument("path", type=click.Path(exists=True, dir_okay=False))
@_bento_errors
def import_bento(path: str) -> None:
    """Add the bento in the archive PATH to the store and print its tag.

    bento.yaml comes first and every file is checked against it, and each model against its own manifest,
    before the bento is installed."""
    from ..bentos import BentoStore

    click.echo(BentoStore().import_(path).tag)


COMMANDS = [build, list_bentos, get, delete, export_bento, import_bento]
