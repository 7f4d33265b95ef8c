"""Request decoding: the fast paths for float arrays of declared rank give exactly what the general path gives.

Two fast paths: simdjson when every input of the API is such an array, typed msgspec lists otherwise. This checks
the decoders against each other on the same bodies, values and errors alike; then, over HTTP to a real server,
bodies nested too deeply, JSON text in form fields, and results JSON cannot carry. The rest of the served
behaviour (status codes, messages) is tested in test_app.py and test_v2.py.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated, Any, Iterator

import httpx
import numpy as np
import pytest
from live_server import Server

import bento_like as bl
from bento_like.description import describe_api
from bento_like.sdk.service import get_spec
from bento_like.serving import codecs
from bento_like.serving.codecs import InputCodec
from bento_like.serving.errors import HTTPError


@bl.service
class Arrays:
    @bl.api
    def f32(self, x: Annotated[np.ndarray, bl.Shape(-1, 3), bl.DType("float32")], scale: float = 1.0) -> np.ndarray:
        return x

    @bl.api
    def f32_only(self, x: Annotated[np.ndarray, bl.Shape(-1, 3), bl.DType("float32")]) -> np.ndarray:
        return x

    @bl.api
    def two(
        self, x: Annotated[np.ndarray, bl.Shape(-1, 3), bl.DType("float32")], y: Annotated[np.ndarray, bl.Shape(2), bl.DType("float64")]
    ) -> np.ndarray:
        return x

    @bl.api
    def f16(self, x: Annotated[np.ndarray, bl.Shape(2), bl.DType("float16")]) -> np.ndarray:
        return x

    @bl.api
    def f64_3d(self, x: Annotated[np.ndarray, bl.Shape(-1, -1, 2), bl.DType("float64")]) -> np.ndarray:
        return x


def codec(name: str) -> InputCodec:
    entry = next(e for e in get_spec(Arrays).apis if e.attr == name)
    return InputCodec(describe_api(getattr(Arrays, name), entry.config))


def general(c: InputCodec, body: bytes) -> dict[str, Any]:
    saved = c._simd, c._fast_decoder
    c._simd, c._fast_decoder = False, None
    try:
        return c.decode_json(body)
    finally:
        c._simd, c._fast_decoder = saved


def fast(c: InputCodec, body: bytes) -> dict[str, Any] | None:
    """What the codec's fast path makes of the body (None: it leaves it to the general path)."""
    return c._decode_simd(body) if c._simd else c._decode_fast(body)


def test_apis_of_arrays_only_take_the_simdjson_path_and_others_the_msgspec_one() -> None:
    assert [codec(api)._simd for api in ("f32_only", "two", "f16", "f64_3d", "f32")] == [True] * 4 + [False]


def outcome(fn, *args) -> Any:
    """What a decoder made of a body, comparable with ==: the arguments (arrays as dtype, shape and values) or
    the error."""
    try:
        kwargs = fn(*args)
    except HTTPError as exc:
        return exc.status, str(exc)
    return {k: (v.dtype.name, v.shape, v.tolist()) if isinstance(v, np.ndarray) else v for k, v in kwargs.items()}


WIDE = [[0.1 * i for i in range(3)] for _ in range(3000)]
assert 3 * len(WIDE) > codecs._PACK_MAX  # past the size up to which values are struct-packed


