"""Services written the way BentoML 1.4's documentation writes them, with only the import line changed
(`import bento_like as bentoml`), each served by a real `pkg serve` and called as its users call it: the BentoML
client names, raw HTTP, and the 4xx cases.

Every name a port uses is BentoML's; tests/ports/services/ holds one service per topic of its docs (services,
adaptive batching, IO types, tasks, distributed services, ASGI, lifecycle hooks)."""

from __future__ import annotations

import asyncio
import json
import os
import time
from pathlib import Path
from typing import Iterator

import httpx
import numpy as np
import pytest

import bento_like as bentoml
from bento_like.client import APIClientError
from live_server import Server

SERVICES = Path(__file__).parent / "services"


@pytest.fixture(scope="module")
def serve(tmp_path_factory: pytest.TempPathFactory) -> Iterator:
    started: list[Server] = []

    def start(target: str, env: dict[str, str] | None = None, args: list[str] | None = None) -> Server:
        tmp = tmp_path_factory.mktemp(target.split(":")[0].replace(".py", ""))
        full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        srv = Server(target, SERVICES, args or [], full_env, tmp / "server.log")
        started.append(srv)
        srv.wait_ready()
        return srv

    yield start
    for srv in started:
        srv.stop()


def test_summarization_with_a_hugging_face_model(serve, tmp_path_factory) -> None:  # type: ignore[no-untyped-def]
    hub = tmp_path_factory.mktemp("hf") / "hub"
    snapshot = hub / "models--stand-in--tiny-summarizer" / "snapshots" / "0123abc"
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text(json.dumps({"max_words": 5}))
    (hub / "models--stand-in--tiny-summarizer" / "refs").mkdir()
    (hub / "models--stand-in--tiny-summarizer" / "refs" / "main").write_text("0123abc")
    srv = serve("summarization.py:Summarization", {"HF_HUB_CACHE": str(hub)})
    with bentoml.SyncHTTPClient(srv.url) as client:
        assert client.summarize(text="one two three four five six seven") == "one two three four five..."
        assert client.summarize().startswith("Breaking News: In an astonishing")  # the default input
        with pytest.raises(APIClientError) as info:
            client.summarize(text=42)
        assert info.value.status == 422 and info.value.field == "$.text"


def test_summarization_without_its_model_names_it(tmp_path: Path) -> None:
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "empty"), "HF_HOME": str(tmp_path / "none"),
           "HOME": str(tmp_path)}
    srv = Server("summarization.py:Summarization", SERVICES, [], env, tmp_path / "server.log")
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                r = httpx.get(srv.url + "/readyz", timeout=1)
                if r.status_code == 503 and r.json().get("state") == "failed":
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        assert "stand-in/tiny-summarizer" in r.json()["error"] and "nothing is downloaded" in r.json()["error"]
    finally:
        srv.stop()


def test_adaptive_batching_with_validators(serve) -> None:  # type: ignore[no-untyped-def]
    srv = serve("embeddings.py:SentenceEmbedding")

    async def burst() -> list:
        async with bentoml.AsyncHTTPClient(srv.url) as client:
            rows = [np.full((1, 8), i, dtype=np.float32) for i in range(24)]
            return await asyncio.gather(*(client.encode(features=row) for row in rows))

    results = asyncio.run(burst())
    assert all(r.shape == (1, 4) for r in results)
    np.testing.assert_allclose(results[3], results[1] * 3, rtol=1e-5)
    with bentoml.SyncHTTPClient(srv.url) as client:
        assert max(client.batch_sizes_seen()) > 1  # concurrent requests were merged
        with pytest.raises(APIClientError) as info:
            client.encode(features=np.zeros((2, 7), dtype=np.float32))
        assert info.value.status == 422 and "shape" in info.value.message and info.value.field == "$.features"


