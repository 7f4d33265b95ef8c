"""Declarations: what a service is, never how it runs. Importing this starts nothing and imports no framework."""

from .api import APIConfig, ServiceDefinitionError, api
from .io import ContentType, DataframeSchema, DType, File, Shape
from .service import (
    Resources,
    ServiceSpec,
    Traffic,
    depends,
    get_spec,
    on_shutdown,
    on_startup,
    service,
)

__all__ = [
    "APIConfig",
    "ContentType",
    "DataframeSchema",
    "DType",
    "File",
    "Resources",
    "ServiceDefinitionError",
    "ServiceSpec",
    "Shape",
    "Traffic",
    "api",
    "depends",
    "get_spec",
    "on_shutdown",
    "on_startup",
    "service",
]
