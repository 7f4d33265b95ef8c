"""Model updates while serving: the repository API, swaps between batches under load, failed loads, watch mode.

The service (services/versioned.py) serves a stored torch model whose output is its version number k, and
appends the number of the batch each row ran in, so every response says which version computed it and in
which batch; the ``x-model-version`` header says which version the server thinks served it.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

import bento_like as bl

SERVICES = Path(__file__).parent / "services"
TARGET = "versioned.py:Versioned"
TOKEN = "test-admin-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def _linear(k: float, out: int = 2):  # type: ignore[no-untyped-def]
    import torch

    model = torch.nn.Linear(4, out)
    with torch.no_grad():
        model.weight.zero_()
        model.bias.fill_(float(k))
    return model


class Store:
    """A model store of scorer versions, each remembered by its number k."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.store = bl.models.ModelStore(root)
        self.tags: dict[float, str] = {}

    def save(self, k: float, out: int = 2) -> str:
        tag = self.store.save("scorer", _linear(k, out), framework="torch")
        self.tags[k] = tag
        return tag

    def k_of(self, tag: str) -> float:
        return next(k for k, t in self.tags.items() if t == tag)


@pytest.fixture
def store(tmp_path: Path) -> Store:
    return Store(tmp_path / "store")


def _env(store: Store, **extra: str) -> dict[str, str]:
    return {"BENTO_LIKE_MODEL_STORE": str(store.root), "BENTO_LIKE_ADMIN_TOKEN": TOKEN, **extra}


@dataclass
class Record:
    status: int
    header: str | None
    k: float | None
    batch: int | None
    pid: int | None
    sent: float  # monotonic time the request was sent


class Load:
    """Clients that keep sending one-row requests over keep-alive connections, in a thread of their own."""

    def __init__(self, url: str, clients: int = 6, pause: float = 0.004) -> None:
        self.url, self.clients, self.pause = url, clients, pause
        self.records: list[Record] = []
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._run()), daemon=True)

    def __enter__(self) -> Load:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(30)

    async def _run(self) -> None:
        async with httpx.AsyncClient(base_url=self.url, timeout=30) as client:
            await asyncio.gather(*(self._client(client) for _ in range(self.clients)))

    async def _client(self, client: httpx.AsyncClient) -> None:
        while not self._stop.is_set():
            sent = time.monotonic()
            try:
                r = await client.post("/score", json={"x": [[1.0, 2.0, 3.0, 4.0]]})
            except httpx.HTTPError as exc:
                self.errors.append(repr(exc))
                continue
            if r.status_code == 200:
                row = r.json()[0]
                self.records.append(Record(200, r.headers.get("x-model-version"), row[0], int(row[-2]), int(row[-1]),
                                           sent))
            else:
                self.records.append(Record(r.status_code, None, None, None, None, sent))
                self.errors.append(r.text)
            await asyncio.sleep(self.pause)

    def count(self) -> int:
        return len(self.records)


def _load(url: str, body: dict | None = None, name: str = "scorer") -> httpx.Response:
    return httpx.post(f"{url}/v2/repository/models/{name}/load", json=body or {}, headers=AUTH, timeout=120)


def _wait_for_requests(load: Load, more: int, timeout: float = 30) -> None:
    want = load.count() + more
    deadline = time.monotonic() + timeout
    while load.count() < want and time.monotonic() < deadline:
        time.sleep(0.02)