def test_llm_stream_with_pydantic_config_and_context(serve) -> None:  # type: ignore[no-untyped-def]
    srv = serve("llm.py:LLM")
    with httpx.Client(base_url=srv.url, timeout=10) as http:
        with http.stream("POST", "/generate", json={"prompt": "ab", "config": {"max_tokens": 3}}) as r:
            assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
            assert r.headers["x-model"] == "stand-in"
            assert "".join(r.iter_text()) == "brown fox jumps "
        r = http.post("/generate", json={"config": {"max_tokens": 65}})
        assert r.status_code == 422 and r.json()["field"] == "$.config.max_tokens", r.text
        r = http.post("/generate", json={"temperature": 2.5})
        assert r.status_code == 422 and r.json()["field"] == "$.temperature", r.text
        r = http.post("/generate", json={"top_p": 0})
        assert r.status_code == 422 and r.json()["field"] == "$.top_p", r.text
        r = http.post("/generate", json={"config": {"stop": ["a", "b", "c", "d", "e"]}})
        assert r.status_code == 422 and r.json()["field"] == "$.config.stop", r.text
        r = http.post("/tokenize", json={"text": "  "})
        assert r.status_code == 400 and r.json() == []  # the API chose its status through ctx
    with bentoml.SyncHTTPClient(srv.url) as client:
        text = "".join(client.generate(prompt="abc", config={"max_tokens": 2, "stop": ["lazy"]}))
        assert text == "fox jumps "
        assert client.tokenize(text="a b") == ["a", "b"]


def test_fastapi_app_mounted_with_get_current_service(serve) -> None:  # type: ignore[no-untyped-def]
    srv = serve("asgi.py:Greeter")
    with httpx.Client(base_url=srv.url, timeout=10) as http:
        assert http.get("/v1/metadata").json() == {"name": "Greeter", "version": "1.0.0"}
        assert http.post("/v1/custom-greet", params={"name": "Ada"}).json() == {"message": "Hello, Ada!"}
        assert http.post("/v1/custom-greet").status_code == 422  # FastAPI's own validation
        assert http.get("/health-info", params={"verbose": "true"}).json() == {"ok": True, "detail": "all good"}
        assert http.get("/health-info", params={"verbose": "maybe"}).status_code == 422
        assert http.post("/greet", json={"name": "Bo"}).text == "Hello, Bo!"
    with bentoml.SyncHTTPClient(srv.url) as client:
        assert client.health_info() == {"ok": True}


def test_lifecycle_hooks_and_bento_model(serve, tmp_path_factory) -> None:  # type: ignore[no-untyped-def]
    tmp = tmp_path_factory.mktemp("lifecycle")
    home = tmp / "home"
    labels = tmp / "labels"
    labels.mkdir()
    (labels / "labels.txt").write_text("cat dog bird")
    env = {"BENTO_LIKE_HOME": str(home), "PORT_EVENTS_FILE": str(tmp / "events"),
           "PORT_NOT_READY_FILE": str(tmp / "not-ready")}
    saved = bentoml.models.ModelStore(home / "models").save("labels", labels)
    assert saved.startswith("labels:")
    srv = serve("lifecycle.py:HookService", env)
    with bentoml.SyncHTTPClient(srv.url) as client:
        assert client.label(index=1) == "dog"
        with pytest.raises(bentoml.client.APIServerError):  # the service's own IndexError: a 500
            client.label(index=7)
    (tmp / "not-ready").write_text("")
    r = httpx.get(srv.url + "/readyz", timeout=10)
    assert r.status_code == 503 and "__is_ready__" in r.json()["error"]
    (tmp / "not-ready").unlink()
    assert httpx.get(srv.url + "/readyz", timeout=10).status_code == 200
    srv.stop()
    assert (tmp / "events").read_text().split() == ["deployment", "init", "startup", "shutdown"]


