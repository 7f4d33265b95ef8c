"""The OCI image layout on disk, shared by the image builder and the registry client.

A layout is a directory of content-addressed blobs plus an index naming manifests by tag; `skopeo` reads it as
`oci:DIR:TAG` and a tar of it as `oci-archive:FILE`. JSON here is always canonical (sorted keys, no spaces), since
digests are taken over its bytes.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform as host_platform
import shutil
import tarfile
import uuid
from pathlib import Path
from typing import Any, Mapping

MEDIA_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MEDIA_INDEX = "application/vnd.oci.image.index.v1+json"
MEDIA_CONFIG = "application/vnd.oci.image.config.v1+json"
MEDIA_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_MANIFEST_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
MANIFEST_TYPES = (MEDIA_MANIFEST, DOCKER_MANIFEST)
INDEX_TYPES = (MEDIA_INDEX, DOCKER_MANIFEST_LIST)
# A docker layer or config is byte-for-byte the OCI one under another name (the OCI spec says so).
TO_OCI = {
    "application/vnd.docker.image.rootfs.diff.tar.gzip": MEDIA_LAYER_GZIP,
    "application/vnd.docker.image.rootfs.diff.tar": "application/vnd.oci.image.layer.v1.tar",
    "application/vnd.docker.container.image.v1+json": MEDIA_CONFIG,
}
REF_NAME = "org.opencontainers.image.ref.name"


class ImageError(Exception):
    """A build input is unusable: a missing base, an unreadable layout, a special file in a layer."""


def sha256_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def canonical_json(value: Any) -> bytes:
    """The one JSON spelling of a value: digests of manifests and configs depend on it."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def link_or_copy(src: Path, dest: Path) -> None:
    """Blobs are immutable, so a hard link is as good as a copy and free; across filesystems, copy."""
    if dest.exists():
        return
    tmp = dest.with_name(f".tmp-{uuid.uuid4().hex}")
    try:
        os.link(src, tmp)
    except OSError:
        shutil.copyfile(src, tmp)
    os.replace(tmp, dest)


def atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".tmp-{uuid.uuid4().hex}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