@pytest.mark.parametrize(
    ("api", "x"),
    [
        ("f32", [[0.1, 0.2, 0.3]]),
        ("f32_only", [[0.1, 0.2, 0.3]]),
        ("f32_only", [[1, 2, 3], [4.5, -6, 7e-3]]),
        ("f32_only", [[3.4028234e38, -1e-45, 16777217]]),
        ("f32_only", WIDE),
        ("f32", [[1, 2, 3], [4.5, -6, 7e-3]]),  # ints mixed in
        ("f32", [[3.4028234e38, -1e-45, 16777217]]),  # float32 extremes round the same way
        ("f32", WIDE),
        ("f16", [65504, 0.1]),
        ("f64_3d", [[[1, 2], [3, 4.25]], [[5, 6], [7, 8]]]),
    ],
)
def test_fast_path_matches_the_general_path_on_valid_input(api: str, x: list) -> None:
    c = codec(api)
    assert c._fast_decoder is not None
    body = json.dumps({"x": x}).encode()
    fast_args, slow_args = c.decode_json(body), general(c, body)
    assert fast(c, body) is not None  # the fast path did the work
    got, want = fast_args["x"], slow_args["x"]
    assert got.dtype == want.dtype and got.shape == want.shape
    np.testing.assert_array_equal(got, want)
    assert got.flags.writeable  # a model may write into its input


@pytest.mark.parametrize(
    ("api", "x"),
    [
        ("f32", [[1e300, 1, 2]]),  # beyond float32
        ("f32", [[1, 2], [3]]),  # ragged
        ("f32", [1, 2, 3]),  # wrong rank
        ("f32", [[True, 1, 2]]),  # booleans: the general path takes them as 0 and 1
        ("f32", [["1", "2", "3"]]),
        ("f32", []),
        ("f32", [[]]),
        ("f32", "[[1, 2, 3]]"),  # an array as JSON text (as a form field sends it)
        ("f32_only", [[1e300, 1, 2]]),
        ("f32_only", [[1, 2], [3]]),
        ("f32_only", [[1, [2], 3]]),  # nested deeper than its rank, as many numbers as its shape
        ("f32_only", [[1, 2, 3], [4, 5]]),
        ("f32_only", [[1, None, 2]]),
        ("f32_only", [[True, 1, 2]]),
        ("f32_only", [["1", "2", "3"]]),
        ("f32_only", [[{"a": 1}, 2, 3]]),
        ("f32_only", [[100000000000000000000, 1, 2]]),  # an integer beyond 64 bits
        ("f32_only", []),
        ("f32_only", [[]]),
        ("f32_only", "[[1, 2, 3]]"),
        ("f16", [70000, 1]),  # beyond float16
        ("f16", [65519.0, 1]),  # past float16's largest value, though it rounds to it: the general path decides
        ("f32_only", [[3.4028235e38, 1, 2]]),  # likewise for float32
        ("f32_only", [[1, -1e39, 2]]),
        ("f64_3d", [[[1, 2], [3]]]),
    ],
)
def test_what_the_fast_path_does_not_take_as_it_is_goes_the_general_way(api: str, x: Any) -> None:
    c = codec(api)
    body = json.dumps({"x": x}).encode()
    assert fast(c, body) is None
    assert outcome(c.decode_json, body) == outcome(general, c, body)


@pytest.mark.parametrize("api", ["f32", "f32_only"])
def test_a_wrong_shape_is_refused_in_the_same_words(api: str) -> None:
    c = codec(api)
    body = b'{"x": [[1, 2, 3, 4]]}'
    assert outcome(c.decode_json, body) == outcome(general, c, body)
    assert outcome(c.decode_json, body) == (422, "Expected an array of shape (*, 3), got shape (1, 4) (at $.x)")


@pytest.mark.parametrize(
    "body",
    [
        b'{"x": [[1, 2, 3]], "y": [0.5, 2]}',
        b'{"y": [0.5, 2], "x": [[1, 2, 3], [4, 5, 6]]}',
        b'{"x": [[1, 2, 3]]}',  # y missing
        b'{"x": [[1, 2, 3]], "y": [0.5, 2], "z": 1}',  # unknown field
        b'{"x": [[1, 2, 3]], "x": [[4, 5, 6]], "y": [1, 2]}',  # a field twice
        b'{"x": [[1, 2, 3]], "y": [[1, 2]]}',  # y nested deeper than its rank
        b'{"x": [[1, 2, 3]], "y": [1, 2]',  # truncated
        b'[1, 2]',
    ],
)
def test_several_arrays_decode_the_same_way_on_the_simdjson_path(body: bytes) -> None:
    c = codec("two")
    assert outcome(c.decode_json, body) == outcome(general, c, body)