def test_tasks_submitted_and_polled(serve) -> None:  # type: ignore[no-untyped-def]
    srv = serve("tasks.py:ImageGeneration")
    with bentoml.SyncHTTPClient(srv.url, headers={"X-User": "ada"}) as client:
        task = client.long_running_task.submit(prompt="a red fox", steps=2)
        assert task.get_status().value in ("pending", "in_progress")
        assert task.get(wait=30) == {"prompt": "a red fox", "steps": 2, "user": "ada"}
        assert task.get_status().value == "completed"
        failing = client.failing_task.submit(prompt="x")
        failing.wait(30)
        assert failing.get_status().value == "failed"
        with pytest.raises(bentoml.client.APIServerError) as info:
            failing.get()
        assert info.value.status == 500 and info.value.error_id
        with pytest.raises(APIClientError) as bad:
            client.long_running_task.submit(prompt="p", steps="many")
        assert bad.value.status == 422 and bad.value.field == "$.steps"
    with httpx.Client(base_url=srv.url, timeout=10) as http:
        r = http.get("/long_running_task/status", params={"task_id": "0" * 32})
        assert r.status_code == 404 and "0" * 32 in r.json()["error"]
        r = http.get("/long_running_task/get", params={"task_id": "../../etc/passwd"})
        assert r.status_code == 404

    async def batch() -> list:
        async with bentoml.AsyncHTTPClient(srv.url) as client:
            tasks = [await client.score.submit(rows=[float(i)]) for i in range(6)]
            return [await t.get(wait=30) for t in tasks]

    assert asyncio.run(batch()) == [[float(2 * i)] for i in range(6)]


def test_io_types_images_paths_dataframes_tensors(serve, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    import io

    import pandas as pd
    import torch
    from PIL import Image

    server_tmp = tmp_path / "server-tmp"
    server_tmp.mkdir()
    srv = serve("io_types.py:ImageAndData", {"TMPDIR": str(server_tmp)})
    picture = Image.new("RGB", (4, 2), (200, 10, 10))
    picture.putpixel((0, 0), (0, 0, 255))
    png = tmp_path / "in.png"
    picture.save(png)
    with bentoml.SyncHTTPClient(srv.url) as client:
        gray = client.grayscale(image=picture)
        assert gray.mode == "L" and gray.size == (4, 2) and gray.format == "JPEG"
        mirrored = client.mirror(image=png)
        with Image.open(mirrored) as out:
            assert out.getpixel((3, 0)) == (0, 0, 255)  # the blue corner moved across
        frame = pd.DataFrame({"petal_length": [0.5, 3.0], "petal_width": [0.5, 2.0], "extra": [1, 2]})
        assert list(client.classify(input=frame)["species"]) == ["setosa", "virginica"]
        unit = client.normalize(x=torch.tensor([[3.0, 4.0, 0.0, 0.0]]))
        assert torch.allclose(unit.float(), torch.tensor([[0.6, 0.8, 0.0, 0.0]]))
        with pytest.raises(APIClientError) as info:
            client.classify(input=pd.DataFrame({"petal_length": [1.0]}))
        assert info.value.status == 422 and "petal_width" in info.value.message
    with httpx.Client(base_url=srv.url, timeout=10) as http:
        buffer = io.BytesIO()
        picture.save(buffer, format="PNG")
        corrupt = buffer.getvalue()[:40]
        r = http.post("/grayscale", content=corrupt, headers={"content-type": "image/png"})
        assert r.status_code == 422 and r.json()["field"] == "$.image"
        r = http.post("/mirror", files={"image": ("a.txt", b"hello", "text/plain")})
        assert r.status_code == 415 and "image" in r.json()["error"]
        r = http.post("/normalize", json={"x": [[1, 2, 3]]})
        assert r.status_code == 422 and r.json()["field"] == "$.x"
    assert not list(server_tmp.iterdir())  # ctx.temp_dir and the uploads of Path inputs are gone


def test_distributed_services_with_depends(serve) -> None:  # type: ignore[no-untyped-def]
    srv = serve("distributed.py:Classifier")
    with bentoml.SyncHTTPClient(srv.url) as client:
        answer = client.classify(text="One Two Three Four")
        assert answer["label"] == "long"
        assert answer["preprocessed_by"] != answer["classified_by"]  # the preprocessor runs in its own process
        assert client.aclassify(text="a B c") == "c b a"
        with pytest.raises(bentoml.client.APIError) as info:
            client.classify(text="   ")
        assert info.value.status >= 500 and "preprocess" in info.value.message
        with pytest.raises(APIClientError) as bad:
            client.classify(text=3)
        assert bad.value.status == 422 and bad.value.field == "$.text"
