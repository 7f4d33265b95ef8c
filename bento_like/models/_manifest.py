"""The model manifest: one typed document per stored version, and the tag grammar that names it.

The manifest is the contract between the store, bento builds and the runtime: a manifest written by one
bento_like version must be read by the next, so fields are only ever added (with defaults), never renamed,
and `schema_version` is bumped when a reader would misunderstand an older writer.
"""

from __future__ import annotations

import hashlib
import re
from datetime import date, datetime
from pathlib import Path
from typing import Any

import msgspec

from .. import _yaml
from ._errors import InvalidTagError, ManifestError

SCHEMA_VERSION = 1
MANIFEST_FILE = "manifest.yaml"
LATEST = "latest"
# Files larger than this also get one digest per chunk, so that load can verify chunks on every core at once.
CHUNK_SIZE = 16 * 2**20

_NAME = re.compile(r"[a-z0-9](?:[a-z0-9._-]{0,62}[a-z0-9])?")
_VERSION = re.compile(r"[a-z0-9][a-z0-9._-]{0,127}")
# What version_from_digest makes: a version of this form must be its content's, or it would pass for it.
_DIGEST_VERSION = re.compile(r"[0-9a-f]{16}")


class FileEntry(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    path: str
    """Relative POSIX path inside the version directory."""
    size: int
    sha256: str
    chunk_sha256: list[str] = []
    """sha256 of each CHUNK_SIZE piece, in order; empty for files of one chunk or less."""


class TensorSpec(msgspec.Struct, frozen=True, kw_only=True):
    name: str
    dtype: str
    shape: list[int]
    """-1 marks a dimension that may vary (the batch axis, a sequence length)."""


class Signature(msgspec.Struct, frozen=True, kw_only=True):
    name: str
    """The callable it describes: `forward` for a torch module, `run` for an ONNX session."""
    inputs: list[TensorSpec] = []
    outputs: list[TensorSpec] = []


class ModelInfo(msgspec.Struct, frozen=True, kw_only=True):
    """What the store knows about one model version; stored as `manifest.yaml` beside its files."""

    schema_version: int
    name: str
    version: str
    framework: str
    digest: str
    """sha256 of the content (framework, files, signatures, metadata, labels, details); names the version
    unless one was given, and keys any cache built from this model."""
    created_at: datetime
    files: list[FileEntry]
    signatures: list[Signature] = []
    metadata: dict[str, Any] = {}
    labels: dict[str, str] = {}
    details: dict[str, Any] = {}
    """The adapter's own record, e.g. which forms a torch model was saved in."""
    library_versions: dict[str, str] = {}
    chunk_size: int = CHUNK_SIZE

    @property
    def tag(self) -> str:
        return f"{self.name}:{self.version}"

    @property
    def size(self) -> int:
        return sum(entry.size for entry in self.files)


class _SchemaProbe(msgspec.Struct):
    schema_version: int


class _Content(msgspec.Struct, frozen=True):
    framework: str
    files: list[tuple[str, int, str]]
    signatures: list[Signature]
    metadata: dict[str, Any]
    labels: dict[str, str]
    details: dict[str, Any]


def content_digest(
    framework: str,
    files: list[FileEntry],
    signatures: list[Signature],
    metadata: dict[str, Any],
    labels: dict[str, str],
    details: dict[str, Any],
) -> str:
    """Digest of everything that makes two saves the same model: same content, same version."""
    content = _Content(
        framework=framework,
        files=sorted((entry.path, entry.size, entry.sha256) for entry in files),
        signatures=signatures,
        metadata=metadata,
        labels=labels,
        details=details,
    )
    return "sha256:" + hashlib.sha256(msgspec.json.encode(content, order="sorted")).hexdigest()


def version_from_digest(digest: str) -> str:
    return digest.removeprefix("sha256:")[:16]


def digest_version_error(version: str, digest: str) -> str | None:
    """Why `version` cannot name content with `digest` (it looks like another content's digest), or None."""
    if _DIGEST_VERSION.fullmatch(version) and version != version_from_digest(digest):
        return (
            f"version {version!r} looks like a content digest but the content's is "
            f"{version_from_digest(digest)!r}; name it by another version"
        )
    return None


def content_error(info: ModelInfo) -> str | None:
    """Why the manifest does not describe its own content (its digest, its version), or None. created_at,
    library_versions and chunk_size are records, not content: a copy may rewrite them."""
    expected = content_digest(info.framework, info.files, info.signatures, info.metadata, info.labels, info.details)
    if expected != info.digest:
        return "the manifest's digest does not match what it describes"
    return digest_version_error(info.version, info.digest)


def check_name(name: str) -> str:
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise InvalidTagError(
            f"invalid model name {name!r}: use 1-64 lowercase letters, digits, '.', '_' or '-', "
            "starting and ending with a letter or digit"
        )
    return name


def check_version(version: str) -> str:
    if not isinstance(version, str) or not _VERSION.fullmatch(version) or version == LATEST:
        raise InvalidTagError(
            f"invalid model version {version!r}: use 1-128 lowercase letters, digits, '.', '_' or '-', "
            f"starting with a letter or digit; {LATEST!r} is reserved"
        )
    return version


def parse_tag(tag: str) -> tuple[str, str]:
    """`name` or `name:version` -> (name, version); a bare name means `latest`."""
    if not isinstance(tag, str):
        raise InvalidTagError(f"a model tag is a string like 'mlp:latest', got {type(tag).__name__}")
    name, sep, version = tag.partition(":")
    check_name(name)
    if not sep or version == LATEST:
        return name, LATEST
    return name, check_version(version)


def encode(info: ModelInfo) -> bytes:
    return msgspec.yaml.encode(info)


def decode(data: bytes, source: Path | str) -> ModelInfo:
    """Decode a manifest (size-capped, no YAML aliases), refusing schemas newer than this reader with a
    message that says so."""
    try:
        document = _yaml.load(data, source)
        # the types msgspec.yaml.decode lets through: PyYAML builds timestamps itself
        probe = msgspec.convert(document, _SchemaProbe, builtin_types=(datetime, date))
        if probe.schema_version > SCHEMA_VERSION:
            raise ManifestError(
                f"{source}: manifest schema {probe.schema_version} is newer than this bento_like reads "
                f"({SCHEMA_VERSION}); upgrade bento_like"
            )
        return msgspec.convert(document, ModelInfo, builtin_types=(datetime, date))
    except _yaml.RefusedYAMLError as exc:
        raise ManifestError(str(exc)) from None
    except msgspec.ValidationError as exc:
        raise ManifestError(f"{source}: not a valid model manifest: {exc}") from exc


def read(version_dir: Path) -> ModelInfo:
    path = version_dir / MANIFEST_FILE
    try:
        data = _yaml.read_manifest_bytes(path)
    except FileNotFoundError:
        raise ManifestError(f"{path}: manifest missing") from None
    except _yaml.RefusedYAMLError as exc:
        raise ManifestError(str(exc)) from None
    return decode(data, path)