class Layout:
    """An OCI image layout directory: `oci-layout`, `index.json` naming tagged manifests, `blobs/sha256/<hex>`."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        if not (self.root / "oci-layout").is_file():
            raise ImageError(f"{self.root}: not an OCI image layout (no oci-layout file)")

    @classmethod
    def init(cls, root: Path) -> Layout:
        """Open the layout at root, creating an empty one if there is none."""
        root = Path(root)
        (root / "blobs" / "sha256").mkdir(parents=True, exist_ok=True)
        if not (root / "oci-layout").exists():
            atomic_write(root / "oci-layout", canonical_json({"imageLayoutVersion": "1.0.0"}))
        if not (root / "index.json").exists():
            atomic_write(root / "index.json", canonical_json(_empty_index()))
        return cls(root)

    def blob_path(self, digest: str) -> Path:
        algorithm, _, hexdigest = digest.partition(":")
        if algorithm != "sha256" or len(hexdigest) != 64 or not all(c in "0123456789abcdef" for c in hexdigest):
            raise ImageError(f"unsupported or malformed digest {digest!r}")
        return self.root / "blobs" / "sha256" / hexdigest

    def has_blob(self, digest: str) -> bool:
        return self.blob_path(digest).is_file()

    def read_blob(self, digest: str) -> bytes:
        try:
            return self.blob_path(digest).read_bytes()
        except FileNotFoundError:
            raise ImageError(f"{self.root}: blob {digest} is missing") from None

    def write_blob(self, data: bytes) -> tuple[str, int]:
        digest = sha256_digest(data)
        if not self.has_blob(digest):
            atomic_write(self.blob_path(digest), data)
        return digest, len(data)

    def temp_blob_path(self) -> Path:
        """A scratch file beside the blobs, to be renamed into place once its digest is known."""
        return self.root / "blobs" / "sha256" / f".tmp-{uuid.uuid4().hex}"

    def index(self) -> dict[str, Any]:
        return json.loads((self.root / "index.json").read_bytes())

    def tags(self) -> list[str]:
        manifests = self.index().get("manifests", [])
        return [m["annotations"][REF_NAME] for m in manifests if REF_NAME in m.get("annotations", {})]

    def resolve(self, tag: str | None = None) -> dict[str, Any]:
        """The index entry for tag (the only entry when tag is None and there is one)."""
        manifests = self.index().get("manifests", [])
        if tag is None:
            if len(manifests) != 1:
                raise ImageError(f"{self.root}: holds {len(manifests)} images; name a tag ({', '.join(self.tags())})")
            return manifests[0]
        for entry in manifests:
            if entry.get("annotations", {}).get(REF_NAME) == tag:
                return entry
        raise ImageError(f"{self.root}: no image tagged {tag!r} (tags: {', '.join(self.tags()) or 'none'})")

    def set_tag(self, tag: str, descriptor: Mapping[str, Any]) -> None:
        """Point tag at descriptor, keeping the other tags; index.json is replaced atomically."""
        index = self.index()
        kept = [m for m in index.get("manifests", []) if m.get("annotations", {}).get(REF_NAME) != tag]
        entry = dict(descriptor)
        entry["annotations"] = {**entry.get("annotations", {}), REF_NAME: tag}
        index["manifests"] = [*kept, entry]
        atomic_write(self.root / "index.json", canonical_json(index))

    def image_manifest(self, tag: str | None = None,
                       platform: str = "linux/amd64") -> tuple[dict[str, Any], dict[str, Any]]:
        """(descriptor, manifest) of the single-platform image under tag, choosing platform from an index."""
        descriptor = self.resolve(tag)
        manifest = json.loads(self.read_blob(descriptor["digest"]))
        media_type = descriptor.get("mediaType") or manifest.get("mediaType")
        if media_type in INDEX_TYPES:
            descriptor = select_platform(manifest, platform, where=str(self.root))
            manifest = json.loads(self.read_blob(descriptor["digest"]))
        return descriptor, manifest


def _empty_index() -> dict[str, Any]:
    return {"schemaVersion": 2, "mediaType": MEDIA_INDEX, "manifests": []}


def select_platform(index: Mapping[str, Any], platform: str, where: str) -> dict[str, Any]:
    """The entry of an image index for platform ("linux/amd64", "linux/arm64/v8")."""
    os_name, _, rest = platform.partition("/")
    arch, _, variant = rest.partition("/")
    found = []
    for entry in index.get("manifests", []):
        p = entry.get("platform", {})
        if p.get("os") == os_name and p.get("architecture") == arch and (not variant or p.get("variant") == variant):
            found.append(entry)
    if not found:
        offered = sorted({f"{e.get('platform', {}).get('os')}/{e.get('platform', {}).get('architecture')}"
                          for e in index.get("manifests", [])})
        raise ImageError(f"{where}: no image for {platform} (offered: {', '.join(offered)})")
    return found[0]


def host_image_platform() -> str:
    machine = host_platform.machine().lower()
    return "linux/" + {"x86_64": "amd64", "amd64": "amd64", "aarch64": "arm64", "arm64": "arm64"}.get(machine, machine)


def write_archive(layout: Layout, tag: str, archive: Path) -> None:
    """A deterministic tar of a layout holding only `tag`'s image: what `skopeo ... oci-archive:FILE` reads."""
    descriptor, manifest = layout.image_manifest(tag)
    entry = layout.resolve(tag)
    digests = [entry["digest"], descriptor["digest"], manifest["config"]["digest"],
               *(layer["digest"] for layer in manifest["layers"])]
    index = {**_empty_index(), "manifests": [entry]}
    members: list[tuple[str, bytes | Path | None]] = [
        ("blobs", None), ("blobs/sha256", None),
        *sorted((f"blobs/sha256/{d.split(':')[1]}", layout.blob_path(d)) for d in set(digests)),
        ("index.json", canonical_json(index)), ("oci-layout", (layout.root / "oci-layout").read_bytes()),
    ]
    archive.parent.mkdir(parents=True, exist_ok=True)
    tmp = archive.with_name(f".tmp-{uuid.uuid4().hex}")
    try:
        with tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT) as tar:
            for name, content in members:
                info = tarfile.TarInfo(name)
                info.mtime, info.uname, info.gname = 0, "", ""
                if content is None:
                    info.type, info.mode = tarfile.DIRTYPE, 0o755
                    tar.addfile(info)
                elif isinstance(content, Path):
                    info.mode, info.size = 0o644, content.stat().st_size
                    with open(content, "rb") as f:
                        tar.addfile(info, f)
                else:
                    info.mode, info.size = 0o644, len(content)
                    tar.addfile(info, BytesReader(content))
        os.replace(tmp, archive)
    finally:
        tmp.unlink(missing_ok=True)


class BytesReader:
    def __init__(self, data: bytes) -> None:
        self.data, self.offset = data, 0

    def read(self, size: int = -1) -> bytes:
        end = len(self.data) if size < 0 else self.offset + size
        chunk = self.data[self.offset:end]
        self.offset += len(chunk)
        return chunk
