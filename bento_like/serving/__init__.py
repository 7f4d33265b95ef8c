"""The runtime: ASGI app, codecs, instances, metrics and the worker processes of ``pkg serve``."""

from .app import ServeOptions, create_app
from .workers import serve

__all__ = ["ServeOptions", "create_app", "serve"]
