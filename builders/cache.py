"""What the build caches under `$BENTO_LIKE_HOME/cache/` hold, and pruning them.

Every cache the builders keep is keyed by content, so any entry can go: the next build that needs it makes it
again. Builds mark an entry used when they reuse it (its marker file's mtime), which is what "least recently
used" means here. The caches:

- `oci/layers/layers/KEY.json` + `oci/layers/blobs/HEX`: image layers (model weights, dependencies), by the
  digest of their content; a blob no record points to is an orphan. `oci/layers/bases/`: registry bases pulled.
- `oci/site-packages/KEY/`: the locked dependencies installed for an image, one per lock (`.complete` marks it).
- `optimize/KEY/`: optimization pass results (exported, quantized models), `entry.json` marks them.
- `locks/KEY.json`: resolved requirement locks.
- left by builds that died: `oci/runtime/build-PID/`, `oci/site-packages/KEY.partial-PID/`, `optimize/.tmp-PID-*`
  and `optimize/.scratch-PID-*`, removed once their process is gone.

Entries used within `GRACE_S` are never removed, so a build running meanwhile keeps what it is reading.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from bento_like.models import home

GRACE_S = 600.0
"""Entries used (or left by a live process) this recently are kept whatever the limits say."""

LEFTOVER_S = 86400.0
"""A build's leftover this old is stale even if a process with its PID runs."""

_PID = re.compile(r"(?:build-|\.partial-|\.tmp-|\.scratch-)(\d+)")


@dataclass(frozen=True)
class CacheEntry:
    kind: str  # layer, orphan blob, site-packages, optimize, lock, leftover
    key: str
    paths: tuple[Path, ...]  # removed together
    size: int  # bytes
    last_used: float  # epoch seconds
    stale: bool = False  # left by a build whose process is gone: removed by any prune


@dataclass
class PruneReport:
    removed: list[CacheEntry] = field(default_factory=list)
    kept: list[CacheEntry] = field(default_factory=list)

    @property
    def freed(self) -> int:
        return sum(e.size for e in self.removed)

    @property
    def remaining(self) -> int:
        return sum(e.size for e in self.kept)


def cache_root() -> Path:
    return home() / "cache"


def touch(path: Path) -> None:
    """Mark a cache entry used now (best effort: a read-only cache still works, it just prunes by age)."""
    try:
        os.utime(path)
    except OSError:
        pass


def entries() -> list[CacheEntry]:
    """Every entry of every build cache, where the builds keep them."""
    # Imported here: the layer and pass caches import `touch` from this module.
    from .oci import default_cache_dir
    from .optimize.cache import default_root

    oci, optimize = default_cache_dir(), default_root()
    return [*_layers(oci / "layers"), *_site_packages(oci / "site-packages"), *_optimize(optimize),
            *_locks(cache_root() / "locks"), *_leftovers(oci, optimize)]


def prune(*, max_size: int | None = None, older_than: float | None = None, dry_run: bool = False) -> PruneReport:
    """Remove leftovers of dead builds, entries unused for `older_than` seconds, then the least recently used
    until what is left takes at most `max_size` bytes. Entries used within `GRACE_S` stay. `dry_run`: report
    what would go, remove nothing."""
    now = time.time()
    found = sorted(entries(), key=lambda e: e.last_used)
    total = sum(e.size for e in found)
    report = PruneReport()
    for entry in found:
        recent = now - entry.last_used < GRACE_S
        too_old = older_than is not None and now - entry.last_used > older_than
        too_big = max_size is not None and total > max_size
        in_use = entry.kind == "leftover" and not entry.stale  # a running build's own files
        if not recent and not in_use and (entry.stale or too_old or too_big):
            report.removed.append(entry)
            total -= entry.size
            if not dry_run:
                for path in entry.paths:
                    _remove(path)
        else:
            report.kept.append(entry)
    return report


