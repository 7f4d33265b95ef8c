"""Reproducible tar archives of one ``<name>/<version>/`` tree, and their hostile-until-proven-safe extraction.

Used by the model store and the bento store alike: an archive holds only regular files under one
``<name>/<version>/`` prefix, with zeroed owners and times, so the same tree exports to the same bytes.
Extraction refuses links, special files, absolute or ``..`` paths, a second prefix, duplicate members and a
file where a directory is (or the reverse). The manifest comes first and is read before anything else, so every
later member is checked against it by name and declared size before a byte of it is written: an archive can
fill the disk with no more than its manifest admits. Files go into a staging directory the caller installs (or
throws away) in one step.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import secrets
import tarfile
from pathlib import Path, PurePosixPath
from typing import BinaryIO, Callable, Iterable, TypeVar

from . import _yaml

COMPRESSED_SUFFIXES = (".gz", ".tgz")

T = TypeVar("T")
Check = Callable[[str, int], None]
"""check(path inside the prefix, declared size): raises when the manifest does not admit that member."""


def write_archive(dest: Path, prefix: str, root: Path, files: Iterable[str]) -> Path:
    """Write ``root/<file>`` for each relative path in ``files`` as ``<prefix>/<file>`` into ``dest``, atomically.

    gzip-compressed when ``dest`` ends in .gz or .tgz. Raises ArchiveWriteError (an OSError) naming ``dest``
    and the reason when it can't be written."""
    if not dest.parent.is_dir():
        raise ArchiveWriteError(f"cannot write {dest}: the folder {dest.parent} does not exist")
    if dest.is_dir():
        raise ArchiveWriteError(f"cannot write {dest}: it is a folder; give the archive's file name")
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
    except ArchiveWriteError:
        raise
    except OSError as exc:
        raise ArchiveWriteError(f"cannot write {dest}: {exc.strerror or exc}") from exc
    finally:
        partial.unlink(missing_ok=True)
    return dest


class ArchiveWriteError(OSError):
    """An archive could not be written; the message names it and why, for one ``Error:`` line."""


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


MAX_MEMBERS = 100_000
"""More entries than any model or bento has: an archive of millions of empty entries (directories, which no
manifest lists) would fill memory with their headers before any check refused them."""


def safe_extract(
    tar: tarfile.TarFile,
    source: Path,
    staged: Path,
    is_prefix: Callable[[str, str], bool],
    what: str,
    error: type[Exception],
    manifest_file: str,
    admit: Callable[[str, bytes], tuple[T, Check]],
) -> tuple[T, dict[str, tuple[int, str]]]:
    """Extract the regular files into ``staged``; return what ``admit`` made of the manifest and each file's
    (size, sha256).

    The first file must be ``<name>/<version>/<manifest_file>``, within the manifest size limit;
    ``admit(prefix, its bytes)`` parses it (raising for a bad one) and returns it with the check each later
    member passes before it is written."""
    admitted: tuple[T, Check] | None = None
    prefix = ""
    extracted: dict[str, tuple[int, str]] = {}
    files: set[str] = set()
    directories: set[str] = set()
    root = staged.resolve()
    for count, member in enumerate(tar, 1):
        if count > MAX_MEMBERS:
            raise error(f"{source}: more than {MAX_MEMBERS} entries; refused")
        found = member_path(member, source, is_prefix, what, error)
        if found is None:
            continue
        member_prefix, rel = found
        if admitted is None:
            if rel != manifest_file:
                raise error(f"{source}: the first file must be <name>/<version>/{manifest_file}, not {member.name!r}")
            prefix = member_prefix
        elif member_prefix != prefix:
            raise error(f"{source}: holds more than one {what} ({prefix}, {member_prefix})")
        if rel in extracted:
            raise error(f"{source}: member {member.name!r} appears twice")
        parents = ["/".join(rel.split("/")[:i]) for i in range(1, rel.count("/") + 1)]
        clash = rel if rel in directories else next((p for p in parents if p in files), None)
        if clash is not None:
            raise error(f"{source}: '{prefix}/{clash}' is both a file and a directory")
        if admitted is None:
            try:
                _yaml.check_size(member.size, f"{source}:{member.name}")
            except _yaml.RefusedYAMLError as exc:
                raise error(str(exc)) from None
        else:
            admitted[1](rel, member.size)
        target = staged / rel
        if not target.resolve().is_relative_to(root):
            raise error(f"{source}: member {member.name!r} points outside the {what}")
        sha256, data = _write(tar, member, target, source, error, keep=admitted is None)
        extracted[rel] = (member.size, sha256)
        files.add(rel)
        directories.update(parents)
        if admitted is None:
            admitted = admit(prefix, data)
    if admitted is None:
        raise error(f"{source}: holds no {what} files")
    return admitted[0], extracted


def _write(
    tar: tarfile.TarFile, member: tarfile.TarInfo, target: Path, source: Path, error: type[Exception], keep: bool
) -> tuple[str, bytes]:
    """Copy one member to target (its declared size and no more); its sha256, and its bytes when keep."""
    digest = hashlib.sha256()
    kept = bytearray()
    reader = tar.extractfile(member)
    assert reader is not None  # regular files always have a reader
    with reader, _create(target, member, source, error) as out:
        while block := reader.read(2**20):  # read errors mean a damaged archive: the caller reports those
            digest.update(block)
            if keep:
                kept += block
            try:
                out.write(block)
            except OSError as exc:
                raise error(f"{source}: cannot extract member {member.name!r}: {exc.strerror or exc}") from None
    return digest.hexdigest(), bytes(kept)


def _create(target: Path, member: tarfile.TarInfo, source: Path, error: type[Exception]) -> BinaryIO:
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        return open(target, "xb")
    except OSError as exc:
        raise error(f"{source}: cannot extract member {member.name!r}: {exc.strerror or exc}") from None
