"""Deterministic layers: layer specs expanded into sorted entries, streamed as tar -> gzip into a layout.

Every entry gets the build's epoch as mtime and numeric owners without names; the tar is PAX, the gzip header has
mtime 0 and no file name, and the compression level is fixed. A layer's cache key is the digest of everything that
decides its bytes, so a hit can reuse a blob without compressing anything.
"""

from __future__ import annotations

import fnmatch
import gzip
import hashlib
import json
import os
import stat
import tarfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import IO, Any, Callable, Literal, Mapping, Sequence

from .cache import touch
from ._oci_layout import MEDIA_LAYER_GZIP, BytesReader, ImageError, Layout, atomic_write, canonical_json, link_or_copy

# Part of every layer's cache key: change it whenever the bytes a layer spec turns into would change.
_LAYER_FORMAT = "bento_like-layer-1"
_READ_SIZE = 2**20


@dataclass(frozen=True)
class Tree:
    """A host directory copied to `dest` in the image.

    By default modes are normalized (0755 for directories and executables, 0644 for other files) and every entry
    belongs to the layer's owner, so a checkout's umask or owner never changes a digest. `preserve` keeps the
    files' own modes and owners instead: that is for root filesystems, where setuid bits and system groups matter.
    """

    src: Path
    dest: str
    preserve: bool = False
    exclude: tuple[str, ...] = ()


@dataclass(frozen=True)
class File:
    """One file at `dest` in the image, from bytes, text, or a host file; mode defaults to 0644 (0755 if executable)."""

    dest: str
    content: bytes | str | Path
    mode: int | None = None


@dataclass(frozen=True)
class LayerSpec:
    """What one layer holds: trees and files, owned by `owner` (uid, gid) unless a tree preserves its own owners.

    Parent directories of every destination are added as root-owned 0755 entries, so a layer unpacks on any base.
    When two sources give the same path, the later one wins, as with a Dockerfile's COPY.
    """

    comment: str
    sources: tuple[Tree | File, ...]
    owner: tuple[int, int] = (0, 0)

    @classmethod
    def directory(cls, src: Path, dest: str, *, comment: str | None = None, owner: tuple[int, int] = (0, 0),
                  preserve: bool = False, exclude: Sequence[str] = ()) -> LayerSpec:
        # The default comment names only the image path: a host path would make the digest depend on the checkout.
        return cls(comment or dest, (Tree(Path(src), dest, preserve, tuple(exclude)),), owner)

    @classmethod
    def files(cls, files: Mapping[str, bytes | str | Path], *, comment: str, owner: tuple[int, int] = (0, 0),
              mode: int | None = None) -> LayerSpec:
        return cls(comment, tuple(File(dest, content, mode) for dest, content in files.items()), owner)

    def __add__(self, other: LayerSpec) -> LayerSpec:
        """One layer holding both (e.g. the code tree plus the bento manifest); other's owner applies to its files."""
        if self.owner != other.owner:
            raise ImageError(f"cannot merge layers with different owners: {self.comment!r} and {other.comment!r}")
        return LayerSpec(f"{self.comment} + {other.comment}", self.sources + other.sources, self.owner)


@dataclass(frozen=True)
class _Entry:
    path: str  # relative to the image root, POSIX, no leading slash
    kind: Literal["dir", "file", "symlink", "hardlink"]
    mode: int
    uid: int
    gid: int
    content: Path | bytes | None = None
    size: int = 0
    linkname: str = ""
    sha256: str = ""


