"""Bentos: the immutable, versioned unit that `pkg build` makes and `pkg serve`/`pkg containerize` consume.

A bento is a directory ``$BENTO_LIKE_HOME/bentos/<name>/<version>/``:

    bento.yaml                  the manifest below: the only thing the runtime reads from a bento
    src/                        the service's code
    models/<name>/<version>/    the exact models the service references, in the model store's layout
    env/requirements.lock.txt   every Python package pinned, with hashes
    openapi.json                the HTTP API

The manifest is a schema-versioned msgspec Struct, so a bento built by one version of bento_like is read by
the next. This module reads bentos and manages the store of them; building one is `bento_like.builders.bento`.
"""

from __future__ import annotations

import builtins
import difflib
import functools
import gzip
import hashlib
import os
import re
import shutil
import tarfile
import zlib
from pathlib import Path
from typing import Any, Callable

import msgspec
import yaml

from . import _yaml
from ._archives import ArchiveWriteError, safe_extract, write_archive

SCHEMA_VERSION = 1
MANIFEST_FILE = "bento.yaml"
_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,62}$")
_VERSION = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")


class BentoError(Exception):
    """A bento is missing, malformed or refused; the message says which and why."""


class FileEntry(msgspec.Struct, frozen=True):
    path: str
    size: int
    sha256: str


class APIEntry(msgspec.Struct, frozen=True):
    name: str
    route: str
    inputs: dict[str, str]
    output: str
    batchable: bool = False
    max_batch_size: int = 64
    max_latency_ms: float = 1000.0


class ModelEntry(msgspec.Struct, frozen=True):
    attr: str
    tag: str
    framework: str
    digest: str
    size: int
    requires: tuple[str, ...] = ()
    source: str | None = None
    """The stored model this one was optimized from at build time (its report is in the model's metadata)."""


class DependencyEntry(msgspec.Struct, frozen=True):
    """A service the bento's service depends on that runs as its own server (docs/distributed.md): what a deploy
    step needs to run it as a deployment of its own."""

    name: str
    service: str  # module:Class in src/, as the server finds it
    workers: int = 1
    instances: int | None = None
    resources: dict[str, Any] = {}
    traffic: dict[str, Any] = {}


class PythonEnv(msgspec.Struct, frozen=True):
    version: str
    lock_file: str = "env/requirements.lock.txt"
    requirements: tuple[str, ...] = ()


class BuildInfo(msgspec.Struct, frozen=True):
    bento_like_version: str
    python_version: str
    created_at: str


class BentoManifest(msgspec.Struct, frozen=True, kw_only=True):
    schema_version: int = SCHEMA_VERSION
    name: str
    version: str
    service: str
    service_name: str
    apis: tuple[APIEntry, ...]
    models: tuple[ModelEntry, ...] = ()
    resources: dict[str, Any] = {}
    traffic: dict[str, Any] = {}
    dependencies: tuple[DependencyEntry, ...] = ()
    """The depended-on services that run as their own servers; their models are in ``models`` with the rest."""
    labels: dict[str, str] = {}
    python: PythonEnv
    platform: str = "linux/amd64"
    """The image platform the lock was resolved for (and the image is built for); older bentos are amd64."""
    base_image: str | None = None
    files: tuple[FileEntry, ...] = ()
    reports: dict[str, Any] = {}
    deploy: dict[str, Any] = {}
    """The build config's ``deploy:`` section, as checked at build time: what ``pkg deploy render`` starts from."""
    build: BuildInfo

    @property
    def tag(self) -> str:
        return f"{self.name}:{self.version}"


def encode_manifest(manifest: BentoManifest) -> bytes:
    return yaml.safe_dump(msgspec.to_builtins(manifest), sort_keys=False).encode()


def read_manifest(path: Path) -> BentoManifest:
    file = path / MANIFEST_FILE
    try:
        data = _yaml.read_manifest_bytes(file)
    except FileNotFoundError:
        raise BentoError(f"{path} is not a bento: it has no {MANIFEST_FILE}") from None
    except _yaml.RefusedYAMLError as exc:
        raise BentoError(str(exc)) from None
    return decode_manifest(data, file)


def decode_manifest(raw: bytes, file: Path | str) -> BentoManifest:
    """The manifest in raw (size-capped, no YAML aliases); BentoError names file and the problem."""
    try:
        data = _yaml.load(raw, file)
    except _yaml.RefusedYAMLError as exc:
        raise BentoError(str(exc)) from None
    if not isinstance(data, dict):
        raise BentoError(f"{file}: expected a mapping")
    schema = data.get("schema_version", 0)
    if isinstance(schema, int) and schema > SCHEMA_VERSION:
        raise BentoError(
            f"{file}: schema version {data['schema_version']} is newer than this bento_like reads ({SCHEMA_VERSION})"
        )
    try:
        return msgspec.convert(data, BentoManifest)
    except msgspec.ValidationError as exc:
        raise BentoError(f"{file}: {exc}") from None


