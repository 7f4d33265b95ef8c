"""`bl.model("mlp:latest")`: a service's reference to a stored model, declared as a class attribute.

A reference is data until something loads it: the build step finds every reference with `model_refs(cls)`
without running the service, and the runtime loads each one onto its instance's device before `__init__`.
It is a non-data descriptor, so what the runtime puts in the instance's `__dict__` wins; an instance built
without the runtime (a test, a notebook) loads the model on CPU the first time the attribute is read.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from bento_like.models import Model, ModelStore


class ModelRef:
    """A tag plus options; `latest` is resolved against the store when resolved or loaded, not declared.

    `options` are kept for the build's optimization step (e.g. `optimize=[...]`, `quality=...`); loading
    ignores them."""

    __slots__ = ("name", "options", "tag")

    def __init__(self, tag: str, options: dict[str, Any]) -> None:
        from bento_like.models import parse_tag

        parse_tag(tag)
        self.tag = tag
        self.options = options
        self.name: str | None = None

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, obj: Any, objtype: type | None = None) -> Any:
        if obj is None:
            return self
        try:
            namespace = vars(obj)
        except TypeError:
            raise TypeError(
                f"{type(obj).__qualname__}.{self.name}: bl.model() needs instances with a __dict__ "
                "(remove __slots__)"
            ) from None
        loaded = self.load("cpu")
        if self.name is not None:
            namespace[self.name] = loaded
        return loaded

    def resolve(self, store: ModelStore | None = None) -> Model:
        """The stored model this reference means now (`latest` is looked up at each call)."""
        from bento_like.models import default_store

        return (store or default_store()).get(self.tag)

    def load(self, device: str = "cpu", store: ModelStore | None = None) -> Any:
        return self.materialize(self.resolve(store), device)

    def materialize(self, stored: Model, device: str = "cpu") -> Any:
        """What the service's attribute holds for the stored version ``stored``: the loaded framework object."""
        return stored.load(device=device)

    def __repr__(self) -> str:
        options = "".join(f", {key}={value!r}" for key, value in self.options.items())
        return f"model({self.tag!r}{options})"


def model(tag: str, **options: Any) -> ModelRef:
    """Declare a model used by a service: `model = bl.model("mlp:latest")`.

    Each instance of the service gets the model loaded on its own device. `options` are recorded for the
    build (optimization settings); they do not change what is loaded."""
    return ModelRef(tag, options)


def model_refs(cls: type) -> dict[str, ModelRef]:
    """Attribute name -> ModelRef for cls and its bases, without instantiating cls; a subclass that
    rebinds an attribute to something else hides the base's reference."""
    refs: dict[str, ModelRef] = {}
    for klass in reversed(cls.__mro__):
        for name, value in vars(klass).items():
            if isinstance(value, ModelRef):
                refs[name] = value
            else:
                refs.pop(name, None)
    return refs


class BentoModel(ModelRef):
    """BentoML's ``bentoml.models.BentoModel("name:version")``: a stored model the service reads files from.

    Where ``bl.model`` gives the instance the loaded framework object, this gives the stored version itself
    (``.path``, ``.path_of("weights.bin")``, ``.info``, ``.load()``): for models the service loads its own way. It
    is packaged into a bento like any other reference."""

    __slots__ = ()

    def __init__(self, tag: str, **options: Any) -> None:
        super().__init__(tag, options)

    def materialize(self, stored: Model, device: str = "cpu") -> Any:
        return stored

    def __repr__(self) -> str:
        return f"BentoModel({self.tag!r})"


class HuggingFaceModel:
    """BentoML's ``bentoml.models.HuggingFaceModel("org/name", revision=...)``: the local directory of a Hugging
    Face model, as a str, on attribute access.

    Found in the model store (a model saved under the id with ``/`` written ``--``, lowercased: ``org--name``),
    else in the local Hugging Face cache (``$HF_HUB_CACHE``, ``$HF_HOME/hub``, ``~/.cache/huggingface/hub``).
    Nothing is downloaded while serving: a model in neither place is an error that names it."""

    def __init__(self, model_id: str, revision: str = "main", *, endpoint: str | None = None) -> None:
        if not isinstance(model_id, str) or model_id.count("/") > 1 or not model_id.strip("/"):
            raise ValueError(f"HuggingFaceModel takes a model id such as 'org/name', got {model_id!r}")
        self.model_id = model_id
        self.revision = revision
        self.endpoint = endpoint  # recorded for BentoML compatibility; never contacted while serving
        self.name: str | None = None

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, obj: Any, objtype: type | None = None) -> Any:
        if obj is None:
            return self
        path = self.resolve()
        if self.name is not None:
            vars(obj)[self.name] = path
        return path

    @property
    def store_name(self) -> str:
        return self.model_id.replace("/", "--").lower()

    def resolve(self) -> str:
        """The model's local directory; FileNotFoundError naming the model and where it was looked for."""
        import os
        from pathlib import Path

        from bento_like.models import ModelNotFoundError, default_store

        try:
            stored = default_store().get(f"{self.store_name}:latest")
        except (ModelNotFoundError, ValueError):
            pass
        else:  # a saved snapshot directory is served from where the store keeps it
            return str(stored.load() if stored.info.framework == "files" else stored.path)
        roots = [os.environ.get("HF_HUB_CACHE"), os.environ.get("HF_HOME") and str(Path(os.environ["HF_HOME"]) / "hub"),
                 str(Path.home() / ".cache" / "huggingface" / "hub")]
        looked = []
        for root in filter(None, roots):
            repo = Path(root) / ("models--" + self.model_id.replace("/", "--"))
            looked.append(str(repo))
            ref = repo / "refs" / self.revision
            commit = ref.read_text().strip() if ref.is_file() else self.revision
            snapshot = repo / "snapshots" / commit
            if snapshot.is_dir() and commit and "/" not in commit and commit not in (".", ".."):
                return str(snapshot)
        raise FileNotFoundError(
            f"Hugging Face model {self.model_id!r} (revision {self.revision!r}) is not available locally: not in the "
            f"model store as {self.store_name!r}, nor in the Hugging Face cache ({', '.join(looked)}); nothing is "
            "downloaded while serving: download it where the service is built, or save it into the model store"
        )

    def __repr__(self) -> str:
        return f"HuggingFaceModel({self.model_id!r}, revision={self.revision!r})"
