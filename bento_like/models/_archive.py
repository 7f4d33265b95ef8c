"""One model version as one tar file, out of the store and back in.

An archive is `<name>/<version>/manifest.yaml` followed by the model's files, with zeroed owners and times, so
the same model exports to the same bytes. Import treats the archive as hostile until proven otherwise: only
regular files under one `<name>/<version>/`, nothing that escapes it, every file exactly as the manifest says,
and pickles only with trust. It extracts into the store's staging area and installs with one rename, so a
refused archive leaves the store as it was.
"""

from __future__ import annotations

import os
import tarfile
import zlib
from pathlib import Path
from typing import TYPE_CHECKING

from .._archives import safe_extract, write_archive
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

def export_model(store: ModelStore, tag: str, path: str | os.PathLike[str]) -> Path:
    """Write the model to `path` (a tar file; gzip-compressed when the name ends in .gz or .tgz).

    The files are verified first: a corrupted model is never exported."""
    model = store.get(tag)
    model.verify()
    files = [MANIFEST_FILE, *(entry.path for entry in model.info.files)]
    return write_archive(Path(path), f"{model.name}/{model.version}", model.path, files)


def _is_tag_prefix(name: str, version: str) -> bool:
    try:
        check_name(name)
        check_version(version)
    except InvalidTagError:
        return False
    return True


def _extract(tar: tarfile.TarFile, source: Path, staged: Path) -> tuple[str, dict[str, tuple[int, str]]]:
    return safe_extract(tar, source, staged, _is_tag_prefix, "model", UnsafeArchiveError)


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