def parse_size(text: str) -> int:
    """'500MB', '10G', '1.5GiB', '2048' (bytes) -> bytes."""
    match = re.fullmatch(r"\s*([\d.]+)\s*([kmgt]?)(i?)b?\s*", text.lower())
    if not match:
        raise ValueError(f"{text!r} is not a size; write it like 500MB, 10G or 1.5GiB")
    number, unit, binary = match.groups()
    power = "kmgt".index(unit) + 1 if unit else 0
    return int(float(number) * (1024 if binary else 1000) ** power)


def parse_age(text: str) -> float:
    """'30d', '12h', '90m', '45s' or a number of seconds -> seconds."""
    match = re.fullmatch(r"\s*([\d.]+)\s*([smhdw]?)\s*", text.lower())
    if not match:
        raise ValueError(f"{text!r} is not an age; write it like 30d, 12h or 90m")
    number, unit = match.groups()
    return float(number) * {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}[unit]


# -- the caches -------------------------------------------------------------------------------------------


def _layers(cache: Path) -> Iterator[CacheEntry]:
    blobs = cache / "blobs"
    referenced: set[str] = set()
    for record in sorted((cache / "layers").glob("*.json")):
        try:
            hex_digest = json.loads(record.read_bytes())["digest"].split(":")[1]
        except (OSError, ValueError, KeyError, IndexError, AttributeError):
            yield CacheEntry("layer", record.stem, (record,), _size(record), _mtime(record))
            continue
        referenced.add(hex_digest)
        blob = blobs / hex_digest
        yield CacheEntry("layer", record.stem, (record, blob), _size(record) + _size(blob), _mtime(record))
    if blobs.is_dir():
        for blob in sorted(blobs.iterdir()):
            if blob.name not in referenced:
                yield CacheEntry("orphan blob", blob.name, (blob,), _size(blob), _mtime(blob))
    bases = cache / "bases"  # an OCI layout of the registry bases pulled, one entry for all of them
    if bases.is_dir():
        yield CacheEntry("base images", "bases", (bases,), _size(bases), _mtime(bases / "index.json"))


def _site_packages(directory: Path) -> Iterator[CacheEntry]:
    if directory.is_dir():
        for path in sorted(directory.iterdir()):
            if (path / ".complete").is_file():
                yield CacheEntry("site-packages", path.name, (path,), _size(path), _mtime(path / ".complete"))


def _optimize(directory: Path) -> Iterator[CacheEntry]:
    if directory.is_dir():
        for path in sorted(directory.iterdir()):
            if (path / "entry.json").is_file():
                yield CacheEntry("optimize", path.name, (path,), _size(path), _mtime(path / "entry.json"))
        for path in sorted((directory / "measure").glob("*.json")):
            yield CacheEntry("optimize", f"measure/{path.stem}", (path,), _size(path), _mtime(path))


def _locks(directory: Path) -> Iterator[CacheEntry]:
    for path in sorted(directory.glob("*.json")):
        yield CacheEntry("lock", path.stem, (path,), _size(path), _mtime(path))


def _leftovers(oci: Path, optimize: Path) -> Iterator[CacheEntry]:
    """What builds leave while they run: stale once their process is gone, or after a day (no build runs
    that long: the PID may have been reused)."""
    candidates = [*(oci / "runtime").glob("build-*"), *(oci / "site-packages").glob("*.partial-*"),
                  *optimize.glob(".tmp-*"), *optimize.glob(".scratch-*")]
    now = time.time()
    for path in sorted(candidates):
        match = _PID.search(path.name)
        mtime = _mtime(path)
        stale = match is None or not _alive(int(match.group(1))) or now - mtime > LEFTOVER_S
        yield CacheEntry("leftover", path.name, (path,), _size(path), mtime, stale=stale)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # PermissionError (someone else's process) means alive too
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


def _size(path: Path) -> int:
    try:
        if path.is_symlink() or path.is_file():
            return path.lstat().st_size
        return sum(p.lstat().st_size for p in path.rglob("*") if not p.is_dir() or p.is_symlink())
    except OSError:
        return 0


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        try:
            path.unlink()
        except FileNotFoundError:
            pass
