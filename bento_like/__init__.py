"""bento_like: declare a service, serve it with adaptive batching, build it into an image.

This module is the whole user surface. Heavy parts (the model store's frameworks, the client's HTTP stack)
load on first use, so ``import bento_like`` stays fast.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .sdk import (
    ContentType,
    DataframeSchema,
    Context,
    Cookie,
    DType,
    File,
    ServiceDefinitionError,
    Shape,
    api,
    asgi_app,
    depends,
    get_current_service,
    mount_asgi_app,
    on_deployment,
    on_ready,
    on_shutdown,
    on_startup,
    service,
    task,
)

__version__ = "0.1.0"

__all__ = [
    "AsyncClient",
    "AsyncHTTPClient",
    "Client",
    "ContentType",
    "DataframeSchema",
    "Context",
    "Cookie",
    "DType",
    "File",
    "ServiceDefinitionError",
    "Shape",
    "SyncHTTPClient",
    "api",
    "asgi_app",
    "depends",
    "get_current_service",
    "model",
    "models",
    "mount_asgi_app",
    "on_deployment",
    "on_ready",
    "on_shutdown",
    "on_startup",
    "opt",
    "service",
    "task",
    "validators",
]

if TYPE_CHECKING:
    from . import models
    from .sdk import opt
    from . import validators
    from .client import AsyncClient, Client
    from .client import AsyncClient as AsyncHTTPClient
    from .client import Client as SyncHTTPClient
    from .sdk.model_ref import model

_LAZY = {
    "Client": ("bento_like.client", "Client"),
    "AsyncClient": ("bento_like.client", "AsyncClient"),
    # BentoML's names for the same clients
    "SyncHTTPClient": ("bento_like.client", "Client"),
    "AsyncHTTPClient": ("bento_like.client", "AsyncClient"),
    "validators": ("bento_like.validators", None),
    "model": ("bento_like.sdk.model_ref", "model"),
    "models": ("bento_like.models", None),
    "opt": ("bento_like.sdk.opt", None),
}


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'bento_like' has no attribute {name!r}")
    import importlib

    module_name, attr = _LAZY[name]
    module = importlib.import_module(module_name)
    value = module if attr is None else getattr(module, attr)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