def check_versions(records: list[Record], store: Store, loads: list[tuple[float, float]] = ()) -> list[float]:
    """Every answer computed by the version its header names; one version per batch; in each worker's batch
    order, versions never going back; no request sent after a load returned answered by an older version
    (``loads``: (monotonic time the load returned, its version)). Returns the versions in the order they
    first served."""
    by_batch: dict[tuple[int, int], set[float]] = defaultdict(set)
    for r in records:
        assert r.header is not None and r.k is not None and r.batch is not None and r.pid is not None
        assert store.k_of(r.header) == r.k, f"header {r.header} but the output is version {r.k}"
        by_batch[(r.pid, r.batch)].add(r.k)
    mixed = {b: ks for b, ks in by_batch.items() if len(ks) > 1}
    assert not mixed, f"batches that held two versions: {mixed}"
    for pid in {pid for pid, _ in by_batch}:
        order = [next(iter(by_batch[b])) for b in sorted(b for b in by_batch if b[0] == pid)]
        assert order == sorted(order), f"worker {pid}: a version came back after a newer one served"
    for returned, k in loads:
        older = [r for r in records if r.sent > returned and r.k < k]
        assert not older, f"{len(older)} requests sent after version {k} was loaded were answered by an older one"
    first: dict[float, float] = {}
    for r in sorted(records, key=lambda r: r.sent):
        first.setdefault(r.k, r.sent)  # type: ignore[arg-type]
    return sorted(first, key=first.__getitem__)


def _alive_models(url: str, want: int, timeout: float = 10) -> int:
    deadline = time.monotonic() + timeout
    alive = -1
    while time.monotonic() < deadline:
        alive = httpx.post(f"{url}/alive", json={}, timeout=10).json()
        if alive == want:
            break
        time.sleep(0.1)
    return alive


def test_five_swaps_under_load_lose_nothing_mix_nothing_and_free_the_old_model(start_server, store: Store) -> None:
    store.save(1)
    server = start_server(TARGET, cwd=SERVICES, args=["--admin"], env=_env(store))
    loads = []
    with Load(server.url) as load:
        _wait_for_requests(load, 50)
        for k in range(2, 7):
            tag = store.save(k)
            r = _load(server.url, {"parameters": {"version": tag}})
            assert r.status_code == 200, r.text
            loads.append((time.monotonic(), k))
            assert r.json() == {"name": "scorer", "version": tag.split(":")[1], "state": "READY", "outcome": "loaded"}
            _wait_for_requests(load, 50)
    assert not load.errors, load.errors[:5]
    assert all(r.status == 200 for r in load.records)
    assert check_versions(load.records, store, loads) == [1, 2, 3, 4, 5, 6]
    # the five replaced models were released and collected: only the serving one is alive
    assert _alive_models(server.url, 1) == 1
    metrics = httpx.get(f"{server.url}/metrics").text
    assert f'bento_like_requests_total{{api="score",status="200",version="{store.tags[6]}"}}' in metrics


def test_a_corrupt_a_missing_and_a_reshaped_version_fail_with_the_reason_while_serving_goes_on(
    start_server, store: Store
) -> None:
    good = store.save(1)
    corrupt = store.save(2)
    weights = sorted((p for p in (store.root / "scorer" / corrupt.split(":")[1]).rglob("*") if p.is_file()
                      and p.name != "model.yaml"), key=lambda p: p.stat().st_size)[-1]
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte
    weights.write_bytes(bytes(data))
    reshaped = store.save(3, out=3)
    server = start_server(TARGET, cwd=SERVICES, args=["--admin"], env=_env(store))
    assert httpx.post(f"{server.url}/v2/repository/models/scorer/load", headers=AUTH,
                      json={"parameters": {"version": good}}).status_code == 200
    with Load(server.url) as load:
        _wait_for_requests(load, 30)
        r = _load(server.url, {"parameters": {"version": corrupt}})
        assert r.status_code == 400 and corrupt in r.json()["error"], r.text
        assert "sha256" in r.json()["error"] or "digest" in r.json()["error"], r.text
        r = _load(server.url, {"parameters": {"version": "scorer:00000000deadbeef"}})
        assert r.status_code == 404 and "00000000deadbeef" in r.json()["error"], r.text
        r = _load(server.url, {"parameters": {"version": reshaped}})
        assert r.status_code == 400, r.text
        assert (f"API 'score' answers an array of shape (1, 5) (float64) with {reshaped}, and an array of shape "
                f"(1, 4) (float64) with the serving {good}, on the same input") in r.json()["error"], r.text
        r = _load(server.url, {"parameters": {"version": "iris:00000000deadbeef"}})
        assert r.status_code == 400 and "not a version of model 'scorer'" in r.json()["error"], r.text
        _wait_for_requests(load, 30)
    assert not load.errors, load.errors[:5]
    assert {r.header for r in load.records} == {good}
    index = httpx.post(f"{server.url}/v2/repository/index", headers=AUTH).json()
    assert index == [{"name": "scorer", "version": good.split(":")[1], "state": "READY", "reason": ""}]
    assert _alive_models(server.url, 1) == 1  # what the failed loads built was released


