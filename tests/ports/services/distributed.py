"""BentoML's distributed-services example: a CPU preprocessor with its own workers, called by a model service
through bentoml.depends, sync and async. Ported from BentoML 1.4 by changing the import line only."""

from __future__ import annotations

import os

import bento_like as bentoml


@bentoml.service(resources={"cpu": "1"}, workers=2)
class Preprocessing:
    @bentoml.api
    def preprocess(self, text: str) -> dict:
        if not text.strip():
            raise ValueError("nothing to preprocess")
        return {"tokens": text.lower().split(), "pid": os.getpid()}


@bentoml.service(resources={"memory": "1Gi"})
class Classifier:
    preprocessing = bentoml.depends(Preprocessing)

    @bentoml.api
    def classify(self, text: str) -> dict:
        result = self.preprocessing.preprocess(text=text)
        return {"label": "long" if len(result["tokens"]) > 3 else "short", "preprocessed_by": result["pid"],
                "classified_by": os.getpid()}

    @bentoml.api
    async def aclassify(self, text: str) -> str:
        result = await self.preprocessing.to_async.preprocess(text=text)
        return " ".join(reversed(result["tokens"]))
