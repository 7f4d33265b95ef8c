"""`@bl.task`: the options of `@bl.api`, recorded on the APIConfig; what a task cannot be."""

from __future__ import annotations

import pytest

import bento_like as bl
from bento_like.sdk import get_spec


def test_a_task_is_an_api_marked_as_task_bare_or_with_options() -> None:
    @bl.service
    class S:
        @bl.task
        def plain(self, x: int) -> int:
            return x

        @bl.task(route="/v1/embed", name="embed", batchable=True, max_batch_size=4, max_latency_ms=50)
        async def many(self, xs: list[float]) -> list[float]:
            return xs

        @bl.api
        def direct(self) -> int:
            return 1

    configs = {entry.config.name: entry.config for entry in get_spec(S).apis}
    assert configs["plain"].task and configs["plain"].route == "/plain"
    embed = configs["embed"]
    assert embed.task and embed.route == "/v1/embed" and embed.batchable and embed.max_batch_size == 4
    assert not configs["direct"].task
    assert S().plain(3) == 3  # the method is left as it is


def test_a_task_cannot_stream() -> None:
    with pytest.raises(bl.ServiceDefinitionError, match="task 'gen' is a generator"):
        class S:
            @bl.task
            def gen(self, n: int):  # type: ignore[no-untyped-def]
                yield n


def test_a_task_route_may_not_shadow_another_api() -> None:
    with pytest.raises(bl.ServiceDefinitionError, match=r"route /render/status of 'status' is taken by the task"):
        @bl.service
        class S:
            @bl.task
            def render(self, prompt: str) -> str:
                return prompt

            @bl.api(route="/render/status")
            def status(self) -> str:
                return "ok"


def test_a_task_takes_the_checks_of_api() -> None:
    with pytest.raises(bl.ServiceDefinitionError, match="max_batch_size must be an int >= 1"):
        class S:
            @bl.task(batchable=True, max_batch_size=0)
            def f(self, x: list[int]) -> list[int]:
                return x
