"""One model version as one tar file, out of the store and back in.

An archive is `<name>/<version>/manifest.yaml` followed by the model's files, with zeroed owners and times, so
the same model exports to the same bytes. Import treats the archive as hostile until proven otherwise: the
manifest first (size-capped, no YAML aliases), then only the regular files it lists at the sizes it lists, under
one `<name>/<version>/`, each exactly as the manifest says; the manifest's digest that of its content, files the
adapter refers to inside the model, and pickles only with trust. It extracts into the store's staging area and
installs with one rename, so a refused archive leaves the store as it was.
"""

from __future__ import annotations

import functools
import gzip
import os
import tarfile
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from .._archives import ArchiveWriteError, safe_extract, write_archive
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
from ._manifest import MANIFEST_FILE, ModelInfo, check_name, check_version, content_error, decode
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
    with tar, store._staging("import") as staged:
        try:
            info, extracted = safe_extract(
                tar, source, staged, _is_tag_prefix, "model", UnsafeArchiveError, MANIFEST_FILE,
                functools.partial(_admit, source),
            )
        except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile) as exc:
            raise UnsafeArchiveError(f"{source}: damaged archive: {exc}") from exc
        check_extracted(staged, info, extracted, str(source))
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
