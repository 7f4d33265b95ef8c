"""``pkg cache``: what the build caches hold (``list``) and making room (``prune``)."""

from __future__ import annotations

import json
import time
from collections import defaultdict
from typing import Any

import click

from .models import OUTPUT, _human, _table


@click.group(name="cache")
def cache_group() -> None:
    """The build caches under $BENTO_LIKE_HOME/cache: image layers, installed dependencies, optimization
    results, locks. Everything there is rebuilt on demand, so any of it may go."""


@cache_group.command(name="list")
@OUTPUT
def list_command(output: str) -> None:
    """Size and last use of each cache, by kind."""
    from ..builders.cache import cache_root, entries

    found = entries()
    if output == "json":
        click.echo(json.dumps({"root": str(cache_root()), "entries": [_document(e) for e in found]}, indent=1))
        return
    by_kind: dict[str, list[Any]] = defaultdict(list)
    for entry in found:
        by_kind[entry.kind].append(entry)
    rows = [["KIND", "ENTRIES", "SIZE", "LAST USED"]]
    for kind, group in sorted(by_kind.items()):
        rows.append([kind, str(len(group)), _human(sum(e.size for e in group)), _ago(max(e.last_used for e in group))])
    rows.append(["total", str(len(found)), _human(sum(e.size for e in found)), ""])
    click.echo(f"{cache_root()}\n{_table(rows)}")


@cache_group.command(name="prune")
@click.option("--max-size", metavar="SIZE", help="Then remove the least recently used until the caches take at most SIZE (500MB, 10G, 1.5GiB).")
@click.option("--older-than", metavar="AGE", help="Remove entries not used for AGE (30d, 12h, 90m).")
@click.option("--dry-run", is_flag=True, help="Print what would be removed; remove nothing.")
@OUTPUT
def prune_command(max_size: str | None, older_than: str | None, dry_run: bool, output: str) -> None:
    """Remove what dead builds left, entries unused for --older-than, then the least recently used beyond
    --max-size. Entries used in the last 10 minutes always stay (a build may be reading them)."""
    from ..builders.cache import parse_age, parse_size, prune

    def parsed(value: str | None, parse: Any, option: str) -> Any:
        try:
            return parse(value) if value is not None else None
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint=option) from exc

    limit = parsed(max_size, parse_size, "--max-size")
    age = parsed(older_than, parse_age, "--older-than")
    report = prune(max_size=limit, older_than=age, dry_run=dry_run)
    if output == "json":
        click.echo(json.dumps({"dry_run": dry_run, "removed": [_document(e) for e in report.removed],
                               "freed": report.freed, "remaining": report.remaining}, indent=1))
        return
    verb = "would remove" if dry_run else "removed"
    for entry in report.removed:
        click.echo(f"{verb} {entry.kind} {entry.key} ({_human(entry.size)}, used {_ago(entry.last_used)})")
    click.echo(f"{verb} {len(report.removed)} entries, {_human(report.freed)}; {len(report.kept)} entries, "
               f"{_human(report.remaining)} remain")


def _document(entry: Any) -> dict[str, Any]:
    return {"kind": entry.kind, "key": entry.key, "size": entry.size, "last_used": entry.last_used,
            "paths": [str(p) for p in entry.paths], "stale": entry.stale}


def _ago(when: float) -> str:
    seconds = max(0.0, time.time() - when)
    for unit, span in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= span:
            return f"{seconds / span:.0f}{unit} ago"
    return "just now"
