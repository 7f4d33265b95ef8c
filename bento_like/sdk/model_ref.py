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
        return self.resolve(store).load(device=device)

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
