"""One model version as one tar file, out of the store and back in.

An archive is `<name>/<version>/manifest.yaml` followed by the model's files, with zeroed owners and times, so
the same model exports to the same bytes. Import treats the archive as hostile until proven otherwise: only
regular files under one `<name>/<version>/`, nothing that escapes it, every file exactly as the manifest says,
and pickles only with trust. It extracts into the store's staging area and installs with one rename, so a
refused archive leaves the store as it was.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import secrets
import tarfile
import zlib
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING

from ._digest import verify_files
from ._errors import (
    AdapterError,
    IntegrityError,
    InvalidTagError,
    ManifestError,
    ModelStoreError,
    TrustRequiredError,
    UnsafeArchiveError,
)
from ._manifest import MANIFEST_FILE, check_name, check_version, content_digest, decode
from ._registry import adapter_for

if TYPE_CHECKING:
    from ._store import ModelStore

_COMPRESSED_SUFFIXES = (".gz", ".tgz")


def export_model(store: ModelStore, tag: str, path: str | os.PathLike[str]) -> Path:
    """Write the model to `path` (a tar file; gzip-compressed when the name ends in .gz or .tgz).

    The files are verified first: a corrupted model is never exported."""
    model = store.get(tag)
    model.verify()
    dest = Path(path)
    partial = dest.with_name(f".{dest.name}.{secrets.token_hex(4)}.partial")
    prefix = f"{model.name}/{model.version}"
    try:
        with open(partial, "wb") as raw:
            compressed = dest.name.endswith(_COMPRESSED_SUFFIXES)
            out = gzip.GzipFile(filename="", fileobj=raw, mode="wb", compresslevel=6, mtime=0) if compressed else raw
            with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
                for rel in [MANIFEST_FILE, *(entry.path for entry in model.info.files)]:
                    source = model.path / rel
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


def _is_tag_prefix(name: str, version: str) -> bool:
    try:
        check_name(name)
        check_version(version)
    except InvalidTagError:
        return False
    return True


def _member_path(member: tarfile.TarInfo, source: Path) -> tuple[str, str] | None:
    """(`name/version`, path inside it) for a regular file; None for a directory; refuses everything else."""
    name = member.name
    if member.issym() or member.islnk():
        raise UnsafeArchiveError(
            f"{source}: member {name!r} is a link to {member.linkname!r}; a model holds only regular files"
        )
    if not (member.isfile() or member.isdir()):
        raise UnsafeArchiveError(f"{source}: member {name!r} is a device, fifo or other special file")
    pure = PurePosixPath(name)
    parts = [part for part in pure.parts if part != "."]
    if pure.is_absolute() or ".." in parts or "\\" in name or not parts:
        raise UnsafeArchiveError(f"{source}: member {name!r} points outside the model (absolute or '..' path)")
    if member.isdir():
        return None  # directories are made from the paths of the files in them
    if len(parts) < 3 or not _is_tag_prefix(parts[0], parts[1]):
        raise UnsafeArchiveError(f"{source}: member {name!r} is not under <name>/<version>/")
    return f"{parts[0]}/{parts[1]}", "/".join(parts[2:])


def _extract(tar: tarfile.TarFile, source: Path, staged: Path) -> tuple[str, dict[str, tuple[int, str]]]:
    """Extract regular files into staged, returning the model prefix and each file's (size, sha256)."""
    prefix = None
    extracted: dict[str, tuple[int, str]] = {}
    root = staged.resolve()
    for member in tar:
        found = _member_path(member, source)
        if found is None:
            continue
        member_prefix, rel = found
        if prefix is None:
            prefix = member_prefix
        elif member_prefix != prefix:
            raise UnsafeArchiveError(f"{source}: holds more than one model ({prefix}, {member_prefix})")
        if rel in extracted:
            raise UnsafeArchiveError(f"{source}: member {member.name!r} appears twice")
        target = staged / rel
        if not target.resolve().is_relative_to(root):
            raise UnsafeArchiveError(f"{source}: member {member.name!r} points outside the model")
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
        raise UnsafeArchiveError(f"{source}: holds no model files")
    return prefix, extracted


def import_model(store: ModelStore, path: str | os.PathLike[str], *, trust: bool = False) -> str:
    """Add the model in the archive at `path` to the store and return its tag.

    Loading pickles runs code. An archive whose model would be unpickled at load (pickle and torch models)
    is refused unless `trust=True`: pass it only for archives from a source you trust."""
    source = Path(path)
    try:
        tar = tarfile.open(source, "r:*")
    except (tarfile.TarError, OSError) as exc:
        raise ModelStoreError(f"{source}: not a readable model archive: {exc}") from exc
    with tar, store._staging("import") as staged:
        try:
            prefix, extracted = _extract(tar, source, staged)
        except (tarfile.TarError, EOFError, zlib.error) as exc:
            raise UnsafeArchiveError(f"{source}: damaged archive: {exc}") from exc
        if MANIFEST_FILE not in extracted:
            raise UnsafeArchiveError(f"{source}: {prefix}/ has no {MANIFEST_FILE}")
        try:
            info = decode((staged / MANIFEST_FILE).read_bytes(), f"{source}:{prefix}/{MANIFEST_FILE}")
        except ManifestError as exc:
            raise UnsafeArchiveError(str(exc)) from exc
        if info.tag.replace(":", "/") != prefix:
            raise UnsafeArchiveError(f"{source}: the manifest describes {info.tag} but the files are under {prefix}/")
        listed = {entry.path for entry in info.files}
        present = set(extracted) - {MANIFEST_FILE}
        if listed != present:
            raise UnsafeArchiveError(
                f"{source}: the manifest does not match the files: not in the manifest "
                f"{sorted(present - listed)}, missing from the archive {sorted(listed - present)}"
            )
        for entry in info.files:
            if extracted[entry.path] != (entry.size, entry.sha256):
                raise UnsafeArchiveError(
                    f"{source}: file {entry.path!r} does not match the manifest's size and sha256"
                )
        try:
            verify_files(staged, [entry for entry in info.files if entry.chunk_sha256], info.chunk_size, info.tag)
        except IntegrityError as exc:
            raise UnsafeArchiveError(f"{source}: {exc}") from exc
        expected = content_digest(
            info.framework, info.files, info.signatures, info.metadata, info.labels, info.details
        )
        if expected != info.digest:
            raise UnsafeArchiveError(f"{source}: the manifest's digest does not match what it describes")
        try:
            runs_code = adapter_for(info.framework).runs_code_on_load(info)
        except AdapterError:
            runs_code = True  # an adapter we do not have cannot vouch for its files
        if runs_code and not trust:
            raise TrustRequiredError(
                f"{source}: {info.tag} is a {info.framework!r} model; loading it unpickles files from the "
                "archive, which runs code. Import it only from a source you trust: trust=True (CLI: --trust)"
            )
        return store._install(staged, info)