def check_name(name: str) -> str:
    if not _NAME.match(name):
        raise BentoError(f"bento name {name!r}: use lowercase letters, digits, '.', '_' or '-' (at most 63)")
    return name


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(2**20):
            digest.update(block)
    return digest.hexdigest()


def home() -> Path:
    return Path(os.environ.get("BENTO_LIKE_HOME", Path.home() / ".bento_like")).expanduser()


class Bento:
    def __init__(self, manifest: BentoManifest, path: Path) -> None:
        self.info = manifest
        self.path = path

    @property
    def tag(self) -> str:
        return self.info.tag

    def verify(self) -> None:
        """Check every file the manifest lists against its size and sha256, and every model it names as
        Model.verify does, with the digest the manifest records."""
        for entry in self.info.files:
            file = self.path / entry.path
            if not file.is_file() or file.stat().st_size != entry.size or sha256_file(file) != entry.sha256:
                raise BentoError(f"bento {self.tag}: file {entry.path!r} is missing or does not match its sha256")
        self.verify_models()

    def verify_models(self, directory: Path | None = None) -> None:
        """Check every model the manifest names as Model.verify does, with the digest the manifest records, in
        `directory` (the model store's layout, e.g. a modelcar's /models) or else the bento's own models/."""
        if not self.info.models:
            return
        from .models import ModelStore, ModelStoreError

        store = ModelStore(directory if directory is not None else self.path / "models")
        where = "" if directory is None else f" in {directory}"
        for model_entry in self.info.models:
            try:
                model = store.get(model_entry.tag)
                model.verify()
            except ModelStoreError as exc:
                raise BentoError(f"bento {self.tag}: model {model_entry.tag}{where}: {exc}") from None
            if model.info.digest != model_entry.digest:
                raise BentoError(f"bento {self.tag}: model {model_entry.tag}{where} is not the one the manifest names")

    def __repr__(self) -> str:
        return f"Bento({self.tag!r}, path={str(self.path)!r})"


class BentoStore:
    def __init__(self, root: str | os.PathLike[str] | None = None) -> None:
        self.root = Path(root) if root is not None else home() / "bentos"

    def get(self, ref: str) -> Bento:
        """A bento by tag (``name:version``, ``name:latest``, ``name``) or by the path of its directory."""
        as_path = Path(ref)
        if (as_path / MANIFEST_FILE).is_file():
            return Bento(read_manifest(as_path), as_path.resolve())
        name, _, version = ref.partition(":")
        version = version or "latest"
        candidates = self.list(name)
        if not candidates:
            everything = self.list()
            known = ", ".join(b.tag for b in everything) or "none"
            close = difflib.get_close_matches(name, sorted({b.info.name for b in everything}), n=1)
            hint = f"; did you mean {close[0]}:{version}?" if close else ""
            raise BentoError(f"no bento {ref!r}{hint} (bentos in {self.root}: {known})")
        if version == "latest":
            return candidates[0]
        for bento in candidates:
            if bento.info.version == version:
                return bento
        raise BentoError(f"no bento {ref!r}; versions of {name}: {', '.join(b.info.version for b in candidates)}")

    def list(self, name: str | None = None) -> builtins.list[Bento]:
        """Bentos, newest first within a name."""
        if not self.root.is_dir():
            return []
        names = [name] if name else sorted(p.name for p in self.root.iterdir() if not p.name.startswith("."))
        found = []
        for n in names:
            versions = []
            folder = self.root / n
            if not folder.is_dir():
                continue
            for v in folder.iterdir():
                if (v / MANIFEST_FILE).is_file():
                    versions.append(Bento(read_manifest(v), v))
            versions.sort(key=lambda b: (b.info.build.created_at, b.info.version), reverse=True)
            found.extend(versions)
        return found

    def delete(self, ref: str) -> str:
        bento = self.get(ref)
        trash = bento.path.with_name(f".deleting-{bento.info.version}")
        os.replace(bento.path, trash)
        shutil.rmtree(trash)
        return bento.tag

    def install(self, staged: Path, manifest: BentoManifest) -> Bento:
        """Move a fully written bento directory into place in one rename; an existing same version wins."""
        final = self.root / manifest.name / manifest.version
        final.parent.mkdir(parents=True, exist_ok=True)
        if final.exists():
            shutil.rmtree(staged, ignore_errors=True)
        else:
            try:
                os.rename(staged, final)
            except OSError:
                if not final.exists():
                    raise
                shutil.rmtree(staged, ignore_errors=True)  # another build installed the same version first
        return Bento(read_manifest(final), final)

    def staging(self) -> Path:
        path = self.root / ".staging" / f"{os.getpid()}-{os.urandom(4).hex()}"
        path.mkdir(parents=True)
        return path

    def export(self, ref: str, dest: str | os.PathLike[str]) -> Path:
        """Write the bento to one tar file (gzip when the name ends in .gz/.tgz); the same bento, the same bytes."""
        bento = self.get(ref)
        bento.verify()
        files = [MANIFEST_FILE, *(e.path for e in bento.info.files)]
        files += sorted(
            str(p.relative_to(bento.path)) for p in (bento.path / "models").rglob("*") if p.is_file()
        )
        try:
            return write_archive(Path(dest), f"{bento.info.name}/{bento.info.version}", bento.path, files)
        except ArchiveWriteError as exc:
            raise BentoError(str(exc)) from None

    def import_(self, source: str | os.PathLike[str]) -> Bento:
        """Add the bento in an archive; anything unsafe or not matching its manifest leaves the store untouched."""
        source = Path(source)
        try:
            tar = tarfile.open(source, "r:*")
        except (tarfile.TarError, OSError) as exc:
            raise BentoError(f"{source}: not a readable bento archive: {exc}") from None
        staged = self.staging()
        try:
            with tar:
                try:
                    manifest, extracted = safe_extract(
                        tar, source, staged, _is_prefix, "bento", BentoError, MANIFEST_FILE,
                        functools.partial(_admit, source),
                    )
                except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile) as exc:
                    raise BentoError(f"{source}: damaged archive: {exc}") from None
            for entry in manifest.files:
                if extracted.get(entry.path) != (entry.size, entry.sha256):
                    raise BentoError(f"{source}: file {entry.path!r} is missing or does not match the manifest")
            _check_models(staged, manifest, source, extracted)
            return self.install(staged, manifest)
        finally:
            shutil.rmtree(staged, ignore_errors=True)


