"""BentoML's "hello world": a summarization service over a Hugging Face model (a stand-in model read from the
local Hugging Face cache). Ported from BentoML 1.4 by changing the import line only."""

from __future__ import annotations

import json
import os

import bento_like as bentoml

EXAMPLE_INPUT = "Breaking News: In an astonishing turn of events, the small town of Willow Creek has been taken by storm."


@bentoml.service(
    resources={"cpu": "200m", "memory": "512Mi"},
    traffic={"timeout": 10},
)
class Summarization:
    # Hugging Face model: resolved from the local cache, never downloaded while serving
    model_path = bentoml.models.HuggingFaceModel("stand-in/tiny-summarizer")

    def __init__(self) -> None:
        with open(os.path.join(self.model_path, "config.json")) as f:
            self.max_words = json.load(f)["max_words"]

    @bentoml.api
    def summarize(self, text: str = EXAMPLE_INPUT) -> str:
        words = text.split()
        return " ".join(words[: self.max_words]) + ("..." if len(words) > self.max_words else "")
