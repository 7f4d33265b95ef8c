"""Which adapter saves an object, and which one loads a framework named in a manifest."""

from __future__ import annotations

from typing import Any

from ._adapters import Adapter, FilesAdapter, PickleAdapter
from ._errors import AdapterError
from ._onnx import OnnxAdapter
from ._tensorrt import TensorRTAdapter
from ._torch import TorchAdapter

# Tried in this order when save is not told the framework; pickle takes anything, so it comes last.
_BUILT_IN: list[Adapter] = [TorchAdapter(), OnnxAdapter(), TensorRTAdapter(), FilesAdapter(), PickleAdapter()]
_adapters: dict[str, Adapter] = {adapter.framework: adapter for adapter in _BUILT_IN}
_user_order: list[str] = []


def register_adapter(adapter: Adapter, *, replace: bool = False) -> None:
    """Make `adapter` available by its framework name; it is tried before the built-in adapters (and
    before adapters registered earlier) when save is not told the framework."""
    if not isinstance(adapter, Adapter) or not adapter.framework:
        raise AdapterError("register an instance of an Adapter subclass that sets `framework`")
    name = adapter.framework
    if name in _adapters and not replace:
        raise AdapterError(f"an adapter for framework {name!r} is already registered; pass replace=True")
    _adapters[name] = adapter
    if name in _user_order:
        _user_order.remove(name)
    _user_order.insert(0, name)


def adapter_for(framework: str) -> Adapter:
    try:
        return _adapters[framework]
    except KeyError:
        known = ", ".join(sorted(_adapters))
        raise AdapterError(
            f"no adapter for framework {framework!r} (registered: {known}); register_adapter() one"
        ) from None


def detect(obj: Any) -> Adapter:
    for name in _user_order:
        if _adapters[name].can_save(obj):
            return _adapters[name]
    for adapter in _BUILT_IN:
        if _adapters[adapter.framework] is adapter and adapter.can_save(obj):
            return adapter
    raise AdapterError(f"no adapter can save {type(obj).__qualname__}; pass framework= or register an adapter")