def test_the_simdjson_parser_recovers_when_a_document_of_it_is_still_referenced() -> None:
    c = codec("f32_only")
    assert c._parser is not None
    kept = c._parser.parse(b'[1]')  # as a traceback holding a frame could keep one alive
    body = b'{"x": [[1, 2, 3]]}'
    assert outcome(c.decode_json, body) == outcome(general, c, body)  # this one goes the general way
    del kept
    assert fast(c, body) is not None  # and the path is fast again


def test_other_fields_decode_the_same_way_on_the_fast_path() -> None:
    c = codec("f32")
    bodies = [b'{"x": [[1, 2, 3]], "scale": 2}', b'{"x": [[1, 2, 3]]}', b'{"x": [[1, 2, 3]], "scale": "big"}',
              b'{"x": [[1, 2, 3]], "y": 1}', b'{"scale": 2}']
    results = [outcome(c.decode_json, body) for body in bodies]
    assert results == [outcome(general, c, body) for body in bodies]
    assert [r["scale"] for r in results[:2]] == [2, 1.0]
    assert all(r[0] in (400, 422) for r in results[2:])


# --- over HTTP: what a real server answers to bodies it cannot read, forms, and results JSON cannot carry ---------

SERVICES = Path(__file__).parent / "services"


@pytest.fixture(scope="module")
def every_input(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    srv = Server("every_input.py:EveryInput", SERVICES, [], {**os.environ, "PYTHONUNBUFFERED": "1"},
                 tmp_path_factory.mktemp("every_input") / "server.log")
    srv.wait_ready()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def non_finite(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    srv = Server("every_input.py:NonFinite", SERVICES, [], {**os.environ, "PYTHONUNBUFFERED": "1"},
                 tmp_path_factory.mktemp("non_finite") / "server.log")
    srv.wait_ready()
    yield srv
    srv.stop()


def deep(depth: int) -> str:
    return "[" * depth + "]" * depth


@pytest.mark.parametrize(
    ("api", "body"),
    [
        ("scalars", '{"i": %s, "f": 1, "s": "", "b": true}' % deep(1000)),  # an int field: a type error first
        ("rows", '{"x": %s}' % deep(5000)),  # the simdjson path
        ("any_array", '{"x": %s}' % deep(1000)),
        ("anything", '{"value": %s}' % deep(1000)),
        ("struct", '{"item": {"text": "a"}, "count": 1, "extra": %s}' % deep(1000)),
        ("mapping", "[" * 1000),  # deep and truncated
    ],
    ids=["int", "simdjson", "array", "any", "unknown-field", "truncated"],
)
def test_json_nested_too_deep_is_a_400_without_a_traceback(every_input: Server, api: str, body: str) -> None:
    before = every_input.log().count("Traceback")
    r = httpx.post(f"{every_input.url}/{api}", content=body, headers={"content-type": "application/json"}, timeout=10)
    assert r.status_code == 400, r.text
    assert "nested too deeply" in r.json()["error"]
    assert every_input.log().count("Traceback") == before


@pytest.mark.parametrize(
    ("api", "fields", "field"),
    [
        ("rows", {"x": "not json"}, "$.x"),
        ("rows", {"x": deep(1000)}, "$.x"),
        ("struct", {"item": "{'text': 'a'}"}, "$.item"),
        ("mapping", {"d": '{"a": 1'}, "$.d"),
    ],
    ids=["array", "array-deep", "struct", "dict"],
)
def test_a_form_field_that_must_be_json_and_is_not_is_a_400_naming_it(
    every_input: Server, api: str, fields: dict, field: str
) -> None:
    before = every_input.log().count("Traceback")
    r = httpx.post(f"{every_input.url}/{api}", files={k: (None, v) for k, v in fields.items()}, timeout=10)
    assert r.status_code == 400, r.text
    assert r.json()["field"] == field and "JSON" in r.json()["error"] and field[2:] in r.json()["error"]
    assert every_input.log().count("Traceback") == before


def test_struct_dict_list_and_array_inputs_travel_in_a_form_as_json_text(every_input: Server) -> None:
    url = every_input.url

    def form(api: str, **fields: Any) -> httpx.Response:
        parts = {k: v if isinstance(v, tuple) else (None, v) for k, v in fields.items()}
        return httpx.post(f"{url}/{api}", files=parts, timeout=10)

    r = form("struct", item='{"text": "a"}', count="2")
    assert r.status_code == 200, r.text
    assert r.json() == {"item": {"text": "a", "lang": "en", "score": 0.0}, "count": 2}
    r = form("nested", order='{"item": {"text": "b", "lang": "fr"}, "tags": ["x"]}')
    assert r.json() == {"item": {"text": "b", "lang": "fr", "score": 0.0}, "tags": ["x"]}, r.text
    assert form("mapping", d='{"a": 1.5}').json() == {"a": 1.5}
    assert form("listing", xs="[1, 2, 3]", names='["p"]').json() == {"count": 3, "names": ["p"]}
    assert form("rows", x="[[1, 2, 3]]").json() == [[1.0, 2.0, 3.0]]
    # A JSON file part for a JSON input is read like a field; a file travels beside the others.
    r = form("mixed", file=("a.bin", b"\x00\x01", "application/octet-stream"),
             item=("item.json", b'{"text": "c"}', "application/json"), x="[1, 2]", flag="true", d='{"k": 3}')
    assert r.status_code == 200, r.text
    assert r.json() == {"size": 2, "item": {"text": "c", "lang": "en", "score": 0.0}, "x": [1, 2], "flag": True,
                        "d": {"k": 3}}
    # Text inputs stay text: a str field that looks like JSON is not parsed.
    r = form("scalars", i="1", f="2.5", s='{"a": 1}', b="false")
    assert r.json() == {"i": 1, "f": 2.5, "s": '{"a": 1}', "b": False}
    assert form("optional", n="7").json() == {"n": 7, "word": "", "on": False}
    # Well-formed JSON of the wrong shape is a 422 naming the path inside the field.
    r = form("struct", item='{"text": 1}')
    assert r.status_code == 422 and r.json()["field"] == "$.item.text", r.text


@pytest.mark.parametrize(
    ("api", "body", "where"),
    [
        ("ratio", {"a": 1, "b": 0}, "$.ratio"),
        ("ratio", {"a": 0, "b": 0}, "$.ratio"),
        ("scaled", {"x": [[1, 2, 3], [1, -3e38, 2]], "k": 10}, "$[1][1]"),
        ("values", {"x": [1, 2, -1e10]}, "$[2]"),
    ],
)
def test_a_result_json_cannot_carry_is_an_error_naming_where_it_is(non_finite: Server, api: str, body: dict,
                                                                    where: str) -> None:
    r = httpx.post(f"{non_finite.url}/{api}", json=body, timeout=10)
    assert r.status_code == 500, r.text
    error = r.json()["error"]
    assert f"API {api!r}" in error and where in error and ("inf" in error or "nan" in error), error
    assert "Traceback" not in non_finite.log()
    assert httpx.post(f"{non_finite.url}/ratio", json={"a": 1, "b": 4}, timeout=10).json() == {"ratio": 0.25}


def test_a_streamed_item_json_cannot_carry_ends_the_stream_with_an_error_event(non_finite: Server) -> None:
    r = httpx.post(f"{non_finite.url}/stream", json={"x": [1, 1e10]}, timeout=10)
    assert r.text.startswith("data: 1e300\n\n") and "event: error" in r.text and "inf" in r.text, r.text
