"""BentoML's IO-type examples: PIL images, Paths with a content type, DataFrames with a schema and tensors,
written as its docs write them. Ported from BentoML 1.4 by changing the import line only."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import pandas as pd
import torch
from PIL import ImageOps
from PIL.Image import Image

import bento_like as bentoml
from bento_like.validators import ContentType, DataframeSchema, DType, Shape


@bentoml.service(resources={"cpu": "1"})
class ImageAndData:
    @bentoml.api
    def grayscale(self, image: Image) -> Annotated[Image, ContentType("image/jpeg")]:
        return ImageOps.grayscale(image)

    @bentoml.api
    def mirror(
        self, image: Annotated[Path, ContentType("image/*")], ctx: bentoml.Context
    ) -> Annotated[Path, ContentType("image/png")]:
        from PIL import Image as PILImage

        output = os.path.join(ctx.temp_dir, "mirrored.png")
        ImageOps.mirror(PILImage.open(image)).save(output)
        return Path(output)

    @bentoml.api
    def classify(
        self,
        input: Annotated[pd.DataFrame, DataframeSchema(orient="records", columns=["petal_length", "petal_width"])],
    ) -> pd.DataFrame:
        area = input["petal_length"] * input["petal_width"]
        return pd.DataFrame({"species": ["setosa" if a < 1 else "virginica" for a in area]})

    @bentoml.api
    def normalize(self, x: Annotated[torch.Tensor, Shape((-1, 4)), DType("float32")]) -> torch.Tensor:
        return torch.nn.functional.normalize(x, dim=1)