def _is_prefix(name: str, version: str) -> bool:
    return bool(_NAME.match(name) and _VERSION.match(version))


def _admit(source: Path, prefix: str, raw: bytes) -> tuple[BentoManifest, Callable[[str, int], None]]:
    """bento.yaml, and the check each later member passes before it is written: a file bento.yaml lists, at
    its size, or a file of a model it names, within that model's size (its manifest within the manifest limit)."""
    from .models._manifest import MANIFEST_FILE as MODEL_MANIFEST

    manifest = decode_manifest(raw, f"{source}:{prefix}/{MANIFEST_FILE}")
    if f"{manifest.name}/{manifest.version}" != prefix:
        raise BentoError(f"{source}: the manifest describes {manifest.tag} but the files are under {prefix}/")
    sizes = {entry.path: entry.size for entry in manifest.files}
    models = {f"models/{entry.tag.replace(':', '/')}": entry for entry in manifest.models}
    room = {directory: entry.size for directory, entry in models.items()}

    def check(rel: str, size: int) -> None:
        if rel in sizes:
            if size != sizes[rel]:
                raise BentoError(
                    f"{source}: member '{prefix}/{rel}' is {size} bytes in the archive, bento.yaml says {sizes[rel]}"
                )
            return
        directory, inside = "/".join(rel.split("/")[:3]), "/".join(rel.split("/")[3:])
        if directory not in models or not inside:
            raise BentoError(f"{source}: member '{prefix}/{rel}' is not in bento.yaml")
        if inside == MODEL_MANIFEST:
            try:
                _yaml.check_size(size, f"{source}:{prefix}/{rel}")
            except _yaml.RefusedYAMLError as exc:
                raise BentoError(str(exc)) from None
            return
        room[directory] -= size
        if room[directory] < 0:
            entry = models[directory]
            raise BentoError(
                f"{source}: member '{prefix}/{rel}' would take model {entry.tag} past the {entry.size} bytes "
                "bento.yaml gives it"
            )

    return manifest, check


def _check_models(
    staged: Path, manifest: BentoManifest, source: Path, extracted: dict[str, tuple[int, str]]
) -> None:
    """Every model the manifest names is present and passes what a model import checks (its files as its
    manifest says, its manifest's digest that of its content); no other model rides along."""
    from .models import ModelStore, ModelStoreError
    from .models._archive import check_extracted

    store = ModelStore(staged / "models")
    present = {":".join(p.split("/")[1:3]) for p in extracted if p.startswith("models/")}
    expected = {m.tag for m in manifest.models}
    if expected != present:
        raise BentoError(
            f"{source}: models in the archive {sorted(present)} differ from the manifest's {sorted(expected)}"
        )
    for entry in manifest.models:
        directory = f"models/{entry.tag.replace(':', '/')}/"
        files = {p.removeprefix(directory): facts for p, facts in extracted.items() if p.startswith(directory)}
        try:
            model = store.get(entry.tag)
        except ModelStoreError as exc:
            raise BentoError(f"{source}: model {entry.tag}: {exc}") from None
        try:
            check_extracted(model.path, model.info, files, f"{source}: model {entry.tag}")
        except ModelStoreError as exc:
            raise BentoError(str(exc)) from None
        if model.info.digest != entry.digest:
            raise BentoError(f"{source}: model {entry.tag} is not the one the manifest names (digest differs)")
