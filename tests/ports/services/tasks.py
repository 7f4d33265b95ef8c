"""BentoML's task example: a long-running job submitted, then polled; a failing one; a batchable one. Ported from
BentoML 1.4 by changing the import line only (the generation is a stand-in)."""

from __future__ import annotations

import time

import bento_like as bentoml


@bentoml.service(traffic={"timeout": 60})
class ImageGeneration:
    @bentoml.task
    def long_running_task(self, ctx: bentoml.Context, prompt: str, steps: int = 3) -> dict:
        time.sleep(0.1 * steps)
        return {"prompt": prompt, "steps": steps, "user": ctx.request.headers.get("x-user")}

    @bentoml.task
    def failing_task(self, prompt: str) -> str:
        raise RuntimeError(f"cannot draw {prompt!r}")

    @bentoml.task(batchable=True, max_batch_size=8, max_latency_ms=500)
    def score(self, rows: list[float]) -> list[float]:
        time.sleep(0.05)
        return [r * 2 for r in rows]
