"""An LLM-style service as BentoML 1.4's docs write one: Pydantic fields with constraints, a str generator streamed
as plain text, the request context. Ported by changing the import line only (the model is a stand-in)."""

from __future__ import annotations

from typing import Annotated, AsyncGenerator

from annotated_types import Ge, Le
from pydantic import BaseModel, Field

import bento_like as bentoml

MAX_TOKENS = 64


class GenerationConfig(BaseModel):
    max_tokens: Annotated[int, Ge(1), Le(MAX_TOKENS)] = 8
    stop: list[str] = Field(default_factory=list, max_length=4)


@bentoml.service(resources={"gpu": "0", "memory": "2Gi"}, traffic={"timeout": 300})
class LLM:
    def __init__(self) -> None:
        self.vocab = ["the", "quick", "brown", "fox", "jumps", "over", "lazy", "dog"]

    @bentoml.api
    async def generate(
        self,
        ctx: bentoml.Context,
        prompt: str = "Explain superconductors like I'm five years old",
        temperature: Annotated[float, Ge(0), Le(2)] = 0.7,
        config: GenerationConfig = GenerationConfig(),
        top_p: float = Field(0.9, gt=0, le=1, description="nucleus sampling"),
    ) -> AsyncGenerator[str, None]:
        ctx.response.headers["X-Model"] = "stand-in"
        for i in range(config.max_tokens):
            token = self.vocab[(len(prompt) + i) % len(self.vocab)]
            if token in config.stop:
                break
            yield token + " "

    @bentoml.api
    def tokenize(self, text: str, ctx: bentoml.Context) -> list[str]:
        if not text.strip():
            ctx.response.status_code = 400
            return []
        return text.split()
