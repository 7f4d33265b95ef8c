"""The on-disk store: `<root>/<name>/<version>/` holding `manifest.yaml` and the model's files.

Writers never touch a version directory in place: a save (or import) fills a staging directory under
`<root>/.tmp/` on the same filesystem, then renames it to its final name in one step. Two processes saving the
same content race harmlessly: one rename wins, the other finds the same digest there and discards its copy.
Deletes rename the version away before removing it, so readers see a version whole or not at all.
"""

from __future__ import annotations

import difflib
import functools
import importlib.metadata
import os
import platform
import secrets
import shutil
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import msgspec

from . import _archive
from ._adapters import Saved
from ._digest import digest_files, list_files, verify_files
from ._errors import (
    AdapterError,
    IntegrityError,
    InvalidTagError,
    ManifestError,
    ModelExistsError,
    ModelNotFoundError,
    ModelStoreError,
)
from ._manifest import (
    CHUNK_SIZE,
    LATEST,
    MANIFEST_FILE,
    SCHEMA_VERSION,
    ModelInfo,
    check_name,
    check_version,
    content_digest,
    content_error,
    digest_version_error,
    encode,
    parse_tag,
    read,
    version_from_digest,
)
from ._registry import adapter_for, detect

STAGING_DIR = ".tmp"
_STALE_STAGING_S = 24 * 3600


MODEL_STORE_ENV = "BENTO_LIKE_MODEL_STORE"
"""Set when serving a bento: the bento's own models/, which the default store then is."""


def home() -> Path:
    """$BENTO_LIKE_HOME, or ~/.bento_like; read at each call so a process can point it elsewhere."""
    return Path(os.environ.get("BENTO_LIKE_HOME") or "~/.bento_like").expanduser()


class Model:
    """One stored version: its manifest (`info`) and its directory (`path`). Loading is explicit."""

    __slots__ = ("info", "path")

    def __init__(self, info: ModelInfo, path: Path) -> None:
        self.info = info
        self.path = path

    @property
    def tag(self) -> str:
        return self.info.tag

    @property
    def name(self) -> str:
        return self.info.name

    @property
    def version(self) -> str:
        return self.info.version

    def verify(self) -> None:
        """Check that the manifest's digest is that of what it describes (and a digest-like version that
        digest), that the directory holds exactly the files it lists, and each file's size and sha256 (of each
        chunk, for large files); raises IntegrityError naming what differs."""
        problem = content_error(self.info)
        if problem:
            raise IntegrityError(f"{self.tag}: {problem} ({self.path / MANIFEST_FILE})")
        present = list_files(self.path, exclude=frozenset({MANIFEST_FILE}))
        extra = sorted(set(present) - {entry.path for entry in self.info.files})
        if extra:
            raise IntegrityError(f"{self.tag}: files not in the manifest: {extra} ({self.path})")
        verify_files(self.path, self.info.files, self.info.chunk_size, self.tag)

    def path_of(self, item: str) -> str:
        """The path of a file inside this model's directory (BentoML's name); ValueError for a path that leaves it.

        For files saved as they are (a file or a directory given to ``save``), ``item`` may also be relative to
        what was saved: ``path_of("config.json")`` of a saved directory that holds config.json."""
        home = self.path.resolve()
        candidates = [self.path / item]
        root = self.info.details.get("root")
        if self.info.framework == "files" and isinstance(root, str):
            candidates += [self.path / "files" / item, self.path / "files" / root / item]
        for candidate in candidates:
            target = candidate.resolve()
            if not target.is_relative_to(home):
                raise ValueError(f"{self.tag}: {item!r} is outside the model's directory")
            if target.exists():
                return str(target)
        return str(candidates[0].resolve())

    def load(self, device: str = "cpu", *, verify: bool = True, **options: Any) -> Any:
        """The model object, on `device`, as its framework's adapter builds it; options go to the adapter
        (e.g. `form="exported"` for torch, `session_options=` for ONNX)."""
        if verify:
            self.verify()
        return adapter_for(self.info.framework).load(self, device, **options)

    def __repr__(self) -> str:
        return f"Model(tag={self.tag!r}, framework={self.info.framework!r}, path='{self.path}')"


def _normalized(value: dict[str, Any], what: str) -> dict[str, Any]:
    """The value as plain JSON types, so the manifest round-trips it exactly and digests are stable."""
    if not isinstance(value, dict):
        raise ModelStoreError(f"{what} must be a dict, got {type(value).__name__}")
    try:
        return msgspec.json.decode(msgspec.json.encode(value))
    except (TypeError, msgspec.EncodeError) as exc:
        raise ModelStoreError(
            f"{what} must hold only JSON values (str, number, bool, None, list, dict): {exc}"
        ) from exc