def test_the_repository_api_refuses_without_the_token_and_is_off_by_default(start_server, store: Store) -> None:
    store.save(1)
    server = start_server(TARGET, cwd=SERVICES, args=["--admin"], env=_env(store))
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {TOKEN}"}):
        r = httpx.post(f"{server.url}/v2/repository/index", headers=headers)
        assert r.status_code == 401 and r.headers["www-authenticate"].startswith("Bearer"), r.text
        r = httpx.post(f"{server.url}/v2/repository/models/scorer/unload", headers=headers)
        assert r.status_code == 401
    assert httpx.post(f"{server.url}/score", json={"x": [[0, 0, 0, 0]]}).status_code == 200  # nothing unloaded
    r = httpx.post(f"{server.url}/v2/repository/models/nope/load", headers=AUTH)
    assert r.status_code == 404 and "no model 'nope'" in r.json()["error"] and "scorer" in r.json()["error"]
    r = httpx.post(f"{server.url}/v2/repository/models/scorer/load", headers=AUTH, content=b"{not json")
    assert r.status_code == 400 and "not JSON" in r.json()["error"]
    r = httpx.post(f"{server.url}/v2/repository/models/scorer/load", headers=AUTH,
                   json={"parameters": {"quality": {"metric": "f1"}}})
    assert r.status_code == 400 and "metric" in r.json()["error"]

    plain = start_server(TARGET, cwd=SERVICES, env=_env(store))
    assert httpx.post(f"{plain.url}/v2/repository/index", headers=AUTH).status_code == 404


