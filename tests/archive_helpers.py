"""Building hostile archives for the model and bento store tests: members of any size without the memory,
YAML that expands, and a file size limit that shows nothing large was written."""

from __future__ import annotations

import io
import resource
import signal
import tarfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


class Zeros(io.RawIOBase):
    """`size` zero bytes, produced as read: a large member without a large buffer."""

    def __init__(self, size: int) -> None:
        self.left = size

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        n = min(len(buffer), self.left)
        buffer[:n] = bytes(n)
        self.left -= n
        return n


def tar_of(path: Path, members: list[tuple[str, bytes | int]], mode: str = "w") -> Path:
    """A tar of (name, content) members in this order; an int content is that many zero bytes."""
    with tarfile.open(path, mode, format=tarfile.PAX_FORMAT, **({"compresslevel": 1} if "gz" in mode else {})) as tar:
        for name, content in members:
            info = tarfile.TarInfo(name)
            info.size = content if isinstance(content, int) else len(content)
            tar.addfile(info, Zeros(content) if isinstance(content, int) else io.BytesIO(content))
    return path


@contextmanager
def file_size_limit(limit: int) -> Iterator[None]:
    """Writing a file past `limit` bytes fails (EFBIG) in this process meanwhile: what 'nothing large was
    written' checks."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous)


def alias_bomb(levels: int, indent: str = "  ") -> str:
    """YAML whose last anchor expands to 10**levels items: a few hundred bytes that PyYAML would expand."""
    lines = [f"{indent}a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"{indent}a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, levels + 1)]
    return "\n".join(lines) + "\n"
