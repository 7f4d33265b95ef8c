"""The adapter contract, and the two adapters that need no framework: any picklable object, and plain files.

An adapter turns one kind of object into files in a directory and back. It imports its framework inside
its methods, so that importing bento_like.models imports no framework at all.
"""

from __future__ import annotations

import os
import pickle
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import msgspec

from ._errors import AdapterError, ManifestError, ModelStoreError
from ._manifest import ModelInfo, Signature

if TYPE_CHECKING:
    from ._store import Model


class Saved(msgspec.Struct, kw_only=True):
    """What an adapter reports about the files it wrote; it goes into the manifest."""

    signatures: list[Signature] = []
    details: dict[str, Any] = {}
    """Anything load needs besides the files (which forms exist, a class path); must be JSON-serializable
    and the same for the same input, since it is part of the content digest."""


class Adapter:
    """Base class for framework adapters; subclass it and pass an instance to `register_adapter`.

    `save` writes into `dest`, an empty directory (never name a file `manifest.yaml`), and takes the extra
    keyword arguments given to `bl.models.save`. `load` gets the stored Model (its files already verified)
    and the device to load onto, plus the keyword arguments given to `Model.load`.
    """

    framework: ClassVar[str] = ""
    """The name recorded in the manifest and accepted by `save(..., framework=...)`."""
    libraries: ClassVar[tuple[str, ...]] = ()
    """Distributions whose installed versions the manifest records."""

    def can_save(self, obj: Any) -> bool:
        """Whether `save` without `framework=` should pick this adapter for obj; must not import a framework."""
        return False

    def save(self, obj: Any, dest: Path, **options: Any) -> Saved:
        raise NotImplementedError

    def load(self, model: Model, device: str, **options: Any) -> Any:
        raise NotImplementedError

    def runs_code_on_load(self, info: ModelInfo) -> bool:
        """Whether loading these files can run code they carry (pickles); importing such an archive needs
        trust. True unless an adapter knows better."""
        return True

    def check_files(self, info: ModelInfo, root: Path) -> None:
        """Raise ModelStoreError if the files in root (an imported model, already matched against its
        manifest) would make load read outside them, as save refuses; called on import whatever the trust."""


class PickleAdapter(Adapter):
    """Any object cloudpickle can serialize: estimators, tokenizers, pipelines, plain Python objects.

    Classes importable at save time are pickled by reference and must be importable at load; classes
    defined in `__main__` (a notebook, a script) are pickled by value and need nothing.
    """

    framework = "pickle"
    libraries = ("cloudpickle",)
    FILE = "model.pkl"

    def can_save(self, obj: Any) -> bool:
        return True

    def save(self, obj: Any, dest: Path) -> Saved:
        import cloudpickle

        try:
            with open(dest / self.FILE, "wb") as f:
                cloudpickle.dump(obj, f, protocol=pickle.HIGHEST_PROTOCOL)
        except (pickle.PicklingError, TypeError, AttributeError) as exc:
            raise AdapterError(
                f"cannot pickle {type(obj).__qualname__}: {exc}; pass framework= or register an adapter for it"
            ) from exc
        return Saved(details={"object_type": f"{type(obj).__module__}.{type(obj).__qualname__}"})

    def load(self, model: Model, device: str) -> Any:
        with open(model.path / self.FILE, "rb") as f:
            return pickle.load(f)


class FilesAdapter(Adapter):
    """A file or a directory of files, stored as they are; load returns the stored path (device is ignored)."""

    framework = "files"
    DIR = "files"

    def can_save(self, obj: Any) -> bool:
        return isinstance(obj, (str, os.PathLike))

    def save(self, obj: str | os.PathLike[str], dest: Path) -> Saved:
        source = Path(obj).resolve()
        if not source.exists():
            raise ModelStoreError(f"{obj}: no such file or directory to save")
        target = dest / self.DIR / source.name
        target.parent.mkdir()
        if source.is_dir():
            shutil.copytree(source, target, symlinks=False)
        else:
            shutil.copyfile(source, target)
        return Saved(details={"root": source.name, "kind": "directory" if source.is_dir() else "file"})

    def load(self, model: Model, device: str) -> Path:
        root = model.info.details.get("root")
        if not isinstance(root, str) or root in ("", ".", "..") or "/" in root or "\\" in root:
            raise ManifestError(f"{model.tag}: manifest details.root {root!r} is not a file name")
        return model.path / self.DIR / root

    def runs_code_on_load(self, info: ModelInfo) -> bool:
        return False
