"""One API per rich IO type (PIL image, DataFrame, torch tensor, Path), in and out, for tests/serving/test_io_types.py
and the fuzz suite.

Every API takes whatever the runtime hands it without failing (values it cannot add become null, sizes are
clamped), so any 5xx the fuzzer finds is the runtime's.
"""

from __future__ import annotations

import numbers
import tempfile
from pathlib import Path
from typing import Annotated

import pandas as pd
import torch
from PIL import Image

import bento_like as bl

Frame = Annotated[pd.DataFrame, bl.DataframeSchema(orient="records", columns=["a", "b"])]
Batch = Annotated[torch.Tensor, bl.Shape(-1, 3), bl.DType("float32")]
OUT = Path(tempfile.mkdtemp(prefix="io_types-"))  # the files the APIs return: theirs, sent and kept


def _add(a: object, b: object) -> float | None:
    if not all(isinstance(v, numbers.Real) and not isinstance(v, bool) for v in (a, b)):
        return None
    try:
        return float(a) + float(b)  # type: ignore[arg-type]
    except OverflowError:
        return None


@bl.service(name="io_types")
class IOTypes:
    @bl.api
    def flip(self, image: Image.Image) -> Image.Image:
        """The image upside down, as PNG."""
        return image.transpose(Image.Transpose.FLIP_TOP_BOTTOM)

    @bl.api
    def describe_image(self, image: Annotated[Image.Image, bl.ContentType("image/*")], note: str = "") -> dict:
        return {"size": list(image.size), "mode": image.mode, "format": image.format, "note": note}

    @bl.api
    def png_only(self, image: Annotated[Image.Image, bl.ContentType("image/png")]) -> dict:
        return {"format": image.format}

    @bl.api
    def thumbnail(self, image: Image.Image, side: int = 8) -> Annotated[Image.Image, bl.ContentType("image/jpeg")]:
        side = min(max(side, 1), 64)
        return image.resize((side, side))

    @bl.api
    def total(self, df: Frame) -> pd.DataFrame:
        return df.assign(total=[_add(a, b) for a, b in zip(df["a"], df["b"])])

    @bl.api
    def columns(self, df: Annotated[pd.DataFrame, bl.DataframeSchema(orient="columns")]) -> dict:
        return {"columns": list(df.columns), "rows": len(df)}

    @bl.api
    def any_frame(self, df: pd.DataFrame) -> dict:
        return {"columns": [str(c) for c in df.columns], "rows": len(df)}

    @bl.api
    def frame_and_k(self, df: Frame, k: float = 1.0) -> pd.DataFrame:
        return df.assign(k=k)

    @bl.api
    def double(self, x: Batch) -> torch.Tensor:
        assert isinstance(x, torch.Tensor) and x.dtype == torch.float32
        return x * 2

    @bl.api
    def tensor_info(self, x: torch.Tensor) -> dict:
        return {"dtype": str(x.dtype), "shape": list(x.shape), "sum": float(x.sum())}

    @bl.api(warmup=True)  # warm-up zeros reach it as a tensor too
    def stats(self, x: Batch) -> dict:
        return {"mean": x.mean(dim=0), "count": x.shape[0]}

    @bl.api
    def png_size(self, path: Annotated[Path, bl.ContentType("image/png")]) -> dict:
        try:
            with Image.open(path) as image:
                size = list(image.size)
        except Exception:  # the runtime checks the declared type, not the bytes: a fuzzer's PNG may be anything
            size = None
        return {"suffix": path.suffix, "size": size, "bytes": path.stat().st_size, "path": str(path)}

    @bl.api
    def any_file(self, path: Path) -> dict:
        return {"bytes": path.stat().st_size, "suffix": path.suffix, "text": path.read_bytes()[:20].decode("latin-1")}

    @bl.api
    def save_text(self, text: str) -> Path:
        out = OUT / "out.txt"
        out.write_text(text)
        return out

    @bl.api
    def render(self, side: int) -> Annotated[Path, bl.ContentType("image/png")]:
        out = OUT / "render.bin"  # the annotation, not the suffix, names the type
        side = min(max(side, 1), 64)
        Image.new("RGB", (side, side), (0, 128, 255)).save(out, format="PNG")
        return out
