"""Digests of stored files: computed at save and import, checked at load.

A file's sha256 is the plain `sha256sum` of it. Files larger than one chunk also carry one sha256 per chunk,
which is what load checks: chunks are independent, so every core hashes at once (hashlib releases the GIL),
and verifying a large model costs a fraction of one sequential pass.
"""

from __future__ import annotations

import hashlib
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from ._errors import IntegrityError, ModelStoreError
from ._manifest import FileEntry

_READ_SIZE = 2**20


def _workers() -> int:
    return max(1, min(32, os.cpu_count() or 1))


def _sha256_range(path: Path, offset: int, length: int | None) -> str:
    """sha256 of `length` bytes from `offset` (all the rest when None), read 1 MiB at a time."""
    digest = hashlib.sha256()
    buffer = bytearray(_READ_SIZE)
    view = memoryview(buffer)
    remaining = length
    with open(path, "rb", buffering=0) as f:
        f.seek(offset)
        while remaining is None or remaining > 0:
            want = _READ_SIZE if remaining is None else min(_READ_SIZE, remaining)
            n = f.readinto(view[:want])
            if not n:
                break
            digest.update(view[:n])
            if remaining is not None:
                remaining -= n
    return digest.hexdigest()


def _chunk_ranges(size: int, chunk_size: int) -> list[tuple[int, int]]:
    return [(offset, min(chunk_size, size - offset)) for offset in range(0, size, chunk_size)]


def list_files(root: Path, exclude: frozenset[str] = frozenset()) -> list[str]:
    """Relative POSIX paths of the regular files under root, sorted; links are refused, not followed."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath, name)
            if path.is_symlink():
                raise ModelStoreError(f"{path}: links are not stored in a model; copy the file instead")
        for name in filenames:
            rel = Path(dirpath, name).relative_to(root).as_posix()
            if rel not in exclude:
                found.append(rel)
    return sorted(found)


def digest_files(root: Path, paths: list[str], chunk_size: int) -> list[FileEntry]:
    """FileEntry for each path: whole-file and chunk digests, hashed in parallel."""
    sizes = {rel: (root / rel).stat().st_size for rel in paths}
    with ThreadPoolExecutor(_workers()) as pool:
        whole = {rel: pool.submit(_sha256_range, root / rel, 0, None) for rel in paths}
        chunks = {
            rel: [pool.submit(_sha256_range, root / rel, off, n) for off, n in _chunk_ranges(sizes[rel], chunk_size)]
            for rel in paths
            if sizes[rel] > chunk_size
        }
        return [
            FileEntry(
                path=rel,
                size=sizes[rel],
                sha256=whole[rel].result(),
                chunk_sha256=[future.result() for future in chunks.get(rel, [])],
            )
            for rel in paths
        ]


def verify_files(root: Path, files: list[FileEntry], chunk_size: int, what: str) -> None:
    """Raise IntegrityError naming the first file whose size or digest differs from its manifest entry."""
    for entry in files:
        path = root / entry.path
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            raise IntegrityError(f"{what}: file {entry.path!r} is missing ({path})") from None
        if size != entry.size:
            raise IntegrityError(
                f"{what}: file {entry.path!r} is {size} bytes, the manifest says {entry.size}; "
                f"it is truncated or was modified ({path})"
            )
    with ThreadPoolExecutor(_workers()) as pool:
        checks = []
        for entry in files:
            if entry.chunk_sha256:
                ranges = _chunk_ranges(entry.size, chunk_size)
                if len(ranges) != len(entry.chunk_sha256):
                    raise IntegrityError(f"{what}: manifest entry for {entry.path!r} has a wrong chunk count")
                for (offset, length), expected in zip(ranges, entry.chunk_sha256, strict=True):
                    future = pool.submit(_sha256_range, root / entry.path, offset, length)
                    checks.append((entry, offset, expected, future))
            else:
                checks.append((entry, None, entry.sha256, pool.submit(_sha256_range, root / entry.path, 0, None)))
        for entry, offset, expected, future in checks:
            actual = future.result()
            if actual != expected:
                where = "" if offset is None else f" in the chunk at byte {offset}"
                raise IntegrityError(
                    f"{what}: file {entry.path!r} is corrupted: sha256{where} is {actual}, "
                    f"the manifest says {expected} ({root / entry.path})"
                )

