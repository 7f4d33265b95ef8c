"""Content-addressed cache of pass results under `$BENTO_LIKE_HOME/cache/optimize/<digest>/`.

A pass's result is keyed by the sha256 of what determines it: the pass and its options, the digest of the
model it ran on, and the versions of the libraries that did the work. An entry is a small model store holding
the one artifact the pass produced, plus `entry.json` (the pass's notes and details) and, once measured,
`measurement.json`. Entries are filled in a staging directory and renamed into place, so a reader sees an
entry whole or not at all, and two builds racing on the same key both end with one valid entry.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import inspect
import os
import secrets
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec

from bento_like.models import Model, ModelStore, ModelStoreError, home

from ..cache import touch

ENTRY_FILE = "entry.json"
MEASUREMENT_FILE = "measurement.json"
_LIBRARIES = ("torch", "onnx", "onnxscript", "onnxruntime", "tensorrt", "triton")


class Uncacheable(Exception):
    """A key part has no stable fingerprint (a generator, an object without source); skip the cache."""


def default_root() -> Path:
    return home() / "cache" / "optimize"


def library_versions() -> dict[str, str]:
    versions = {}
    for name in _LIBRARIES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return versions


def fingerprint(obj: Any) -> Any:
    """A JSON-encodable stand-in for obj that changes when obj does: arrays and tensors by their bytes,
    modules by class and weights, functions by qualified name and source, files by content."""
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, (list, tuple)):
        return [fingerprint(item) for item in obj]
    if isinstance(obj, dict):
        return {str(key): fingerprint(value) for key, value in sorted(obj.items(), key=lambda kv: str(kv[0]))}
    if isinstance(obj, msgspec.Struct):
        return {"struct": type(obj).__name__, **fingerprint(msgspec.structs.asdict(obj))}
    if isinstance(obj, os.PathLike):
        path = Path(obj)
        return {"file": file_digest(path)} if path.is_file() else {"missing": str(path)}
    if type(obj).__module__.split(".")[0] == "numpy":
        import numpy as np

        array = np.ascontiguousarray(obj)
        return {"array": hashlib.sha256(array.tobytes()).hexdigest(), "dtype": str(array.dtype), "shape": list(array.shape)}
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(obj, torch.Tensor):
        tensor = obj.detach().cpu().contiguous()
        return {"tensor": fingerprint(tensor.view(-1).view(torch.uint8).numpy()), "dtype": str(tensor.dtype), "shape": list(tensor.shape)}
    if torch is not None and isinstance(obj, torch.nn.Module):
        state = {name: fingerprint(tensor) for name, tensor in obj.state_dict().items()}
        return {"module": f"{type(obj).__module__}.{type(obj).__qualname__}", "state": state}
    if callable(obj) and hasattr(obj, "__qualname__"):
        try:
            source = inspect.getsource(obj)
        except (OSError, TypeError):
            raise Uncacheable(f"{obj.__qualname__} has no source to fingerprint") from None
        return {"callable": f"{getattr(obj, '__module__', '')}.{obj.__qualname__}", "source": source}
    raise Uncacheable(f"cannot fingerprint a {type(obj).__qualname__}")


def file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return "sha256:" + digest.hexdigest()


def make_key(*parts: Any) -> str:
    """sha256 over the fingerprints of parts and the library versions; raises Uncacheable."""
    document = msgspec.json.encode([fingerprint(list(parts)), library_versions()], order="sorted")
    return hashlib.sha256(document).hexdigest()


class Entry(msgspec.Struct, kw_only=True):
    tag: str
    framework: str
    notes: list[str] = []
    extra: dict[str, Any] = {}
    seconds: float = 0.0
    """How long the pass took when it ran."""


class CachedArtifact:
    """A cache entry: the stored artifact (`model`) and what the pass recorded about it."""

    __slots__ = ("entry", "key", "model", "path")

    def __init__(self, key: str, path: Path, entry: Entry, model: Model) -> None:
        self.key = key
        self.path = path
        self.entry = entry
        self.model = model

    def measurement(self) -> dict[str, Any] | None:
        try:
            return msgspec.json.decode((self.path / MEASUREMENT_FILE).read_bytes())
        except (FileNotFoundError, msgspec.DecodeError):
            return None

    def save_measurement(self, measurement: dict[str, Any]) -> None:
        _write_atomic(self.path / MEASUREMENT_FILE, msgspec.json.encode(measurement))


class PassCache:
    """`get(key)` an entry or `put(key, name, save)` one; `enabled=False` makes every lookup miss and
    keeps nothing (results then live in a temporary directory for the build's duration)."""

    def __init__(self, root: str | os.PathLike[str] | None = None, *, enabled: bool = True) -> None:
        self.root = Path(root) if root is not None else default_root()
        self.enabled = enabled

    def __repr__(self) -> str:
        return f"PassCache('{self.root}', enabled={self.enabled})"

    def get(self, key: str) -> CachedArtifact | None:
        if not self.enabled:
            return None
        path = self.root / key
        try:
            entry = msgspec.json.decode((path / ENTRY_FILE).read_bytes(), type=Entry)
            model = ModelStore(path / "store").get(entry.tag)
        except (OSError, msgspec.DecodeError, msgspec.ValidationError, ModelStoreError):
            return None
        touch(path / ENTRY_FILE)  # used now: `pkg cache prune` removes the least recently used first
        return CachedArtifact(key, path, entry, model)

    def put(
        self,
        key: str,
        name: str,
        save: Callable[[ModelStore], str],
        *,
        notes: list[str] | None = None,
        extra: dict[str, Any] | None = None,
        seconds: float = 0.0,
    ) -> CachedArtifact:
        """Run `save(store) -> tag` into a fresh entry and install it under key (or, disabled, under a
        random name that `clear_scratch` removes)."""
        self.root.mkdir(parents=True, exist_ok=True)
        staging = self.root / f".tmp-{os.getpid()}-{secrets.token_hex(6)}"
        staging.mkdir()
        try:
            tag = save(ModelStore(staging / "store"))
            model = ModelStore(staging / "store").get(tag)
            entry = Entry(tag=tag, framework=model.info.framework, notes=notes or [], extra=extra or {}, seconds=seconds)
            (staging / ENTRY_FILE).write_bytes(msgspec.json.encode(entry))
            final = self.root / (key if self.enabled else f".scratch-{os.getpid()}-{secrets.token_hex(6)}")
            try:
                os.rename(staging, final)
            except OSError:
                if not (final / ENTRY_FILE).is_file():
                    raise
                shutil.rmtree(staging, ignore_errors=True)  # an identical entry won the race
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        return CachedArtifact(key, final, entry, ModelStore(final / "store").get(tag))

    def clear_scratch(self) -> None:
        """Remove this process's uncached results (left when the cache is disabled)."""
        if not self.root.is_dir():
            return
        for path in self.root.glob(f".scratch-{os.getpid()}-*"):
            shutil.rmtree(path, ignore_errors=True)

    def get_json(self, key: str) -> dict[str, Any] | None:
        if not self.enabled:
            return None
        try:
            return msgspec.json.decode((self.root / "measure" / f"{key}.json").read_bytes())
        except (FileNotFoundError, msgspec.DecodeError):
            return None

    def put_json(self, key: str, value: dict[str, Any]) -> None:
        if self.enabled:
            (self.root / "measure").mkdir(parents=True, exist_ok=True)
            _write_atomic(self.root / "measure" / f"{key}.json", msgspec.json.encode(value))


def _write_atomic(path: Path, data: bytes) -> None:
    staging = path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}")
    staging.write_bytes(data)
    os.replace(staging, path)