def test_admin_without_a_token_does_not_start(tmp_path: Path) -> None:
    import subprocess
    import sys

    env = {k: v for k, v in __import__("os").environ.items() if k != "BENTO_LIKE_ADMIN_TOKEN"}
    result = subprocess.run([sys.executable, "-m", "bento_like", "serve", TARGET, "--admin"], cwd=SERVICES,
                            env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    assert "--admin: it needs a token" in result.stderr and "BENTO_LIKE_ADMIN_TOKEN" in result.stderr


def test_tritonclient_index_load_and_unload(start_server, store: Store) -> None:
    import tritonclient.http as triton
    from tritonclient.utils import InferenceServerException

    first = store.save(1)
    second = store.save(2)
    server = start_server(TARGET, cwd=SERVICES, args=["--admin"], env=_env(store))
    client = triton.InferenceServerClient(url=server.url.removeprefix("http://"))
    try:
        with pytest.raises(InferenceServerException, match="admin token"):
            client.get_model_repository_index()
        index = client.get_model_repository_index(headers=AUTH)
        assert index == [{"name": "scorer", "version": second.split(":")[1], "state": "READY", "reason": ""}]
        assert client.is_model_ready("scorer", second.split(":")[1])
        assert not client.is_model_ready("scorer", first.split(":")[1])

        client.load_model("scorer", headers=AUTH, config=json.dumps({"version": first}))
        assert client.is_model_ready("scorer", first.split(":")[1])
        r = httpx.post(f"{server.url}/score", json={"x": [[0, 0, 0, 0]]})
        assert r.headers["x-model-version"] == first and r.json()[0][0] == 1

        client.unload_model("scorer", headers=AUTH)
        assert not client.is_model_ready("scorer")
        assert client.get_model_repository_index(headers=AUTH)[0]["state"] == "UNAVAILABLE"
        r = httpx.post(f"{server.url}/score", json={"x": [[0, 0, 0, 0]]})
        assert r.status_code == 503 and "unloaded" in r.json()["error"] and r.headers["retry-after"]
        assert httpx.get(f"{server.url}/readyz").json()["state"] == "unloaded"

        with pytest.raises(InferenceServerException, match="00000000deadbeef"):
            client.load_model("scorer", headers=AUTH, config=json.dumps({"version": "00000000deadbeef"}))
        client.load_model("scorer", headers=AUTH)  # no version: what the reference (scorer:latest) resolves to
        assert client.is_model_ready("scorer", second.split(":")[1])
        assert httpx.get(f"{server.url}/readyz").status_code == 200
        assert httpx.post(f"{server.url}/score", json={"x": [[0, 0, 0, 0]]}).json()[0][0] == 2
        assert client.get_model_repository_index(headers=AUTH)[0]["state"] == "READY"
        assert _alive_models(server.url, 1) == 1  # the unloaded version's model was collected
    finally:
        client.close()


def test_watch_mode_swaps_in_a_new_latest(start_server, store: Store) -> None:
    store.save(1)
    server = start_server(TARGET, cwd=SERVICES, args=["--watch-models"],
                          env=_env(store, BENTO_LIKE_WATCH_MODELS_S="0.2"))
    with Load(server.url, clients=3) as load:
        _wait_for_requests(load, 20)
        store.save(2)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and load.records[-1].k != 2:
            time.sleep(0.05)
        _wait_for_requests(load, 20)
    assert not load.errors, load.errors[:5]
    assert check_versions(load.records, store) == [1, 2]
    assert "scorer:latest now resolves to" in server.log()


def test_replace_mode_swaps_without_holding_both(start_server, store: Store) -> None:
    store.save(1)
    server = start_server(TARGET, cwd=SERVICES, args=["--admin", "--swap-mode", "replace"], env=_env(store))
    with Load(server.url, clients=3) as load:
        _wait_for_requests(load, 20)
        r = _load(server.url, {"parameters": {"version": store.save(2)}})
        assert r.status_code == 200, r.text
        _wait_for_requests(load, 20)
    assert not load.errors, load.errors[:5]
    assert check_versions(load.records, store) == [1, 2]
    assert _alive_models(server.url, 1) == 1


def test_a_quality_check_refuses_a_version_that_moved_too_far(start_server, store: Store) -> None:
    store.save(1)
    server = start_server(TARGET, cwd=SERVICES, args=["--admin"], env=_env(store))
    # the input the check runs on: the last one served (score's batch column is no model output: not called)
    assert httpx.post(f"{server.url}/predict", json={"x": [[1, 2, 3, 4]]}).status_code == 200
    far = store.save(-1)  # the output's sign flips
    r = _load(server.url, {"parameters": {"version": far, "quality": {"metric": "cosine", "min": 0.99}}})
    assert r.status_code == 400, r.text
    assert "quality check failed on API 'predict': cosine -1, must be >= 0.99" in r.json()["error"], r.text
    near = store.save(1.001)
    r = _load(server.url, {"parameters": {"version": near, "quality": {"metric": "max_abs", "max": 0.01}}})
    assert r.status_code == 200, r.text
    assert httpx.post(f"{server.url}/predict", json={"x": [[0, 0, 0, 0]]}).headers["x-model-version"] == near


def test_with_workers_every_worker_swaps_or_none_does(
    start_server, store: Store
) -> None:
    first = store.save(1)
    second = store.save(2)
    server = start_server(TARGET, cwd=SERVICES, args=["--admin", "--workers", "2"], env=_env(store))
    r = _load(server.url, {"parameters": {"version": first}})
    assert r.status_code == 200, r.text
    seen = set()
    for _ in range(40):  # a new connection each time: both workers answer
        r = httpx.post(f"{server.url}/score", json={"x": [[0, 0, 0, 0]]}, headers={"Connection": "close"})
        seen.add(r.headers["x-model-version"])
    assert seen == {first}
    r = _load(server.url, {"parameters": {"version": "scorer:00000000deadbeef"}})
    assert r.status_code == 404, r.text
    assert {httpx.post(f"{server.url}/score", json={"x": [[0, 0, 0, 0]]}, headers={"Connection": "close"})
            .headers["x-model-version"] for _ in range(20)} == {first}
    r = _load(server.url, {"parameters": {"version": second}})
    assert r.status_code == 200, r.text
    assert {httpx.post(f"{server.url}/score", json={"x": [[0, 0, 0, 0]]}, headers={"Connection": "close"})
            .headers["x-model-version"] for _ in range(20)} == {second}


def test_unit_beside_mode_refuses_when_memory_cannot_hold_both(monkeypatch: pytest.MonkeyPatch, store: Store) -> None:
    from bento_like.serving import repository
    from bento_like.serving.app import ServeOptions, ServerState
    from bento_like.sdk.loader import load_service

    tag = store.save(1)
    monkeypatch.setenv("BENTO_LIKE_MODEL_STORE", str(store.root))
    spec = load_service(TARGET, str(SERVICES))
    repo = ServerState(spec, ServeOptions()).repository
    stored = store.store.get(tag)
    monkeypatch.setattr(repository, "free_memory", lambda device: stored.info.size - 1)
    with pytest.raises(repository.LoadFailed, match="--swap-mode replace") as refused:
        repo._check_memory(stored)
    assert refused.value.status == 409
    monkeypatch.setattr(repository, "free_memory", lambda device: stored.info.size * 2)
    repo._check_memory(stored)  # fits: no error


def test_acceptance_five_swaps_and_two_code_reloads_under_load(start_server, store: Store) -> None:
    """The issue's acceptance run: steady load for about 20 s on two workers, five model swaps and two rolling
    code reloads (SIGHUP) among them; zero non-2xx, no batch with two versions, versions only ever forward, a
    reload's new workers serving the version loaded before it (not what 'latest' resolves to), the replaced
    models collected."""
    import signal

    store.save(1)
    server = start_server(TARGET, cwd=SERVICES, args=["--admin", "--workers", "2"], env=_env(store))
    loads: list[tuple[float, float]] = []
    started = time.monotonic()

    def swap(k: int) -> None:
        r = _load(server.url, {"parameters": {"version": store.save(k)}})
        assert r.status_code == 200, r.text
        loads.append((time.monotonic(), k))

    def reload(number: int) -> float:
        server.proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 60
        while f"reload {number}: done" not in server.log() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert f"reload {number}: done" in server.log(), server.log()
        return time.monotonic()

    with Load(server.url) as load:
        _wait_for_requests(load, 50)
        first_pids = {r.pid for r in load.records}
        swap(2)
        swap(3)
        _wait_for_requests(load, 50)
        reloaded = reload(1)
        _wait_for_requests(load, 100)
        swap(4)
        swap(5)
        store.save(7)  # the newest in the store, never loaded: a new worker must not pick it up
        _wait_for_requests(load, 50)
        second = reload(2)
        _wait_for_requests(load, 100)
        before_sixth = time.monotonic()
        swap(6)
        while time.monotonic() - started < 20:  # the rest of the 20 s under load
            time.sleep(0.1)
    assert not load.errors, load.errors[:5]
    assert load.count() > 500 and all(r.status == 200 for r in load.records)
    assert check_versions(load.records, store, loads) == [1, 2, 3, 4, 5, 6]
    print(f"acceptance: {load.count()} requests in {time.monotonic() - started:.1f} s, all 200; "
          f"{len({(r.pid, r.batch) for r in load.records})} batches, {len({r.pid for r in load.records})} worker pids")
    new_pids = {r.pid for r in load.records if r.sent > reloaded}
    assert new_pids and not new_pids & first_pids  # the first reload's workers served
    assert {r.k for r in load.records if second < r.sent < before_sixth} == {5}  # pinned, not 'latest' (7)
    for _ in range(10):  # either worker: only the serving model is alive in it
        deadline = time.monotonic() + 10
        while True:
            r = httpx.post(f"{server.url}/alive", json={}, headers={"Connection": "close"})
            if r.json() == 1 or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert r.status_code == 200 and r.json() == 1 and r.headers["x-model-version"] == store.tags[6]
