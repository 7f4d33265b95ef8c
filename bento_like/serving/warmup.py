"""Warm-up: the calls an API asked for with ``@bl.api(warmup=...)``, run before the server turns ready.

Nothing else is called at startup: an API's defaults may have side effects or be slow, and a server must not run
them once per worker start. A warm-up that fails or passes its ``warmup_timeout`` keeps the server from turning
ready, with the reason: a server whose every request would fail must not say it is ready.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any

import numpy as np

from ..sdk.api import ServiceDefinitionError
from .codecs import json_encoder
from .errors import HTTPError

if TYPE_CHECKING:
    from ..description import Parameter
    from ..sdk.service import ServiceSpec
    from .instances import InstancePool
    from .routes import APIEndpoint

log = logging.getLogger("bento_like.serving")


class WarmupFailed(Exception):
    """A warm-up raised or ran past its time limit; the message is what ``/readyz`` reports."""


class WarmupPlan:
    """The input one API is warmed up with: made when the service is loaded, so that a declaration the API
    cannot take stops ``pkg serve`` before it listens. Arrays without a declared shape are made from the
    models' signatures once the instances are built (their models are in the store by then)."""

    def __init__(self, ep: APIEndpoint) -> None:
        config = ep.config
        self.api = config.name
        self.timeout = config.warmup_timeout
        self.kwargs: dict[str, Any] = {}
        self.from_signature: list[Parameter] = []  # arrays whose shape only a model's signature tells
        self.made_up = config.warmup is True  # zeros as np.ndarray: a tensor input converts them before each call
        if config.warmup is True:
            for p in ep.codec.params:
                if p.array is not None and p.array.shape is not None:
                    self.kwargs[p.name] = _zeros(p.array.shape, p.array.dtype, ep)
                elif p.required and p.array is not None:
                    self.from_signature.append(p)
                elif p.required:
                    raise ServiceDefinitionError(
                        f"API {self.api!r}: warmup=True cannot make up input {p.name!r} (only arrays of a declared "
                        f"bl.Shape, or of a model's signature); give an example instead: "
                        f"@bl.api(warmup={{{p.name!r}: ...}})"
                    )
            if self.from_signature and not ep.state.spec.model_refs():
                names = ", ".join(repr(p.name) for p in self.from_signature)
                raise ServiceDefinitionError(
                    f"API {self.api!r}: warmup=True cannot make up input {names}: it has no declared bl.Shape and "
                    "the service uses no bl.model whose signature could tell; declare bl.Shape or give an example"
                )
        else:
            try:
                self.kwargs = ep.codec.decode_json(json_encoder.encode(config.warmup))
            except HTTPError as exc:
                raise ServiceDefinitionError(
                    f"API {self.api!r}: its warmup input is not one it accepts: {exc.message}"
                ) from None
            except (TypeError, NotImplementedError) as exc:
                raise ServiceDefinitionError(
                    f"API {self.api!r}: its warmup input cannot be sent as JSON: {exc}"
                ) from None

    def complete(self, spec: ServiceSpec, ep: APIEndpoint) -> dict[str, Any]:
        """The arguments, with the arrays only a model's signature tells made now."""
        if not self.from_signature:
            return self.kwargs
        inputs = _signature_inputs(spec)
        kwargs = dict(self.kwargs)
        for p in self.from_signature:
            spec_ = inputs.get(p.name)
            if spec_ is None and len(self.from_signature) == 1 and len(inputs) == 1:
                spec_ = next(iter(inputs.values()))
            if spec_ is None:
                raise WarmupFailed(
                    f"warm-up of API {self.api!r}: input {p.name!r} has no declared bl.Shape, and the signatures of "
                    f"the service's models do not tell its shape (their inputs: {', '.join(inputs) or 'none'}); "
                    "declare bl.Shape or give warmup an example input"
                )
            shape, dtype = spec_
            assert p.array is not None
            kwargs[p.name] = _zeros(tuple(shape), p.array.dtype or dtype, ep)
        return kwargs

    async def run(self, spec: ServiceSpec, ep: APIEndpoint, pool: InstancePool) -> None:
        """Call the API once per instance (a batchable one through its batcher, which also measures it), all
        within the time limit."""
        try:
            await asyncio.wait_for(self._run(spec, ep, pool), self.timeout)
        except asyncio.TimeoutError:
            raise WarmupFailed(
                f"warm-up of API {self.api!r} did not finish within its warmup_timeout of {self.timeout:g} s"
            ) from None
        except WarmupFailed:
            raise
        except Exception as exc:
            raise WarmupFailed(f"warm-up of API {self.api!r} failed: {type(exc).__name__}: {exc}") from exc

    async def _run(self, spec: ServiceSpec, ep: APIEndpoint, pool: InstancePool) -> None:
        kwargs = self.complete(spec, ep)
        if self.made_up and ep.codec.rich is not None:
            kwargs = ep.codec.rich.convert(dict(kwargs))
        if ep.batcher is not None:
            await ep.batcher.warm_up(kwargs[ep.config.params[0]])
            return
        for inst in pool.instances:
            method = getattr(inst.obj, ep.attr)
            await (method(**kwargs) if ep.is_async else inst.runner.submit(method, **kwargs))


def _zeros(shape: tuple[int, ...], dtype: str | None, ep: APIEndpoint) -> np.ndarray:
    """One item of zeros: variable dimensions, and a batchable API's batch dimension, are 1."""
    dims = [1 if d == -1 else d for d in shape]
    batch_dim = ep.config.input_batch_dim
    if ep.config.batchable and batch_dim < len(dims):
        dims[batch_dim] = 1
    try:
        kind = np.dtype(dtype or "float32")
    except TypeError:  # a signature's dtype numpy does not know
        kind = np.dtype("float32")
    return np.zeros(dims, dtype=kind)


def _signature_inputs(spec: ServiceSpec) -> dict[str, tuple[list[int], str]]:
    """Input name -> (shape, dtype) of the first signature of each model the service uses."""
    inputs: dict[str, tuple[list[int], str]] = {}
    for ref in spec.model_refs().values():
        signatures = ref.resolve().info.signatures
        if signatures:
            for tensor in signatures[0].inputs:
                inputs.setdefault(tensor.name, (tensor.shape, tensor.dtype))
    return inputs