def _check_labels(labels: dict[str, str]) -> dict[str, str]:
    if not isinstance(labels, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in labels.items()):
        raise ModelStoreError(f"labels must map str to str, got {labels!r}")
    return dict(labels)


@functools.cache
def _library_versions(libraries: tuple[str, ...]) -> dict[str, str]:
    """Versions of Python, bento_like and the adapter's libraries; looked up once per process."""
    versions = {"python": platform.python_version()}
    for library in ("bento_like", *libraries):
        try:
            versions[library] = importlib.metadata.version(library)
        except importlib.metadata.PackageNotFoundError:
            continue
    return versions


class ModelStore:
    """A store rooted at `root` (the directory holding `<name>/<version>/`).

    The default store is `$BENTO_LIKE_HOME/models`; a bento carries its models in the same layout, so the
    runtime opens `ModelStore(bento_dir / "models")`.
    """

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)

    def __repr__(self) -> str:
        return f"ModelStore('{self.root}')"

    def save(
        self,
        name: str,
        obj: Any,
        *,
        version: str | None = None,
        framework: str | None = None,
        metadata: dict[str, Any] | None = None,
        labels: dict[str, str] | None = None,
        **options: Any,
    ) -> str:
        """Store obj under name and return its tag `name:version`. The version is derived from the
        content unless given; saving the same content again returns the same tag and writes nothing."""
        check_name(name)
        if version is not None:
            check_version(version)
        metadata = _normalized(metadata or {}, "metadata")
        labels = _check_labels(labels or {})
        adapter = adapter_for(framework) if framework else detect(obj)
        with self._staging("save") as staged:
            saved = adapter.save(obj, staged, **options)
            if not isinstance(saved, Saved):
                raise AdapterError(f"adapter {adapter.framework!r} returned {type(saved).__name__}, not Saved")
            details = _normalized(saved.details, "adapter details")
            paths = list_files(staged)
            if not paths:
                raise AdapterError(f"adapter {adapter.framework!r} wrote no files")
            if MANIFEST_FILE in paths:
                raise AdapterError(f"adapter {adapter.framework!r} wrote {MANIFEST_FILE}, which the store owns")
            files = digest_files(staged, paths, CHUNK_SIZE)
            digest = content_digest(adapter.framework, files, saved.signatures, metadata, labels, details)
            if version is not None and (problem := digest_version_error(version, digest)):
                raise InvalidTagError(problem)
            info = ModelInfo(
                schema_version=SCHEMA_VERSION,
                name=name,
                version=version or version_from_digest(digest),
                framework=adapter.framework,
                digest=digest,
                created_at=datetime.now(timezone.utc),
                files=files,
                signatures=saved.signatures,
                metadata=metadata,
                labels=labels,
                details=details,
                library_versions=dict(_library_versions(adapter.libraries)),
                chunk_size=CHUNK_SIZE,
            )
            (staged / MANIFEST_FILE).write_bytes(encode(info))
            return self._install(staged, info)

    def get(self, tag: str) -> Model:
        """The model for `name:version`; `name:latest` (or a bare name) is the newest by creation time."""
        name, version = parse_tag(tag)
        if version != LATEST:
            path = self.root / name / version
            if not path.is_dir():
                raise ModelNotFoundError(self._not_found(tag, name))
            return Model(self._read(path), path)
        infos = self._infos(name)
        if not infos:
            raise ModelNotFoundError(self._not_found(tag, name))
        newest = max(infos, key=lambda info: (info.created_at, info.version))
        return Model(newest, self.root / name / newest.version)

    def list(self, name: str | None = None, *, labels: dict[str, str] | None = None) -> list[Model]:
        """Models by name, newest first within a name; `labels` keeps those carrying all the given labels."""
        names = [check_name(name)] if name is not None else self._names()
        found = []
        for each in names:
            infos = sorted(self._infos(each), key=lambda info: (info.created_at, info.version), reverse=True)
            found += [
                Model(info, self.root / each / info.version)
                for info in infos
                if all(info.labels.get(key) == value for key, value in (labels or {}).items())
            ]
        return found

    def delete(self, tag: str) -> str:
        """Delete one version (`name:version` or `name:latest`) and return its tag."""
        if ":" not in tag:
            raise InvalidTagError(f"delete needs a version: '{tag}:<version>' or '{tag}:latest'")
        model = self.get(tag)
        with self._staging("delete") as trash:
            try:
                os.rename(model.path, trash / "model")
            except FileNotFoundError:
                raise ModelNotFoundError(f"{model.tag} was deleted meanwhile") from None
        with suppress(OSError):  # other versions remain, or a save is filling the name right now
            model.path.parent.rmdir()
        return model.tag

    def export_model(self, tag: str, path: str | os.PathLike[str]) -> Path:
        """Write one model to one archive file (tar; gzip when path ends in .gz or .tgz)."""
        return _archive.export_model(self, tag, path)

    def import_model(self, path: str | os.PathLike[str], *, trust: bool = False) -> str:
        """Add the model in an archive and return its tag; pickle-bearing models need trust=True."""
        return _archive.import_model(self, path, trust=trust)

    def import_layer(self, path: str | os.PathLike[str], *, root: str, tag: str, where: str, trust: bool = False,
                     created_at: datetime | None = None) -> str:
        """Add the model an OCI image layer holds under `<root>/<name>/<version>/` and return its tag (the image
        says it is `tag`; `where` names the layer in errors); checked as import_model checks an archive."""
        return _archive.import_layer(self, path, root=root, tag=tag, where=where, trust=trust, created_at=created_at)

    def tags(self, name: str | None = None) -> list[str]:
        return [model.tag for model in self.list(name)]

    def _names(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(entry.name for entry in self.root.iterdir() if entry.is_dir() and not entry.name.startswith("."))

    def _read(self, path: Path) -> ModelInfo:
        info = read(path)
        if (info.name, info.version) != (path.parent.name, path.name):
            raise ManifestError(f"{path / MANIFEST_FILE}: describes {info.tag}, not {path.parent.name}:{path.name}")
        return info

    def _infos(self, name: str) -> list[ModelInfo]:
        directory = self.root / name
        if not directory.is_dir():
            return []
        infos = []
        for path in sorted(directory.iterdir()):
            try:
                infos.append(self._read(path))
            except ManifestError as exc:
                warnings.warn(f"skipping an unreadable model version: {exc}", stacklevel=3)
        return infos

    def _not_found(self, tag: str, name: str) -> str:
        same_name = self.tags(name) if (self.root / name).is_dir() else []
        if same_name:
            return f"no model {tag!r}; versions of {name!r}: {', '.join(same_name)}"
        others = self.tags()
        if not others:
            return f"no model {tag!r}: the store at {self.root} is empty"
        shown = ", ".join(others[:20]) + (f" and {len(others) - 20} more" if len(others) > 20 else "")
        close = difflib.get_close_matches(name, sorted({t.split(":")[0] for t in others}), n=1)
        hint = f"; did you mean {close[0]}:{tag.partition(':')[2] or 'latest'}?" if close else ""
        return f"no model {tag!r}{hint}; the store at {self.root} holds: {shown}"

    @contextmanager
    def _staging(self, purpose: str) -> Iterator[Path]:
        """A fresh directory on the store's filesystem, removed on exit unless it was renamed away."""
        staging_root = self.root / STAGING_DIR
        staging_root.mkdir(parents=True, exist_ok=True)
        self._sweep(staging_root)
        path = staging_root / f"{purpose}-{os.getpid()}-{secrets.token_hex(6)}"
        path.mkdir()
        try:
            yield path
        finally:
            shutil.rmtree(path, ignore_errors=True)

    @staticmethod
    def _sweep(staging_root: Path) -> None:
        """Remove what crashed writers left behind, once it is a day old."""
        cutoff = time.time() - _STALE_STAGING_S
        for entry in staging_root.iterdir():
            try:
                if entry.stat().st_mtime < cutoff:
                    shutil.rmtree(entry, ignore_errors=True)
            except FileNotFoundError:
                continue

    def _install(self, staged: Path, info: ModelInfo) -> str:
        """Rename a complete staged version into place; identical content already there wins."""
        final = self.root / info.name / info.version
        for _ in range(3):
            final.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.rename(staged, final)
                return info.tag
            except FileNotFoundError:
                continue  # a concurrent delete removed the name directory: make it again
            except OSError:
                if not final.is_dir():
                    raise
                existing = self._read(final)
                if existing.digest == info.digest:
                    return info.tag
                raise ModelExistsError(
                    f"{info.tag} already exists with different content; save under another version or delete it"
                ) from None
        raise ModelStoreError(f"could not install {info.tag} under {final.parent}: it kept disappearing")


def default_store() -> ModelStore:
    """$BENTO_LIKE_MODEL_STORE (set when serving a bento: its own models/), else $BENTO_LIKE_HOME/models."""
    override = os.environ.get(MODEL_STORE_ENV)
    return ModelStore(Path(override) if override else home() / "models")
