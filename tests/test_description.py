"""The API description: derived once from the declarations, with no server, and the source of every surface.

The served behaviour of what derives from it (decoding, OpenAPI over HTTP, v2 metadata, the client) is tested
with the runtime in tests/serving and tests/test_client.py; this checks the description itself.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Annotated, Iterator, NamedTuple

import msgspec
import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

import bento_like as bl
from bento_like import __version__
from bento_like.description import API_EXTENSION, describe, describe_api, openapi_document
from bento_like.sdk import get_spec


class Stats(NamedTuple):
    low: Annotated[np.ndarray, bl.DType("int32")]
    count: int


class Item(msgspec.Struct):
    text: str


class Thing:
    """Neither msgspec nor the runtime knows how to decode it."""


@bl.service(name="described")
class Described:
    @bl.api(batchable=True, max_batch_size=8, max_latency_ms=20)
    def predict(self, x: Annotated[np.ndarray, bl.Shape(-1, 4), bl.DType("float32")]) -> np.ndarray:
        """Class probabilities.

        More words that stay out of the summary."""
        return x

    @bl.api(route="/v1/tag")
    def tag(self, item: Item, count: int = 1) -> dict:
        return {}

    @bl.api
    def upload(self, file: bl.File) -> bytes:
        return file.data

    @bl.api
    def stats(self, x: Annotated[np.ndarray, bl.DType("int32")]) -> Stats:
        return Stats(x, 1)

    @bl.api
    def count(self, n: int) -> Iterator[str]:
        yield from map(str, range(n))


def test_the_summary_is_the_docstrings_first_sentence() -> None:
    from bento_like.description import _summary

    assert _summary("Species probabilities (setosa, versicolor, virginica) for rows of sepal length,\n"
                    "    sepal width, petal length and petal width, in cm.\n\n    More.") == (
        "Species probabilities (setosa, versicolor, virginica) for rows of sepal length, sepal width, petal "
        "length and petal width, in cm.")
    assert _summary("Echo it. Then more.") == "Echo it."
    assert _summary("No sentence end\n  but two lines") == "No sentence end but two lines"
    assert _summary("v1.2 of the model, e.g. this.") == "v1.2 of the model, e.g."  # a full stop then a space ends it
    assert _summary(None) is None and _summary("   ") is None


def test_each_api_is_described_once_in_declaration_order() -> None:
    predict, tag, upload, stats, count = describe(get_spec(Described))
    assert [p.kind for p in predict.params] == ["ndarray"] and predict.params[0].array.shape == (-1, 4)
    assert predict.output_kind == "ndarray" and predict.summary == "Class probabilities."
    assert predict.config.batchable and predict.config.max_batch_size == 8
    assert tag.route == "/v1/tag" and [(p.name, p.kind, p.required, p.default) for p in tag.params] == [
        ("item", "json", True, None), ("count", "json", False, 1)
    ]
    assert msgspec.json.decode(b'{"item": {"text": "a"}}', type=tag.input_struct).count == 1
    assert upload.raw_input is upload.params[0] and upload.output_kind == "bytes" and tag.raw_input is None
    assert count.output_kind == "text_stream" and count.summary is None  # it yields str: plain text


def test_output_parts_name_the_arrays_a_result_holds() -> None:
    predict, tag, _, stats, _ = describe(get_spec(Described))
    assert predict.output_form == "array" and [p.name for p in predict.output_parts] == [None]
    assert stats.output_form == "tuple" and [(p.name, p.array and p.array.dtype) for p in stats.output_parts] == [
        ("low", "int32"), ("count", None)
    ]
    assert tag.output_form is None and tag.output_parts == ()


def test_the_openapi_extension_is_the_description() -> None:
    descriptions = describe(get_spec(Described))
    doc = openapi_document("described", __version__, descriptions)
    for d in descriptions:
        assert doc["paths"][d.route]["post"][API_EXTENSION] == d.extension()
    assert doc["paths"]["/predict"]["post"]["summary"] == "Class probabilities."
    x = doc["components"]["schemas"]["predict_input"]["properties"]["x"]
    assert x["x-shape"] == [-1, 4] and x["x-dtype"] == "float32"
    assert "application/octet-stream" in doc["paths"]["/upload"]["post"]["requestBody"]["content"]


def test_a_form_carries_arrays_and_containers_as_json_text_and_the_document_says_so() -> None:
    @bl.service
    class Forms:
        @bl.api
        def f(
            self, file: bl.File, item: Item, x: np.ndarray, tags: list[str], maybe: Item | None, n: int, s: str,
            either: str | list[str], flag: bool = False, size: int | None = None,
        ) -> dict:
            return {}

    (f,) = describe(get_spec(Forms))
    assert {p.name for p in f.params if p.json_in_form} == {"item", "x", "tags", "maybe"}
    form = openapi_document("forms", __version__, [f])["paths"]["/f"]["post"]["requestBody"]["content"][
        "multipart/form-data"
    ]
    assert form["encoding"] == {name: {"contentType": "application/json"} for name in ("item", "x", "tags", "maybe")}
    tag = openapi_document("described", __version__, describe(get_spec(Described)))["paths"]["/v1/tag"]["post"]
    tag_form = tag["requestBody"]["content"]["multipart/form-data"]
    assert tag_form["encoding"] == {"item": {"contentType": "application/json"}}


def test_an_api_that_cannot_be_served_fails_when_described() -> None:
    @bl.service
    class Odd:
        @bl.api
        def f(self, t: Thing) -> int:
            return 1

        @bl.api
        def g(self, x: int) -> Missing:  # noqa: F821
            return x

    with pytest.raises(bl.ServiceDefinitionError, match="API 'f': an input type cannot be served"):
        describe_api(Odd.f, get_spec(Odd).api("f").config)
    with pytest.raises(bl.ServiceDefinitionError, match="API 'g': cannot resolve its type annotations.*Missing"):
        describe_api(Odd.g, get_spec(Odd).api("g").config)


def test_describing_loads_no_web_framework_and_nothing_of_the_runtime() -> None:
    probe = (
        "import sys, bento_like.description, bento_like.builders.bento\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('starlette', 'uvicorn', 'httpx')"
        " or m.startswith('bento_like.serving')))"
    )
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]", f"describing a service imported {result.stdout.strip()}"


def test_the_rich_io_types_are_described_by_kind_with_their_content_types() -> None:
    @bl.service
    class Rich:
        @bl.api
        def image(self, image: Image.Image) -> Annotated[Image.Image, bl.ContentType("image/jpeg")]:
            return image

        @bl.api
        def frame(self, df: Annotated[pd.DataFrame, bl.DataframeSchema(columns=["a"])]) -> pd.DataFrame:
            return df

        @bl.api
        def tensor(self, x: Annotated[torch.Tensor, bl.Shape(2), bl.DType("int32")]) -> torch.Tensor:
            return x

        @bl.api
        def path(self, path: Annotated[Path, bl.ContentType("image/*")], note: str = "") -> Path:
            return path

    found = {d.name: d for d in describe(get_spec(Rich))}
    assert {n: (d.extension()["inputs"], d.output_kind) for n, d in found.items()} == {
        "image": ({"image": "image"}, "image"),
        "frame": ({"df": "dataframe"}, "dataframe"),
        "tensor": ({"x": "tensor"}, "tensor"),
        "path": ({"path": "path", "note": "str"}, "path"),
    }
    assert found["tensor"].params[0].array == bl.sdk.io.ArraySpec("int32", (2,))
    assert found["frame"].raw_input is not None and found["path"].raw_input is None
    paths = openapi_document("rich", "1", list(found.values()))["paths"]
    assert list(paths["/image"]["post"]["responses"]["200"]["content"]) == ["image/jpeg"]
    assert "image/png" in paths["/image"]["post"]["requestBody"]["content"]
    form = paths["/path"]["post"]["requestBody"]["content"]["multipart/form-data"]
    assert form["encoding"] == {"path": {"contentType": "image/*"}}


def test_a_rich_type_in_a_union_is_refused_by_name() -> None:
    @bl.service
    class Maybe:
        @bl.api
        def f(self, image: Image.Image | None = None) -> int:
            return 1

    with pytest.raises(bl.ServiceDefinitionError, match="input 'image' holds a PIL.Image.Image inside a union"):
        describe_api(Maybe.f, get_spec(Maybe).api("f").config)


def test_validators_refuse_what_they_cannot_mean() -> None:
    assert bl.ContentType("image/*").matches("image/png; q=1") and not bl.ContentType("image/*").matches("text/plain")
    assert not bl.ContentType("image/png").matches(None)
    for bad in ("png", "*/*", "image/"):
        with pytest.raises(TypeError, match="media type"):
            bl.ContentType(bad)
    with pytest.raises(TypeError, match="orient"):
        bl.DataframeSchema(orient="table")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="not one string"):
        bl.DataframeSchema(columns="ab")


def test_a_batchable_api_of_a_rich_input_is_refused_with_the_fix() -> None:
    @bl.service
    class Batched:
        @bl.api(batchable=True)
        def f(self, x: torch.Tensor) -> torch.Tensor:
            return x

    with pytest.raises(bl.ServiceDefinitionError, match="input 'x' is a torch.Tensor.*torch.from_numpy"):
        describe_api(Batched.f, get_spec(Batched).api("f").config)
