"""Service instances: built once each, on their device, with their models and dependencies, before ready.

An instance is the user's class constructed the way the runtime owns it: ``__new__``, then the model
references and ``depends(...)`` services filled in for that instance's device, then ``__init__``, then the
``@on_startup`` hooks. Shutdown hooks run in the reverse order.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import os
from typing import Any

from ..sdk.service import ServiceSpec, get_spec

log = logging.getLogger("bento_like.serving")


def plan_devices(spec: ServiceSpec) -> list[str]:
    """One device string per instance: ``cuda:i`` for GPU services when GPUs exist, else ``cpu``."""
    gpus = spec.resources.gpu
    count = spec.instances or max(1, gpus)
    if gpus and _cuda_count() > 0:
        visible = _cuda_count()
        return [f"cuda:{i % visible}" for i in range(count)]
    return ["cpu"] * count


def _cuda_count() -> int:
    if os.environ.get("CUDA_VISIBLE_DEVICES", None) == "":
        return 0
    try:
        import torch  # imported only for services that ask for GPUs
    except ImportError:
        return 0
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


class Instance:
    """One built object of the service class plus the objects of the services it depends on."""

    def __init__(self, spec: ServiceSpec, device: str) -> None:
        self.spec = spec
        self.device = device
        self.obj: Any = None
        self.in_flight = 0
        # every built object (dependencies first) with its spec, in the order their startup hooks ran
        self._started: list[tuple[ServiceSpec, Any]] = []

    def build(self) -> None:
        self.obj = self._construct(self.spec)

    def _construct(self, spec: ServiceSpec) -> Any:
        from ..sdk.model_ref import model_refs

        obj = spec.cls.__new__(spec.cls)
        obj.__dict__["device"] = self.device
        for attr, dep in spec.dependencies.items():
            obj.__dict__[attr] = self._construct(get_spec(dep.target))
        for attr, ref in model_refs(spec.cls).items():
            obj.__dict__[attr] = ref.load(device=self.device)
        obj.__init__()
        self._started.append((spec, obj))
        return obj

    async def run_hooks(self, kind: str) -> None:
        order = self._started if kind == "startup" else list(reversed(self._started))
        for spec, obj in order:
            for attr in spec.startup_hooks if kind == "startup" else spec.shutdown_hooks:
                result = getattr(obj, attr)()
                if inspect.isawaitable(result):
                    await result


class InstancePool:
    """The instances of the served service in this process, and which one takes the next request."""

    def __init__(self, spec: ServiceSpec) -> None:
        self.spec = spec
        self.instances = [Instance(spec, d) for d in plan_devices(spec)]

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        for inst in self.instances:
            # __init__ may load large models: keep the event loop free to answer /livez meanwhile.
            await loop.run_in_executor(None, inst.build)
            await inst.run_hooks("startup")
            log.info("instance of %s ready on %s", self.spec.name, inst.device)

    async def stop(self) -> None:
        for inst in self.instances:
            try:
                await inst.run_hooks("shutdown")
            except Exception:
                log.exception("shutdown hook of %s failed", self.spec.name)

    def pick(self) -> Instance:
        instances = self.instances
        if len(instances) == 1:
            return instances[0]
        return min(instances, key=lambda i: i.in_flight)
