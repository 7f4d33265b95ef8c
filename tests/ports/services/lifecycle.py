"""BentoML's lifecycle hooks: on_deployment, on_startup, on_shutdown and __is_ready__, with a model read through
bentoml.models.BentoModel. Ported from BentoML 1.4 by changing the import line only."""

from __future__ import annotations

import os

import bento_like as bentoml

EVENTS = os.environ.get("PORT_EVENTS_FILE", "/dev/null")
NOT_READY = os.environ.get("PORT_NOT_READY_FILE", "")


def record(event: str) -> None:
    with open(EVENTS, "a") as f:
        f.write(event + "\n")


@bentoml.service(workers=1, resources={"memory": "256Mi"})
class HookService:
    labels = bentoml.models.BentoModel("labels:latest")

    @bentoml.on_deployment
    def prepare():  # noqa: N805 - BentoML's deployment hooks take no self
        record("deployment")

    def __init__(self) -> None:
        with open(self.labels.path_of("labels.txt")) as f:
            self.names = f.read().split()
        record("init")

    @bentoml.on_startup
    async def warm(self) -> None:
        record("startup")

    @bentoml.on_shutdown
    def cleanup(self) -> None:
        record("shutdown")

    def __is_ready__(self) -> bool:
        return not (NOT_READY and os.path.exists(NOT_READY))

    @bentoml.api
    def label(self, index: int) -> str:
        return self.names[index]