class _DigestMemo:
    """sha256 of host files, remembered by (size, mtime_ns, inode): git's index trick, so a rebuild does not
    re-read gigabytes of unchanged model weights just to find its layers in the cache."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self.entries: dict[str, list[Any]] = {}
        self.dirty = False
        if path is not None and path.is_file():
            try:
                self.entries = json.loads(path.read_bytes())
            except ValueError:
                self.entries = {}

    def sha256(self, path: Path, st: os.stat_result) -> str:
        key = str(path.resolve())
        stamp = [st.st_size, st.st_mtime_ns, st.st_ino]
        known = self.entries.get(key)
        if known is not None and known[:3] == stamp:
            return known[3]
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            while chunk := f.read(_READ_SIZE):
                digest.update(chunk)
        self.entries[key] = [*stamp, digest.hexdigest()]
        self.dirty = True
        return digest.hexdigest()

    def save(self) -> None:
        if self.path is not None and self.dirty:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(self.path, json.dumps(self.entries).encode())


def _image_path(dest: str) -> str:
    path = PurePosixPath("/", dest)
    parts = [p for p in path.parts[1:] if p not in ("", ".")]
    if ".." in parts:
        raise ImageError(f"{dest!r}: image paths must not contain '..'")
    return "/".join(parts)


def _normal_mode(is_dir: bool, st_mode: int) -> int:
    return 0o755 if is_dir or st_mode & 0o111 else 0o644


def _excluded(rel: str, name: str, patterns: tuple[str, ...]) -> bool:
    return any(fnmatch.fnmatchcase(rel, p) or fnmatch.fnmatchcase(name, p) for p in patterns)


def _expand_tree(tree: Tree, owner: tuple[int, int], memo: _DigestMemo, out: dict[str, _Entry]) -> None:
    root = Path(tree.src)
    if not root.is_dir():
        raise ImageError(f"{root}: not a directory")
    base = _image_path(tree.dest)
    inodes: dict[tuple[int, int], list[str]] = {}

    def add(host: Path, path: str) -> None:
        st = host.lstat()
        uid, gid = (st.st_uid, st.st_gid) if tree.preserve else owner
        mode = (st.st_mode & 0o7777) if tree.preserve else None
        if stat.S_ISDIR(st.st_mode):
            out[path] = _Entry(path, "dir", mode if mode is not None else 0o755, uid, gid)
        elif stat.S_ISLNK(st.st_mode):
            out[path] = _Entry(path, "symlink", 0o777, uid, gid, linkname=os.readlink(host))
        elif stat.S_ISREG(st.st_mode):
            out[path] = _Entry(path, "file", mode if mode is not None else _normal_mode(False, st.st_mode), uid, gid,
                               host, st.st_size, sha256=memo.sha256(host, st))
            if st.st_nlink > 1:
                inodes.setdefault((st.st_dev, st.st_ino), []).append(path)
        else:
            raise ImageError(f"{host}: special files (devices, fifos, sockets) cannot go into a layer")

    if base:
        add(root, base)
    for dirpath, dirnames, filenames in os.walk(root):
        rel_dir = Path(dirpath).relative_to(root).as_posix()
        kept = []
        for name in sorted(dirnames):
            rel = name if rel_dir == "." else f"{rel_dir}/{name}"
            if _excluded(rel, name, tree.exclude):
                continue
            add(Path(dirpath, name), f"{base}/{rel}".lstrip("/"))
            if not Path(dirpath, name).is_symlink():
                kept.append(name)
        dirnames[:] = kept
        for name in sorted(filenames):
            rel = name if rel_dir == "." else f"{rel_dir}/{name}"
            if not _excluded(rel, name, tree.exclude):
                add(Path(dirpath, name), f"{base}/{rel}".lstrip("/"))
    # Hard links stay links inside the layer: the first path in sorted order holds the bytes.
    for paths in inodes.values():
        first, *others = sorted(paths)
        for path in others:
            entry = out[path]
            out[path] = _Entry(path, "hardlink", entry.mode, entry.uid, entry.gid, linkname=first)


def _expand(spec: LayerSpec, memo: _DigestMemo) -> list[_Entry]:
    entries: dict[str, _Entry] = {}
    for source in spec.sources:
        if isinstance(source, Tree):
            _expand_tree(source, spec.owner, memo, entries)
            continue
        path = _image_path(source.dest)
        if not path:
            raise ImageError(f"{source.dest!r}: a file needs a path below /")
        content = source.content
        if isinstance(content, Path):
            st = content.stat()
            mode = source.mode if source.mode is not None else _normal_mode(False, st.st_mode)
            entries[path] = _Entry(path, "file", mode, *spec.owner, content, st.st_size,
                                   sha256=memo.sha256(content, st))
        else:
            data = content.encode() if isinstance(content, str) else bytes(content)
            entries[path] = _Entry(path, "file", source.mode if source.mode is not None else 0o644, *spec.owner,
                                   data, len(data), sha256=hashlib.sha256(data).hexdigest())
    for path in list(entries):
        parent = PurePosixPath(path).parent
        while str(parent) != "." and str(parent) not in entries:
            entries[str(parent)] = _Entry(str(parent), "dir", 0o755, 0, 0)
            parent = parent.parent
    return [entries[path] for path in sorted(entries)]


def _layer_key(entries: list[_Entry], epoch: int, level: int) -> str:
    """The digest of everything that decides a layer's bytes: its cache key."""
    digest = hashlib.sha256(f"{_LAYER_FORMAT}\0{epoch}\0{level}\n".encode())
    for e in entries:
        digest.update(canonical_json([e.path, e.kind, e.mode, e.uid, e.gid, e.linkname, e.size, e.sha256]) + b"\n")
    return digest.hexdigest()


class _HashingWriter:
    """A write-only file that hashes and counts what passes through to the next one."""

    def __init__(self, sink: IO[bytes]) -> None:
        self.sink = sink
        self.hash = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> int:
        self.hash.update(data)
        self.size += len(data)
        self.sink.write(data)
        return len(data)

    def flush(self) -> None:
        self.sink.flush()


