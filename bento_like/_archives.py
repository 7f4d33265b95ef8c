"""Reproducible tar archives of one ``<name>/<version>/`` tree, and their hostile-until-proven-safe extraction.

Used by the model store and the bento store alike: an archive holds only regular files under one
``<name>/<version>/`` prefix, with zeroed owners and times, so the same tree exports to the same bytes.
Extraction refuses links, special files, absolute or ``..`` paths, a second prefix and duplicate members, and
writes into a staging directory the caller installs (or throws away) in one step.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import secrets
import tarfile
from pathlib import Path, PurePosixPath
from typing import Callable, Iterable

COMPRESSED_SUFFIXES = (".gz", ".tgz")


def write_archive(dest: Path, prefix: str, root: Path, files: Iterable[str]) -> Path:
    """Write ``root/<file>`` for each relative path in ``files`` as ``<prefix>/<file>`` into ``dest``, atomically.

    gzip-compressed when ``dest`` ends in .gz or .tgz."""
    partial = dest.with_name(f".{dest.name}.{secrets.token_hex(4)}.partial")
    try:
        with open(partial, "wb") as raw:
            compressed = dest.name.endswith(COMPRESSED_SUFFIXES)
            out = gzip.GzipFile(filename="", fileobj=raw, mode="wb", compresslevel=6, mtime=0) if compressed else raw
            with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
                for rel in files:
                    source = root / rel
                    member = tarfile.TarInfo(f"{prefix}/{rel}")
                    member.size = source.stat().st_size
                    member.mode = 0o644
                    with open(source, "rb") as f:
                        tar.addfile(member, f)
            if compressed:
                out.close()
        os.replace(partial, dest)
    finally:
        partial.unlink(missing_ok=True)
    return dest


def member_path(
    member: tarfile.TarInfo, source: Path, is_prefix: Callable[[str, str], bool], what: str, error: type[Exception]
) -> tuple[str, str] | None:
    """(``name/version``, path inside it) for a regular file; None for a directory; refuses everything else."""
    name = member.name
    if member.issym() or member.islnk():
        raise error(f"{source}: member {name!r} is a link to {member.linkname!r}; a {what} holds only regular files")
    if not (member.isfile() or member.isdir()):
        raise error(f"{source}: member {name!r} is a device, fifo or other special file")
    pure = PurePosixPath(name)
    parts = [part for part in pure.parts if part != "."]
    if pure.is_absolute() or ".." in parts or "\\" in name or not parts:
        raise error(f"{source}: member {name!r} points outside the {what} (absolute or '..' path)")
    if member.isdir():
        return None  # directories are made from the paths of the files in them
    if len(parts) < 3 or not is_prefix(parts[0], parts[1]):
        raise error(f"{source}: member {name!r} is not under <name>/<version>/")
    return f"{parts[0]}/{parts[1]}", "/".join(parts[2:])


def safe_extract(
    tar: tarfile.TarFile,
    source: Path,
    staged: Path,
    is_prefix: Callable[[str, str], bool],
    what: str,
    error: type[Exception],
) -> tuple[str, dict[str, tuple[int, str]]]:
    """Extract the regular files into ``staged``; return the prefix and each file's (size, sha256)."""
    prefix = None
    extracted: dict[str, tuple[int, str]] = {}
    root = staged.resolve()
    for member in tar:
        found = member_path(member, source, is_prefix, what, error)
        if found is None:
            continue
        member_prefix, rel = found
        if prefix is None:
            prefix = member_prefix
        elif member_prefix != prefix:
            raise error(f"{source}: holds more than one {what} ({prefix}, {member_prefix})")
        if rel in extracted:
            raise error(f"{source}: member {member.name!r} appears twice")
        target = staged / rel
        if not target.resolve().is_relative_to(root):
            raise error(f"{source}: member {member.name!r} points outside the {what}")
        target.parent.mkdir(parents=True, exist_ok=True)
        digest = hashlib.sha256()
        size = 0
        reader = tar.extractfile(member)
        assert reader is not None  # regular files always have a reader
        with reader, open(target, "xb") as out:
            while block := reader.read(2**20):
                digest.update(block)
                size += len(block)
                out.write(block)
        extracted[rel] = (size, digest.hexdigest())
    if prefix is None:
        raise error(f"{source}: holds no {what} files")
    return prefix, extracted
