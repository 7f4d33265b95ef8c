"""One model version as one tar file, out of the store and back in.

An archive is `<name>/<version>/manifest.yaml` followed by the model's files, with zeroed owners and times, so
the same model exports to the same bytes. Import treats the archive as hostile until proven otherwise: the
manifest first (size-capped, no YAML aliases), then only the regular files it lists at the sizes it lists, under
one `<name>/<version>/`, each exactly as the manifest says; the manifest's digest that of its content, files the
adapter refers to inside the model, and pickles only with trust. It extracts into the store's staging area and
installs with one rename, so a refused archive leaves the store as it was. An OCI image layer holding a model
under `<root>/<name>/<version>/` (a modelcar's) is imported with the same checks (import_layer).
"""

from __future__ import annotations

import functools
import gzip
import io
import os
import tarfile
import zlib
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import IO, TYPE_CHECKING

import msgspec

from .. import _yaml
from .._archives import MAX_MEMBERS, ArchiveWriteError, member_path, safe_extract, write_archive
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
from ._manifest import MANIFEST_FILE, ModelInfo, check_name, check_version, content_error, decode, encode
from ._registry import adapter_for

if TYPE_CHECKING:
    from ._store import ModelStore

def export_model(store: ModelStore, tag: str, path: str | os.PathLike[str]) -> Path:
    """Write the model to `path` (a tar file; gzip-compressed when the name ends in .gz or .tgz).

    The files are verified first: a corrupted model is never exported."""
    model = store.get(tag)
    model.verify()
    files = [MANIFEST_FILE, *(entry.path for entry in model.info.files)]
    try:
        return write_archive(Path(path), f"{model.name}/{model.version}", model.path, files)
    except ArchiveWriteError as exc:
        raise ModelStoreError(str(exc)) from None


def _is_tag_prefix(name: str, version: str) -> bool:
    try:
        check_name(name)
        check_version(version)
    except InvalidTagError:
        return False
    return True


def _admit(source: Path, prefix: str, data: bytes) -> tuple[ModelInfo, Callable[[str, int], None]]:
    """The archive's manifest, and the check that admits only the files it lists, at the sizes it lists."""
    try:
        info = decode(data, f"{source}:{prefix}/{MANIFEST_FILE}")
    except ManifestError as exc:
        raise UnsafeArchiveError(str(exc)) from exc
    if info.tag.replace(":", "/") != prefix:
        raise UnsafeArchiveError(f"{source}: the manifest describes {info.tag} but the files are under {prefix}/")
    sizes = {entry.path: entry.size for entry in info.files}

    def check(rel: str, size: int) -> None:
        if rel not in sizes:
            raise UnsafeArchiveError(f"{source}: member '{prefix}/{rel}' is not in the manifest")
        if size != sizes[rel]:
            raise UnsafeArchiveError(
                f"{source}: member '{prefix}/{rel}' is {size} bytes in the archive, the manifest says {sizes[rel]}"
            )

    return info, check


def check_extracted(root: Path, info: ModelInfo, extracted: dict[str, tuple[int, str]], where: str) -> None:
    """Raise UnsafeArchiveError unless the files extracted under root, with the (size, sha256) seen while
    extracting them, are exactly what the manifest describes, and the manifest its own content. Shared by
    model and bento import."""
    listed = {entry.path for entry in info.files}
    present = set(extracted) - {MANIFEST_FILE}
    if listed != present:
        raise UnsafeArchiveError(
            f"{where}: the manifest does not match the files: not in the manifest "
            f"{sorted(present - listed)}, missing from the archive {sorted(listed - present)}"
        )
    for entry in info.files:
        if extracted[entry.path] != (entry.size, entry.sha256):
            raise UnsafeArchiveError(f"{where}: file {entry.path!r} does not match the manifest's size and sha256")
    problem = content_error(info)
    if problem:
        raise UnsafeArchiveError(f"{where}: {problem}")
    try:
        verify_files(root, [entry for entry in info.files if entry.chunk_sha256], info.chunk_size, info.tag)
    except IntegrityError as exc:
        raise UnsafeArchiveError(f"{where}: {exc}") from exc
    try:
        adapter = adapter_for(info.framework)
    except AdapterError:
        return  # an adapter we do not have checks nothing; import asks for trust instead
    try:
        adapter.check_files(info, root)
    except ModelStoreError as exc:
        raise UnsafeArchiveError(f"{where}: {exc}") from exc


def import_model(store: ModelStore, path: str | os.PathLike[str], *, trust: bool = False) -> str:
    """Add the model in the archive at `path` to the store and return its tag.

    Loading pickles runs code. An archive whose model would be unpickled at load (pickle and torch models)
    is refused unless `trust=True`: pass it only for archives from a source you trust."""
    source = Path(path)
    try:
        tar = tarfile.open(source, "r:*")
    except (tarfile.TarError, OSError) as exc:
        raise ModelStoreError(f"{source}: not a readable model archive: {exc}") from exc
    with tar:
        return _import(store, tar, source, str(source), trust=trust)