def _tarinfo(entry: _Entry, epoch: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(entry.path)
    info.mode, info.uid, info.gid, info.mtime = entry.mode, entry.uid, entry.gid, epoch
    info.uname = info.gname = ""
    if entry.kind == "dir":
        info.type = tarfile.DIRTYPE
    elif entry.kind == "symlink":
        info.type, info.linkname = tarfile.SYMTYPE, entry.linkname
    elif entry.kind == "hardlink":
        info.type, info.linkname = tarfile.LNKTYPE, entry.linkname
    else:
        info.type, info.size = tarfile.REGTYPE, entry.size
    return info


def _write_layer(entries: list[_Entry], layout: Layout, epoch: int, level: int) -> tuple[str, str, int]:
    """Stream entries as tar -> gzip into the layout; returns (blob digest, diff_id, compressed size)."""
    tmp = layout.temp_blob_path()
    try:
        with open(tmp, "wb") as raw:
            compressed = _HashingWriter(raw)
            with gzip.GzipFile(filename="", mode="wb", compresslevel=level, fileobj=compressed, mtime=0) as gz:
                plain = _HashingWriter(gz)
                with tarfile.open(fileobj=plain, mode="w|", format=tarfile.PAX_FORMAT, encoding="utf-8") as tar:
                    for entry in entries:
                        info = _tarinfo(entry, epoch)
                        if entry.kind != "file":
                            tar.addfile(info)
                        elif isinstance(entry.content, Path):
                            with open(entry.content, "rb") as f:
                                tar.addfile(info, f)
                        else:
                            tar.addfile(info, BytesReader(entry.content or b""))
        digest = "sha256:" + compressed.hash.hexdigest()
        os.replace(tmp, layout.blob_path(digest))
    finally:
        tmp.unlink(missing_ok=True)
    return digest, "sha256:" + plain.hash.hexdigest(), compressed.size


@dataclass(frozen=True)
class LayerResult:
    """One layer of a built image and how it was obtained: reused from the base, built, or found in the cache."""

    comment: str
    digest: str
    diff_id: str
    size: int
    media_type: str
    source: Literal["base", "built", "cached"]


def build_layers(specs: Sequence[LayerSpec], layout: Layout, cache_dir: Path | None, epoch: int,
                 level: int, progress: Callable[[str], None] | None = None) -> list[LayerResult]:
    """Build every layer into layout, or link it from `cache_dir` when its key is there. Layers compress in
    parallel: zlib and sha256 release the GIL. `progress` gets a line when a layer starts compressing and one
    when it is done (compressing a few hundred MB takes tens of seconds), and one per cached layer."""
    say = progress or (lambda line: None)
    count = len(specs)
    memo = _DigestMemo(cache_dir / "file-digests.json" if cache_dir else None)
    expanded = [_expand(spec, memo) for spec in specs]
    memo.save()

    def one(i: int) -> LayerResult:
        spec, entries = specs[i], expanded[i]
        key = _layer_key(entries, epoch, level)
        record = cache_dir / "layers" / f"{key}.json" if cache_dir else None
        if record is not None and record.is_file():
            known = json.loads(record.read_bytes())
            cached_blob = record.parent.parent / "blobs" / known["digest"].split(":")[1]
            if cached_blob.is_file():
                link_or_copy(cached_blob, layout.blob_path(known["digest"]))
                touch(record)  # used now: `pkg cache prune` removes the least recently used first
                say(f"layer {i + 1}/{count} {spec.comment}: cached ({known['size'] / 1e6:.1f} MB)")
                return LayerResult(spec.comment, known["digest"], known["diff_id"], known["size"], MEDIA_LAYER_GZIP,
                                   "cached")
        raw = sum(entry.size for entry in entries if entry.size)
        say(f"layer {i + 1}/{count} {spec.comment}: compressing {raw / 1e6:.1f} MB")
        started = time.perf_counter()
        digest, diff_id, size = _write_layer(entries, layout, epoch, level)
        say(f"layer {i + 1}/{count} {spec.comment}: {size / 1e6:.1f} MB in {time.perf_counter() - started:.1f} s")
        if record is not None:
            blobs = record.parent.parent / "blobs"
            blobs.mkdir(parents=True, exist_ok=True)
            record.parent.mkdir(parents=True, exist_ok=True)
            link_or_copy(layout.blob_path(digest), blobs / digest.split(":")[1])
            atomic_write(record, canonical_json({"digest": digest, "diff_id": diff_id, "size": size}))
        return LayerResult(spec.comment, digest, diff_id, size, MEDIA_LAYER_GZIP, "built")

    workers = max(1, min(len(specs), os.cpu_count() or 1))
    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(one, range(len(specs))))
