"""Constraints on API inputs written the ways users write them, enforced rather than ignored.

``Annotated[float, annotated_types.Lt(2)]`` becomes ``Annotated[float, msgspec.Meta(lt=2)]``, which msgspec checks
while it decodes (the 422 names the field). What msgspec cannot express (a Pydantic model, ``pydantic.Field``, an
``annotated_types.Predicate``) is validated by Pydantic after decoding. Pydantic stays optional: it is used only for
a type that already came from it (so the user's module imported it), and looked up in ``sys.modules``, never
imported here. A constraint that neither can enforce refuses the API at load.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import sys
import types
import typing
from typing import Any

import msgspec

from .sdk.api import ServiceDefinitionError


class NeedsPydantic(Exception):
    """The annotation holds something only Pydantic validates; the argument says what."""


_BOUNDS = ("gt", "ge", "lt", "le")


def constraint_meta(obj: Any) -> dict[str, Any] | None:
    """The msgspec.Meta keywords for an ``annotated_types`` constraint; None for any other object. Raises
    NeedsPydantic for an annotated_types constraint msgspec has no keyword for."""
    cls = type(obj)
    if cls.__module__ != "annotated_types":
        return None
    name = cls.__name__
    if name in ("Gt", "Ge", "Lt", "Le"):
        return {name.lower(): getattr(obj, name.lower())}
    if name == "Interval":
        return {k: getattr(obj, k) for k in _BOUNDS if getattr(obj, k) is not None}
    if name == "MultipleOf":
        return {"multiple_of": obj.multiple_of}
    if name == "MinLen":
        return {"min_length": obj.min_length}
    if name == "MaxLen":
        return {"max_length": obj.max_length}
    if name == "Len":
        found = {"min_length": obj.min_length}
        if obj.max_length is not None:
            found["max_length"] = obj.max_length
        return found
    raise NeedsPydantic(f"annotated_types.{name}")


def pydantic() -> Any:
    """The pydantic module if something imported it already, else None."""
    module = sys.modules.get("pydantic")
    return module if module is not None and hasattr(module, "TypeAdapter") else None


def is_pydantic_model(tp: Any) -> bool:
    pd = pydantic()
    return pd is not None and isinstance(tp, type) and issubclass(tp, pd.BaseModel)


def is_field_info(obj: Any) -> bool:
    return type(obj).__module__ == "pydantic.fields" and type(obj).__name__ == "FieldInfo"


def for_msgspec(annotation: Any) -> Any:
    """``annotation`` with every annotated_types constraint turned into msgspec.Meta, at any depth (in lists,
    dicts, unions...). Raises NeedsPydantic where only Pydantic can validate it."""
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        base, *extras = typing.get_args(annotation)
        kept: list[Any] = []
        for extra in extras:
            if is_field_info(extra):
                raise NeedsPydantic("pydantic.Field")
            meta = constraint_meta(extra)
            kept.append(extra if meta is None else msgspec.Meta(**meta))
        return typing.Annotated[(for_msgspec(base), *kept)]  # type: ignore[misc]
    if is_pydantic_model(annotation):
        raise NeedsPydantic(f"the Pydantic model {annotation.__name__}")
    if origin is None:
        _check_members(annotation)
        return annotation
    args = typing.get_args(annotation)
    if not args or origin is typing.Literal:
        return annotation
    rewritten = tuple(a if a is Ellipsis else for_msgspec(a) for a in args)
    if rewritten == args:
        return annotation
    if origin in (typing.Union, types.UnionType):
        return typing.Union[rewritten]  # type: ignore[return-value]
    if origin in (list, set, frozenset, tuple, dict, collections.abc.Sequence, collections.abc.Mapping):
        return origin[rewritten if len(rewritten) > 1 else rewritten[0]]
    return annotation


def _check_members(tp: Any) -> None:
    """Refuse a Struct or dataclass whose fields carry constraints msgspec would skip: msgspec reads only its own
    Meta in a field's Annotated, so an annotated_types bound there would be silently ignored."""
    if not isinstance(tp, type) or not (issubclass(tp, msgspec.Struct) or dataclasses.is_dataclass(tp)):
        return
    try:
        hints = typing.get_type_hints(tp, include_extras=True)
    except Exception:  # unresolvable hints are reported by msgspec when the struct is built
        return
    for field, hint in hints.items():
        for extra in _annotated_extras(hint):
            if constraint_meta_or_field(extra):
                raise ServiceDefinitionError(
                    f"{tp.__name__}.{field} declares {type(extra).__name__}(...), which msgspec does not enforce in a "
                    f"{'Struct' if issubclass(tp, msgspec.Struct) else 'dataclass'}: write msgspec.Meta(...) "
                    "instead (e.g. Annotated[float, msgspec.Meta(lt=2)]), or make it a Pydantic model"
                )


def constraint_meta_or_field(obj: Any) -> bool:
    return type(obj).__module__ == "annotated_types" or is_field_info(obj)


def _annotated_extras(hint: Any) -> list[Any]:
    found: list[Any] = []
    stack = [hint]
    while stack:
        tp = stack.pop()
        if typing.get_origin(tp) is typing.Annotated:
            base, *extras = typing.get_args(tp)
            found.extend(extras)
            stack.append(base)
        else:
            stack.extend(a for a in typing.get_args(tp) if a is not Ellipsis and not isinstance(a, (str, int)))
    return found


def field_default(default: Any) -> tuple[Any, Any, bool]:
    """For a parameter whose default is ``pydantic.Field(...)``: (the FieldInfo, the default or a
    msgspec.field with its factory, whether the input is required)."""
    from_default = default.default
    factory = getattr(default, "default_factory", None)
    if factory is not None:
        return default, msgspec.field(default_factory=factory), False
    undefined = type(from_default).__name__ == "PydanticUndefinedType" or from_default is Ellipsis
    return default, None if undefined else from_default, undefined


class PydanticCheck:
    """Validates one decoded input with Pydantic; made by the runtime (it imports pydantic's core)."""

    def __init__(self, name: str, annotation: Any) -> None:
        pd = pydantic()
        if pd is None:
            raise ServiceDefinitionError(f"input {name!r} needs Pydantic to validate it, and pydantic is not installed")
        self.name = name
        self.adapter = pd.TypeAdapter(annotation)
        self._error = pd.ValidationError

    def __call__(self, value: Any) -> Any:
        """The validated value; ValueError with msgspec's wording (``... - at `$.x.y```) otherwise."""
        try:
            return self.adapter.validate_python(value)
        except self._error as exc:
            errors = exc.errors(include_url=False)
            first = errors[0]
            path = "$." + self.name + "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in first["loc"])
            more = f" (and {len(errors) - 1} more problem{'s' if len(errors) > 2 else ''})" if len(errors) > 1 else ""
            raise ValueError(f"{first['msg']}{more} - at `{path}`") from None


def pydantic_schema(annotation: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """Pydantic's JSON schema for ``annotation`` and its definitions, with references into OpenAPI's components."""
    pd = pydantic()
    assert pd is not None
    schema = pd.TypeAdapter(annotation).json_schema(ref_template="#/components/schemas/{model}")
    defs = schema.pop("$defs", {})
    if is_pydantic_model(annotation):  # a model is a component of its own, as msgspec's Structs are
        defs[annotation.__name__] = schema
        schema = {"$ref": f"#/components/schemas/{annotation.__name__}"}
    return schema, defs