def import_layer(store: ModelStore, path: str | os.PathLike[str], *, root: str, tag: str, where: str,
                 trust: bool = False, created_at: datetime | None = None) -> str:
    """Add the model an OCI image layer holds under `<root>/<name>/<version>/` (a modelcar's: root "models")
    and return its tag, with the checks of import_model; `tag` is the model the image says the layer holds.

    A layer's entries come in name order, so its manifest is found by a first pass over the layer that refuses
    links, special files and paths outside `root` before anything is written. `created_at`, when given, is
    recorded as the model's creation time (a record, not content: the digest does not change)."""
    source = Path(path)
    manifest_name, manifest = _layer_manifest(source, root, where)
    if manifest_name.rsplit("/", 1)[0] != tag.replace(":", "/"):
        raise UnsafeArchiveError(f"{where}: holds {manifest_name.rsplit('/', 1)[0].replace('/', ':')}, "
                                 f"not {tag} as the image says")
    try:
        tar = tarfile.open(source, "r|*")
    except (tarfile.TarError, OSError) as exc:
        raise UnsafeArchiveError(f"{where}: not a readable layer: {exc}") from exc
    with tar:
        return _import(store, _LayerView(tar, root, where, manifest_name, manifest), Path(where), where,
                       trust=trust, created_at=created_at)


def _import(store: ModelStore, tar: tarfile.TarFile | _LayerView, source: Path, where: str, *, trust: bool,
            created_at: datetime | None = None) -> str:
    with store._staging("import") as staged:
        try:
            info, extracted = safe_extract(
                tar, source, staged, _is_tag_prefix, "model", UnsafeArchiveError, MANIFEST_FILE,  # type: ignore[arg-type]
                functools.partial(_admit, source),
            )
        except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile) as exc:
            raise UnsafeArchiveError(f"{where}: damaged archive: {exc}") from exc
        check_extracted(staged, info, extracted, where)
        try:
            runs_code = adapter_for(info.framework).runs_code_on_load(info)
        except AdapterError:
            runs_code = True  # an adapter we do not have cannot vouch for its files
        if runs_code and not trust:
            raise TrustRequiredError(
                f"{where}: {info.tag} is a {info.framework!r} model; loading it unpickles files from the "
                "archive, which runs code. Import it only from a source you trust: trust=True (CLI: --trust)"
            )
        if created_at is not None:
            info = msgspec.structs.replace(info, created_at=created_at)
            (staged / MANIFEST_FILE).write_bytes(encode(info))
        return store._install(staged, info)


def _layer_name(member: tarfile.TarInfo, root: str, where: str) -> str | None:
    """The member's path below `root/` (None for `root` itself and the directories above it), after the checks
    every archive member passes; raises for one outside `root`."""
    name = member.name.removeprefix("./").rstrip("/")
    if name in ("", ".") or (member.isdir() and root.startswith(name + "/")) or name == root:
        return None if member.isdir() else name
    if not name.startswith(root + "/"):
        raise UnsafeArchiveError(f"{where}: member {member.name!r} is outside /{root}: a model layer holds only "
                                 f"/{root}/<name>/<version>/")
    return name[len(root) + 1:]


def _layer_manifest(source: Path, root: str, where: str) -> tuple[str, bytes]:
    """(`<name>/<version>/manifest.yaml`, its bytes) of the one model in the layer, every member checked."""
    found: tuple[str, bytes] | None = None
    try:
        with tarfile.open(source, "r|*") as tar:
            for count, member in enumerate(tar, 1):
                if count > MAX_MEMBERS:
                    raise UnsafeArchiveError(f"{where}: more than {MAX_MEMBERS} entries")
                name = _layer_name(member, root, where)
                if name is None:
                    continue
                member.name = name
                located = member_path(member, Path(where), _is_tag_prefix, "model", UnsafeArchiveError)
                if located is None or located[1] != MANIFEST_FILE:
                    continue
                if found is not None:
                    raise UnsafeArchiveError(f"{where}: more than one model manifest ({found[0]}, {name})")
                _yaml_size(member.size, f"{where}:/{root}/{name}")
                reader = tar.extractfile(member)
                assert reader is not None  # a regular file
                found = (name, reader.read(member.size))
    except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile, OSError) as exc:
        raise UnsafeArchiveError(f"{where}: damaged layer: {exc}") from exc
    if found is None:
        raise UnsafeArchiveError(f"{where}: no /{root}/<name>/<version>/{MANIFEST_FILE} in the layer")
    return found


def _yaml_size(size: int, source: str) -> None:
    try:
        _yaml.check_size(size, source)
    except _yaml.RefusedYAMLError as exc:
        raise UnsafeArchiveError(str(exc)) from None


class _LayerView:
    """A layer as safe_extract reads an archive: its manifest (from the first pass) first, then the other
    members, named as below `root/`. The layer file is ours and unchanged, so both passes read the same bytes."""

    def __init__(self, tar: tarfile.TarFile, root: str, where: str, manifest_name: str, manifest: bytes) -> None:
        self.tar, self.root, self.where = tar, root, where
        self.manifest_name, self.manifest = manifest_name, manifest
        self.first = tarfile.TarInfo(manifest_name)
        self.first.size = len(manifest)

    def __iter__(self) -> Iterator[tarfile.TarInfo]:
        yield self.first
        for member in self.tar:
            name = _layer_name(member, self.root, self.where)
            if name is None or name == self.manifest_name:
                continue
            member.name = name
            yield member

    def extractfile(self, member: tarfile.TarInfo) -> IO[bytes] | None:
        return io.BytesIO(self.manifest) if member is self.first else self.tar.extractfile(member)
