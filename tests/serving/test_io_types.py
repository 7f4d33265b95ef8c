"""The rich IO types over a real `pkg serve` process: PIL images, DataFrames, torch tensors and Paths, in and out,
with raw HTTP and with the bento_like client; every bad input a 4xx that names the field."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from bento_like import AsyncClient, Client
from bento_like.client import APIClientError
from live_server import Server

SERVICES = Path(__file__).parent / "services"
ARROW = "application/vnd.apache.arrow.stream"
PARQUET = "application/vnd.apache.parquet"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    tmp = tmp_path_factory.mktemp("io_types")
    srv = Server("io_types.py:IOTypes", SERVICES, [], {**os.environ, "PYTHONUNBUFFERED": "1"}, tmp / "server.log")
    srv.wait_ready()
    yield srv
    srv.stop()
    assert "Traceback" not in srv.log(), srv.log()


@pytest.fixture(scope="module")
def http(server: Server):
    with httpx.Client(base_url=server.url, timeout=30) as client:
        yield client


@pytest.fixture(scope="module")
def client(server: Server):
    with Client(server.url) as c:
        yield c


def png(size: tuple[int, int] = (4, 3), mode: str = "RGB", fmt: str = "PNG") -> bytes:
    out = io.BytesIO()
    Image.new(mode, size, (10, 20, 30) if mode == "RGB" else 0).save(out, format=fmt)
    return out.getvalue()


def noise(fmt: str) -> bytes:
    """An image whose pixel data is most of the file, so that cutting the file in half cuts the pixels."""
    out = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(out, format=fmt)
    return out.getvalue()


def arrow(df: pd.DataFrame) -> bytes:
    table = pa.Table.from_pandas(df, preserve_index=False)
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return sink.getvalue().to_pybytes()


def assert_names(r: httpx.Response, status: int | tuple[int, ...], field: str, *words: str) -> None:
    statuses = status if isinstance(status, tuple) else (status,)
    assert r.status_code in statuses, r.text
    body = r.json()
    assert body["field"] == field, body
    for word in words:
        assert word in body["error"], body


# --- images ------------------------------------------------------------------------------------------------------


def test_an_image_arrives_as_a_raw_body_and_returns_as_png(http: httpx.Client) -> None:
    r = http.post("/flip", content=png(), headers={"content-type": "image/png"})
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "image/png"
    image = Image.open(io.BytesIO(r.content))
    assert image.format == "PNG" and image.size == (4, 3)


@pytest.mark.parametrize("fmt, media", [("PNG", "image/png"), ("JPEG", "image/jpeg"), ("GIF", "image/gif")])
def test_an_image_arrives_as_a_multipart_part_in_any_format_pil_reads(http: httpx.Client, fmt: str, media: str) -> None:
    r = http.post("/describe_image", files={"image": ("x", png(fmt=fmt), media)}, data={"note": "hi"})
    assert r.status_code == 200, r.text
    assert r.json() == {"size": [4, 3], "mode": "P" if fmt == "GIF" else "RGB", "format": fmt, "note": "hi"}


def test_an_image_arrives_as_base64_in_json(http: httpx.Client) -> None:
    r = http.post("/describe_image", json={"image": base64.b64encode(png()).decode()})
    assert r.status_code == 200 and r.json()["format"] == "PNG"


def test_a_returned_image_takes_the_content_type_of_the_annotation(http: httpx.Client) -> None:
    r = http.post("/thumbnail", files={"image": ("a.png", png(mode="RGBA"), "image/png")}, data={"side": "5"})
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "image/jpeg"
    assert Image.open(io.BytesIO(r.content)).size == (5, 5)


@pytest.mark.parametrize(
    "data",
    [png()[:40], noise("PNG")[:1500], b"\x89PNG\r\n\x1a\n" + b"\x00" * 50, noise("JPEG")[:600], b""],
    ids=["png-header-only", "truncated-png", "corrupt-png", "truncated-jpeg", "empty"],
)
def test_an_image_pil_cannot_decode_is_422_naming_the_field(http: httpx.Client, data: bytes) -> None:
    r = http.post("/flip", content=data, headers={"content-type": "image/png"})
    assert_names(r, 422, "$.image", "not an image PIL can decode")
    r = http.post("/describe_image", files={"image": ("x.jpg", data, "image/jpeg")})
    assert_names(r, 422, "$.image", "not an image PIL can decode")


def test_a_decompression_bomb_is_422_not_decoded(http: httpx.Client) -> None:
    out = io.BytesIO()
    Image.new("1", (10_000, 10_000)).save(out, format="PNG")  # 10^8 pixels, beyond PIL's limit, in ~12 kB
    r = http.post("/flip", content=out.getvalue(), headers={"content-type": "image/png"})
    assert_names(r, 422, "$.image", "more than the server's limit")


def test_a_part_outside_a_declared_image_wildcard_is_415_naming_the_field(http: httpx.Client) -> None:
    r = http.post("/describe_image", files={"image": ("x.txt", png(), "text/plain")})
    assert_names(r, 415, "$.image", "'text/plain'", "'image/*'")


def test_a_declared_image_type_is_checked_against_the_decoded_format(http: httpx.Client) -> None:
    r = http.post("/png_only", content=png(), headers={"content-type": "application/octet-stream"})
    assert r.status_code == 200 and r.json() == {"format": "PNG"}
    r = http.post("/png_only", content=png(fmt="JPEG"), headers={"content-type": "image/png"})
    assert_names(r, 415, "$.image", "is an image of type 'image/jpeg'", "'image/png'")
    r = http.post("/png_only", files={"image": ("a.jpg", png(fmt="JPEG"), "application/octet-stream")})
    assert_names(r, 415, "$.image", "'image/jpeg'")


# --- DataFrames --------------------------------------------------------------------------------------------------

ROWS = [{"a": 1, "b": 2, "c": "x"}, {"a": 3, "b": 4, "c": "y"}]


def test_a_dataframe_arrives_as_json_records_and_returns_as_records(http: httpx.Client) -> None:
    r = http.post("/total", json={"df": ROWS})
    assert r.status_code == 200, r.text
    assert r.json() == [{"a": 1, "b": 2, "total": 3}, {"a": 3, "b": 4, "total": 7}]  # the declared columns only


def test_a_dataframe_without_a_schema_takes_records_or_columns(http: httpx.Client) -> None:
    assert http.post("/any_frame", json={"df": ROWS}).json() == {"columns": ["a", "b", "c"], "rows": 2}
    assert http.post("/any_frame", json={"df": {"a": [1, 2, 3]}}).json() == {"columns": ["a"], "rows": 3}
    assert http.post("/columns", json={"df": {"p": [1], "q": [2]}}).json() == {"columns": ["p", "q"], "rows": 1}


@pytest.mark.parametrize("media, encode", [(ARROW, arrow), (PARQUET, None)])
def test_a_dataframe_arrives_as_arrow_or_parquet_raw_or_in_a_part(http: httpx.Client, media: str, encode) -> None:
    df = pd.DataFrame(ROWS)
    if encode is None:
        out = io.BytesIO()
        pq.write_table(pa.Table.from_pandas(df), out)
        data = out.getvalue()
    else:
        data = encode(df)
    r = http.post("/total", content=data, headers={"content-type": media})
    assert r.status_code == 200, r.text
    assert [row["total"] for row in r.json()] == [3, 7]
    r = http.post("/frame_and_k", files={"df": ("df", data, media)}, data={"k": "2"})
    assert r.status_code == 200, r.text
    assert r.json() == [{"a": 1, "b": 2, "k": 2.0}, {"a": 3, "b": 4, "k": 2.0}]


def test_a_dataframe_missing_a_declared_column_is_422_naming_column_and_field(http: httpx.Client) -> None:
    r = http.post("/total", json={"df": [{"a": 1}]})
    assert_names(r, 422, "$.df", "missing column(s) 'b'")
    r = http.post("/total", content=arrow(pd.DataFrame({"a": [1]})), headers={"content-type": ARROW})
    assert_names(r, 422, "$.df", "missing column(s) 'b'")


@pytest.mark.parametrize(
    "body, words",
    [
        ({"df": {"a": [1], "b": [2]}}, "expected a DataFrame as a list (orient 'records')"),
        ({"df": [1, 2]}, "every row an object"),
        ({"df": "text"}, "input 'df' must be JSON text"),
        ({"df": None}, "got null"),
    ],
)
def test_a_dataframe_in_the_wrong_json_shape_is_4xx_naming_the_field(http: httpx.Client, body, words: str) -> None:
    assert_names(http.post("/total", json=body), (400, 422), "$.df", words)


def test_malformed_arrow_bytes_are_422_naming_the_field(http: httpx.Client) -> None:
    good = arrow(pd.DataFrame(ROWS))
    for data in (b"not arrow at all", good[: len(good) // 2]):
        r = http.post("/total", content=data, headers={"content-type": ARROW})
        assert_names(r, 422, "$.df", "not a readable Arrow IPC stream")
    r = http.post("/total", content=b"PAR1garbage", headers={"content-type": PARQUET})
    assert_names(r, 422, "$.df", "not a readable Parquet file")
    r = http.post("/frame_and_k", files={"df": ("df", b"a,b\n1,2\n", "text/csv")})
    assert_names(r, 415, "$.df", "'text/csv'")


# --- tensors -----------------------------------------------------------------------------------------------------


def test_a_tensor_travels_like_an_array(http: httpx.Client) -> None:
    r = http.post("/double", json={"x": [[1, 2, 3], [4, 5, 6]]})
    assert r.status_code == 200, r.text
    assert r.json() == [[2.0, 4.0, 6.0], [8.0, 10.0, 12.0]]
    assert http.post("/tensor_info", json={"x": [1, 2]}).json() == {"dtype": "torch.int64", "shape": [2], "sum": 3.0}
    assert http.post("/stats", json={"x": [[0, 0, 0], [2, 4, 6]]}).json() == {"mean": [1.0, 2.0, 3.0], "count": 2}


def test_a_tensor_of_the_wrong_shape_or_type_is_422_naming_the_field(http: httpx.Client) -> None:
    assert_names(http.post("/double", json={"x": [[1, 2]]}), 422, "$.x", "Expected an array of shape (*, 3), got shape (1, 2)")
    assert_names(http.post("/double", json={"x": [["a", "b", "c"]]}), 422, "$.x")
    r = http.post("/double", files={"x": (None, "[[1, 2, 3]]")})
    assert r.status_code == 200 and r.json() == [[2.0, 4.0, 6.0]]


# --- paths -------------------------------------------------------------------------------------------------------


def test_a_path_input_is_a_temporary_file_deleted_after_the_request(http: httpx.Client) -> None:
    r = http.post("/png_size", content=png((7, 2)), headers={"content-type": "image/png"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["suffix"] == ".png" and body["size"] == [7, 2] and body["bytes"] == len(png((7, 2)))
    deadline = time.monotonic() + 5  # deleted once the response is sent: just after the client has it
    while Path(body["path"]).exists() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not Path(body["path"]).exists()
    r = http.post("/png_size", files={"path": ("photo.png", png(), "image/png")})
    assert r.status_code == 200 and r.json()["suffix"] == ".png"
    r = http.post("/any_file", files={"path": ("notes.txt", b"hello", "text/plain")})
    assert r.json() == {"bytes": 5, "suffix": ".txt", "text": "hello"}


def test_a_path_upload_of_the_wrong_content_type_is_415_naming_the_field(http: httpx.Client) -> None:
    r = http.post("/png_size", content=png(fmt="JPEG"), headers={"content-type": "image/jpeg"})
    assert_names(r, 415, "$.path", "'image/jpeg'", "'image/png'")
    r = http.post("/png_size", files={"path": ("a.txt", b"x", "text/plain")})
    assert_names(r, 415, "$.path", "'text/plain'")


def test_a_returned_path_is_sent_as_its_bytes_with_its_content_type(http: httpx.Client) -> None:
    r = http.post("/save_text", json={"text": "hé"})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain") and r.text == "hé"
    r = http.post("/render", json={"side": 3})
    assert r.headers["content-type"] == "image/png" and Image.open(io.BytesIO(r.content)).size == (3, 3)


# --- the client --------------------------------------------------------------------------------------------------


def test_the_client_sends_and_receives_images(client: Client) -> None:
    image = Image.new("RGB", (6, 4), (255, 0, 0))
    flipped = client.flip(image)
    assert isinstance(flipped, Image.Image) and flipped.size == (6, 4)
    assert client.describe_image(image, note="n")["format"] == "PNG"
    assert client.thumbnail(image, side=2).format == "JPEG"


def test_the_client_sends_and_receives_dataframes(client: Client) -> None:
    result = client.total(pd.DataFrame(ROWS))
    assert isinstance(result, pd.DataFrame)
    assert result.to_dict("list") == {"a": [1, 3], "b": [2, 4], "total": [3.0, 7.0]}
    assert client.frame_and_k(pd.DataFrame(ROWS), k=3)["k"].tolist() == [3, 3]
    assert client.total(ROWS)["total"].tolist() == [3, 7]  # records travel as JSON
    with pytest.raises(APIClientError) as caught:
        client.total(pd.DataFrame({"a": [1]}))
    assert caught.value.status == 422 and caught.value.field == "$.df" and "'b'" in caught.value.message


def test_the_async_client_decodes_the_same_kinds(server: Server) -> None:
    async def calls() -> tuple[object, object]:
        async with AsyncClient(server.url) as client:
            return await client.flip(Image.new("L", (2, 5))), await client.double(torch.zeros(1, 3))

    image, tensor = asyncio.run(calls())
    assert isinstance(image, Image.Image) and image.size == (2, 5)
    assert isinstance(tensor, torch.Tensor) and tensor.shape == (1, 3)


def test_without_pyarrow_the_client_sends_a_dataframe_as_json(client: Client, monkeypatch: pytest.MonkeyPatch) -> None:
    import bento_like._rich_values as rich
    from bento_like._client_core import encode_request

    find_spec = rich.importlib.util.find_spec
    monkeypatch.setattr(rich.importlib.util, "find_spec", lambda name, *a: None if name == "pyarrow" else find_spec(name, *a))
    encoded = encode_request(client.apis["total"], {"df": pd.DataFrame(ROWS)})
    assert encoded.headers == {"content-type": "application/json"} and b'"a":1' in (encoded.content or b"")
    assert client.total(pd.DataFrame(ROWS))["total"].tolist() == [3, 7]


def test_the_client_sends_and_receives_tensors(client: Client) -> None:
    result = client.double(torch.ones(2, 3))
    assert isinstance(result, torch.Tensor) and result.tolist() == [[2.0] * 3] * 2
    assert client.stats(torch.zeros(1, 3))["count"] == 1
    with pytest.raises(APIClientError) as caught:
        client.double(torch.ones(2, 2))
    assert caught.value.status == 422 and caught.value.field == "$.x"


def test_the_client_sends_and_receives_paths(client: Client, tmp_path: Path) -> None:
    source = tmp_path / "in.png"
    source.write_bytes(png((9, 9)))
    assert client.png_size(source)["size"] == [9, 9]
    returned = client.render(4)
    try:
        assert isinstance(returned, Path) and returned.suffix == ".png"
        assert Image.open(returned).size == (4, 4)
    finally:
        returned.unlink()
    text = client.save_text("hé")
    try:
        assert text.suffix == ".txt" and text.read_text() == "hé"  # a text/plain result of a path API is a file too
    finally:
        text.unlink()
    with pytest.raises(APIClientError) as caught:
        client.png_size(np.zeros(3).tobytes())
    assert caught.value.status == 415 and caught.value.field == "$.path"


# --- the document and the import surface ---------------------------------------------------------------------


def test_the_document_describes_each_kind(http: httpx.Client) -> None:
    doc = http.get("/openapi.json").json()
    paths = doc["paths"]
    assert paths["/flip"]["post"]["x-bento-api"]["inputs"] == {"image": "image"}
    assert paths["/flip"]["post"]["responses"]["200"]["content"] == {
        "image/png": {"schema": {"type": "string", "format": "binary"}}
    }
    assert set(paths["/total"]["post"]["requestBody"]["content"]) >= {"application/json", ARROW, PARQUET}
    assert "image/png" in paths["/png_size"]["post"]["requestBody"]["content"]
    assert paths["/double"]["post"]["responses"]["200"]["content"]["application/json"]["schema"]["type"] == "array"
    assert doc["components"]["schemas"]["double_input"]["properties"]["x"]["x-shape"] == [-1, 3]
    total = paths["/total"]["post"]["responses"]["200"]["content"]["application/json"]["schema"]
    assert total["type"] == "array" and total["items"]["type"] == "object"


def test_import_bento_like_imports_none_of_the_optional_libraries() -> None:
    probe = (
        "import sys, bento_like, bento_like.client, bento_like.description; "
        "print(sorted(m for m in ('PIL', 'pandas', 'pyarrow', 'torch') if m in sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout.replace("'", '"')) == []
