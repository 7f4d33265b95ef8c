"""Declarations: what a service is, never how it runs. Importing this starts nothing and imports no framework."""

from .api import APIConfig, ServiceDefinitionError, api, task
from .context import Context, Cookie
from .io import ContentType, DataframeSchema, DType, File, Shape
from .service import (
    Resources,
    ServiceSpec,
    Traffic,
    asgi_app,
    depends,
    get_current_service,
    get_spec,
    mount_asgi_app,
    on_deployment,
    on_ready,
    on_shutdown,
    on_startup,
    service,
)

__all__ = [
    "APIConfig",
    "ContentType",
    "DataframeSchema",
    "Context",
    "Cookie",
    "DType",
    "File",
    "Resources",
    "ServiceDefinitionError",
    "ServiceSpec",
    "Shape",
    "Traffic",
    "api",
    "asgi_app",
    "depends",
    "get_current_service",
    "get_spec",
    "mount_asgi_app",
    "on_deployment",
    "on_ready",
    "on_shutdown",
    "on_startup",
    "service",
    "task",
]
