"""The model store: save a trained model once, refer to it by tag (`name:version`) everywhere after.

    tag = bl.models.save("mlp", module, metadata={"acc": 0.97}, labels={"team": "fraud"})
    m = bl.models.get("mlp:latest"); m.path; m.info.metadata; module = m.load(device="cpu")

The functions below use the default store, `$BENTO_LIKE_HOME/models` (default `~/.bento_like/models`);
`ModelStore(root)` offers the same methods on any other root. Importing this module imports no framework:
each adapter imports torch, onnx or cloudpickle when it saves or loads.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ._adapters import Adapter, Saved
from ._errors import (
    AdapterError,
    IntegrityError,
    InvalidTagError,
    ManifestError,
    ModelExistsError,
    ModelNotFoundError,
    ModelStoreError,
    TrustRequiredError,
    UnsafeArchiveError,
)
from ._manifest import FileEntry, ModelInfo, Signature, TensorSpec, parse_tag
from ._registry import register_adapter
from ._store import Model, ModelStore, default_store, home
from ..sdk.model_ref import BentoModel, HuggingFaceModel  # BentoML's names, as a port writes them

__all__ = [
    "Adapter",
    "AdapterError",
    "BentoModel",
    "HuggingFaceModel",
    "FileEntry",
    "IntegrityError",
    "InvalidTagError",
    "ManifestError",
    "Model",
    "ModelExistsError",
    "ModelInfo",
    "ModelNotFoundError",
    "ModelStore",
    "ModelStoreError",
    "Saved",
    "Signature",
    "TensorSpec",
    "TrustRequiredError",
    "UnsafeArchiveError",
    "default_store",
    "delete",
    "export_model",
    "get",
    "home",
    "import_model",
    "list",
    "parse_tag",
    "register_adapter",
    "save",
]


def save(
    name: str,
    obj: Any,
    *,
    version: str | None = None,
    framework: str | None = None,
    metadata: dict[str, Any] | None = None,
    labels: dict[str, str] | None = None,
    **options: Any,
) -> str:
    """Store obj and return its tag. The adapter is picked from obj's type unless `framework` names one
    ("torch", "onnx", "pickle", "files" or a registered one); `options` go to it (torch: `example_inputs=`,
    `dynamic_shapes=`). Same content, same version: saving it again writes nothing."""
    return default_store().save(
        name, obj, version=version, framework=framework, metadata=metadata, labels=labels, **options
    )


def get(tag: str) -> Model:
    """`name:version`, `name:latest` or `name` (latest). Raises ModelNotFoundError listing what exists."""
    return default_store().get(tag)


def list(name: str | None = None, *, labels: dict[str, str] | None = None) -> list[Model]:
    """Stored models, by name and newest first; filtered by name and by labels (all must match)."""
    return default_store().list(name, labels=labels)


def delete(tag: str) -> str:
    """Delete `name:version` (or `name:latest`) and return the tag deleted."""
    return default_store().delete(tag)


def export_model(tag: str, path: str | os.PathLike[str]) -> Path:
    """Write one model to one archive file (tar; gzip when path ends in .gz or .tgz)."""
    return default_store().export_model(tag, path)


def import_model(path: str | os.PathLike[str], *, trust: bool = False) -> str:
    """Add the model in an archive to the store and return its tag. Models that are unpickled at load
    (pickle, torch) run code from the archive when loaded, so they need `trust=True`."""
    return default_store().import_model(path, trust=trust)
