"""Tasks (`@bl.task`) over a real `pkg serve` process: submit, poll, get, cancel, retry; the store on disk
surviving a restart and shared by workers; the client's task handles."""

from __future__ import annotations

import asyncio
import os
import re
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

import bento_like as bl
from bento_like.client import APIClientError, APIServerError, ResultStatus
from live_server import Server

HERE = Path(__file__).parent
SERVICES = HERE / "services"
SLOW_S = 1.0
HEX32 = re.compile(r"[0-9a-f]{32}")


def _env(state_dir: Path, **extra: str) -> dict[str, str]:
    return {**os.environ, "PYTHONUNBUFFERED": "1", "BENTO_LIKE_STATE_DIR": str(state_dir), "SLOW_S": str(SLOW_S),
            "MAX_QUEUE": "4", **extra}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    tmp = tmp_path_factory.mktemp("tasks")
    srv = Server("tasks.py:Tasks", SERVICES, [], _env(tmp / "state"), tmp / "server.log")
    srv.state_dir = tmp / "state"
    srv.wait_ready()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def http(server: Server):
    with httpx.Client(base_url=server.url, timeout=10) as client:
        yield client


def submit(http: httpx.Client, api: str, **body: Any) -> str:
    r = http.post(f"/{api}/submit", json=body)
    assert r.status_code == 200, r.text
    assert r.json()["status"] in ("pending", "in_progress")
    assert HEX32.fullmatch(r.json()["task_id"])
    return r.json()["task_id"]


def wait_for(http: httpx.Client, api: str, task_id: str, *statuses: str, timeout: float = 10) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        r = http.get(f"/{api}/status", params={"task_id": task_id})
        assert r.status_code == 200, r.text
        if r.json()["status"] in statuses:
            return r.json()
        assert time.monotonic() < deadline, f"task {task_id} still {r.json()['status']}, not {statuses}"
        time.sleep(0.02)


def test_sync_task_is_submitted_then_polled_then_fetched(http: httpx.Client) -> None:
    task_id = submit(http, "repeat", item={"text": "ab", "times": 3})
    status = wait_for(http, "repeat", task_id, "completed")
    assert status["task_id"] == task_id
    assert status["created_at"] <= status["executed_at"] <= status["completed_at"]
    r = http.get("/repeat/get", params={"task_id": task_id})
    assert r.status_code == 200 and r.text == "ababab"
    assert r.headers["content-type"].startswith("text/plain")  # as POST /repeat answers
    assert http.post("/repeat", json={"item": {"text": "ab", "times": 3}}).text == "ababab"  # still an API


def test_async_task_and_a_bytes_task_answer_as_their_api_does(http: httpx.Client) -> None:
    task_id = submit(http, "add", a=2, b=3)
    wait_for(http, "add", task_id, "completed")
    assert http.get("/add/get", params={"task_id": task_id}).json() == {"sum": 5}
    r = http.post("/blob/submit", content=b"hello", headers={"content-type": "application/octet-stream"})
    task_id = r.json()["task_id"]
    wait_for(http, "blob", task_id, "completed")
    r = http.get("/blob/get", params={"task_id": task_id})
    assert r.content == b"olleh" and r.headers["content-type"] == "application/octet-stream"


def test_batchable_tasks_run_together_through_the_batcher(http: httpx.Client) -> None:
    warm_up = len(http.post("/seen", json={}).json()["batch_sizes"])
    ids = [submit(http, "square", xs=[float(i)]) for i in range(4)]  # max_queue=4
    for i, task_id in enumerate(ids):
        wait_for(http, "square", task_id, "completed")
        assert http.get("/square/get", params={"task_id": task_id}).json() == [float(i * i)]
    sizes = http.post("/seen", json={}).json()["batch_sizes"][warm_up:]
    assert sum(sizes) == 4 and max(sizes) > 1, sizes  # several tasks shared one call of the method


def test_a_pending_task_is_canceled_and_never_runs(http: httpx.Client) -> None:
    first = submit(http, "slow", label="first")
    second = submit(http, "slow", label="second")  # one instance runs one task of an API: this one waits
    assert wait_for(http, "slow", second, "pending")["executed_at"] is None
    r = http.get("/slow/get", params={"task_id": first})
    assert r.status_code == 409 and "not finished" in r.json()["error"]
    r = http.put("/slow/cancel", params={"task_id": second})
    assert r.status_code == 200 and r.json()["status"] == "canceled"
    assert http.put("/slow/cancel", params={"task_id": second}).json()["status"] == "canceled"  # idempotent
    r = http.get("/slow/get", params={"task_id": second})
    assert r.status_code == 410 and "canceled" in r.json()["error"]
    wait_for(http, "slow", first, "completed")
    r = http.put("/slow/cancel", params={"task_id": first})
    assert r.status_code == 409 and "already finished (completed)" in r.json()["error"]
    time.sleep(0.2)
    assert "second" not in http.post("/seen", json={}).json()["slow_runs"]


def test_a_running_sync_task_runs_on_but_its_result_is_dropped(http: httpx.Client) -> None:
    task_id = submit(http, "slow", label="sync-canceled")
    wait_for(http, "slow", task_id, "in_progress")
    assert http.put("/slow/cancel", params={"task_id": task_id}).json()["status"] == "canceled"
    deadline = time.monotonic() + 5
    while "sync-canceled" not in http.post("/seen", json={}).json()["slow_runs"]:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    time.sleep(0.1)
    assert wait_for(http, "slow", task_id, "canceled")
    assert http.get("/slow/get", params={"task_id": task_id}).status_code == 410


def test_a_running_async_task_is_interrupted(http: httpx.Client) -> None:
    task_id = submit(http, "aslow", label="async-canceled")
    wait_for(http, "aslow", task_id, "in_progress")
    assert http.put("/aslow/cancel", params={"task_id": task_id}).json()["status"] == "canceled"
    after = submit(http, "aslow", label="after")  # runs once the canceled one gave its slot back
    wait_for(http, "aslow", after, "completed")
    assert "async-canceled" not in http.post("/seen", json={}).json()["slow_runs"]


def test_a_failing_task_answers_its_error_and_can_be_retried(server: Server, http: httpx.Client) -> None:
    task_id = submit(http, "fail", message="boom")
    wait_for(http, "fail", task_id, "failed")
    r = http.get("/fail/get", params={"task_id": task_id})
    assert r.status_code == 500
    body = r.json()
    assert body["task_id"] == task_id and re.fullmatch(r"[0-9a-f]{12}", body["error_id"])
    assert "boom" not in r.text  # the traceback stays in the log
    log = server.log()
    assert body["error_id"] in log and "RuntimeError: task failed on purpose: boom" in log
    r = http.post("/fail/retry", params={"task_id": task_id})
    assert r.status_code == 200
    retried = r.json()["task_id"]
    assert retried != task_id
    wait_for(http, "fail", retried, "failed")
    error_id = http.get("/fail/get", params={"task_id": retried}).json()["error_id"]
    assert error_id != body["error_id"]
    traceback = server.log().split(f"error {error_id} in task {retried}")[1]
    assert "task failed on purpose: boom" in traceback  # the same input ran again
    r = http.post("/fail/submit", data={"message": "from a form"}, files={"unused": ("u.txt", b"u")})
    assert r.status_code == 422  # a form is decoded as POST /fail decodes it: no unknown fields
    r = http.post("/fail/submit", files={"message": (None, "from a form")})
    form_task = r.json()["task_id"]
    wait_for(http, "fail", form_task, "failed")
    retried = http.post("/fail/retry", params={"task_id": form_task}).json()["task_id"]
    wait_for(http, "fail", retried, "failed")  # the kept multipart body, boundary and all, decodes again
    error_id = http.get("/fail/get", params={"task_id": retried}).json()["error_id"]
    assert "task failed on purpose: from a form" in server.log().split(f"error {error_id} in task {retried}")[1]
    done = submit(http, "repeat", item={"text": "x"})
    wait_for(http, "repeat", done, "completed")
    r = http.post("/repeat/retry", params={"task_id": done})
    assert r.status_code == 409 and "only a failed task" in r.json()["error"]


@pytest.mark.parametrize("op, method", [("status", "GET"), ("get", "GET"), ("cancel", "PUT"), ("retry", "POST")])
def test_unknown_malformed_and_missing_task_ids(http: httpx.Client, op: str, method: str) -> None:
    unknown = "0" * 32
    r = http.request(method, f"/repeat/{op}", params={"task_id": unknown})
    assert r.status_code == 404 and unknown in r.json()["error"]
    for bad in ("../../etc/passwd", "ABC", "0" * 31 + "g", ""):
        r = http.request(method, f"/repeat/{op}", params={"task_id": bad})
        assert r.status_code == 404 and "not a task id" in r.json()["error"], bad
    r = http.request(method, f"/repeat/{op}")
    assert r.status_code == 400 and r.json()["field"] == "task_id" and "'task_id' is required" in r.json()["error"]


def test_a_task_of_another_api_is_unknown_here(http: httpx.Client) -> None:
    task_id = submit(http, "aslow", label="another API's")
    for method, op in (("GET", "status"), ("GET", "get"), ("PUT", "cancel"), ("POST", "retry")):
        assert http.request(method, f"/repeat/{op}", params={"task_id": task_id}).status_code == 404
    assert wait_for(http, "aslow", task_id, "completed")  # the cancel above did not touch it


def test_bad_input_is_refused_at_submit_like_the_api_refuses_it(http: httpx.Client) -> None:
    r = http.post("/repeat/submit", json={"item": {"text": 1}})
    assert r.status_code == 422 and r.json()["field"] == "$.item.text"
    r = http.post("/add/submit", json={"b": 2})
    assert r.status_code == 422 and r.json()["field"] == "$.a"
    r = http.post("/add/submit", content=b"{bad", headers={"content-type": "application/json"})
    assert r.status_code == 400 and "malformed JSON" in r.json()["error"]
    r = http.post("/add/submit", content=b"a=1", headers={"content-type": "application/x-www-form-urlencoded"})
    assert r.status_code == 415


def test_submit_past_max_queue_is_429_with_retry_after(http: httpx.Client) -> None:
    ids = [submit(http, "slow", label=f"cap-{i}") for i in range(4)]  # max_queue=4: 1 running, 3 pending
    r = http.post("/slow/submit", json={"label": "one too many"})
    assert r.status_code == 429 and r.headers["retry-after"] == "1"
    assert "max_queue" in r.json()["error"]
    for task_id in ids:
        http.put("/slow/cancel", params={"task_id": task_id})
    submit(http, "repeat", item={"text": "other APIs have their own cap"})
    wait_for(http, "slow", ids[0], "canceled")
    wait_for(http, "slow", submit(http, "slow", label="room again"), "completed", timeout=SLOW_S * 3 + 5)


def test_metrics_count_tasks(http: httpx.Client) -> None:
    metrics = http.get("/metrics").text
    assert re.search(r'bento_like_tasks_total\{api="repeat",status="completed"\} [1-9]', metrics)
    assert re.search(r'bento_like_tasks_total\{api="slow",status="canceled"\} [1-9]', metrics)
    assert re.search(r'bento_like_rejections_total\{api="slow",reason="queue_full"\} [1-9]', metrics)
    assert 'bento_like_tasks{api="slow",status="pending"} 0' in metrics


def test_openapi_lists_the_task_routes(http: httpx.Client) -> None:
    spec = http.get("/openapi.json").json()
    paths = spec["paths"]
    assert paths["/repeat"]["post"]["x-bento-api"]["task"] is True
    assert paths["/seen"]["post"]["x-bento-api"]["task"] is False
    submit_op = paths["/repeat/submit"]["post"]
    assert submit_op["requestBody"] == paths["/repeat"]["post"]["requestBody"]
    assert submit_op["responses"]["200"]["content"]["application/json"]["schema"]["$ref"].endswith("TaskStatus")
    for route, method in (("status", "get"), ("get", "get"), ("cancel", "put"), ("retry", "post")):
        params = paths[f"/repeat/{route}"][method]["parameters"]
        assert params[0]["name"] == "task_id" and params[0]["required"] is True
    assert "/seen/submit" not in paths


def test_the_client_submits_polls_gets_and_cancels(server: Server) -> None:
    with bl.Client(server.url) as client:
        task = client.repeat.submit({"text": "yo", "times": 2})
        assert HEX32.fullmatch(task.id)
        assert task.get(wait=10) == "yoyo"
        assert task.get_status() is ResultStatus.COMPLETED and task.status() == "completed"
        info = task.info()
        assert info.executed_at is not None and info.completed_at >= info.executed_at
        assert client.repeat.get(task.id) == "yoyo"  # BentoML's methods by id, on the API
        assert client.repeat.get_status(task.id) is ResultStatus.COMPLETED
        assert client.repeat({"text": "z"}) == "z"  # calling a task API directly waits for it, as in BentoML

        running = client.slow.submit("client-running")
        pending = client.slow.submit(label="client-pending")
        with pytest.raises(APIClientError) as not_yet:
            pending.get()
        assert not_yet.value.status == 409
        assert pending.cancel().status is ResultStatus.CANCELED
        with pytest.raises(APIClientError) as gone:
            pending.get()
        assert gone.value.status == 410
        assert running.get(wait=10) == "client-running"

        failed = client.fail.submit("client")
        with pytest.raises(APIServerError) as error:
            failed.get(wait=10)
        assert error.value.status == 500 and error.value.error_id
        assert failed.retry().wait(10).status is ResultStatus.FAILED
        assert client.get_task("add", client.add.submit(4).id).get(wait=10) == {"sum": 5}
        with pytest.raises(TypeError, match="not a task"):
            client.seen.submit()


def test_the_async_client_twin(server: Server) -> None:
    async def main() -> None:
        async with bl.AsyncClient(server.url) as client:
            task = await client.add.submit(a=1, b=2)
            assert await task.get(wait=10) == {"sum": 3}
            assert await task.get_status() is ResultStatus.COMPLETED
            assert await client.add.get(task.id) == {"sum": 3}
            slow = await client.aslow.submit("async-client")
            pending = await client.aslow.submit("async-client-pending")
            assert (await pending.cancel()).status is ResultStatus.CANCELED
            assert (await client.aslow.get_status(pending.id)) is ResultStatus.CANCELED
            assert await slow.get(wait=10) == "async-client"
            failed = await client.fail.submit("async")
            with pytest.raises(APIServerError):
                await failed.get(wait=10)

    asyncio.run(main())


def test_results_survive_a_restart_and_a_stop_fails_running_tasks(start_server, tmp_path: Path) -> None:
    env = _env(tmp_path / "state", SLOW_S="30")
    first = start_server("tasks.py:Tasks", cwd=SERVICES, env=env)
    done = submit(httpx.Client(base_url=first.url), "repeat", item={"text": "kept"})
    wait_for(httpx.Client(base_url=first.url), "repeat", done, "completed")
    running = submit(httpx.Client(base_url=first.url), "slow", label="cut short")
    wait_for(httpx.Client(base_url=first.url), "slow", running, "in_progress")
    first.stop()

    second = start_server("tasks.py:Tasks", cwd=SERVICES, env={**env, "SLOW_S": "0.1"})
    with httpx.Client(base_url=second.url, timeout=10) as http:
        assert http.get("/repeat/get", params={"task_id": done}).text == "kept"
        status = http.get("/slow/status", params={"task_id": running}).json()
        assert status["status"] == "failed"
        r = http.get("/slow/get", params={"task_id": running})
        assert r.status_code == 500 and "the server stopped before it finished" in r.json()["error"]
        retried = http.post("/slow/retry", params={"task_id": running}).json()["task_id"]
        wait_for(http, "slow", retried, "completed")
        assert http.get("/slow/get", params={"task_id": retried}).text == "cut short"


def test_two_workers_share_the_store_and_results_expire(start_server, tmp_path: Path) -> None:
    env = _env(tmp_path / "state", BENTO_LIKE_TASK_RESULT_TTL_S="4")
    server = start_server("tasks.py:Tasks", cwd=SERVICES, args=["--workers", "2"], env=env)
    by_pid: dict[int, httpx.Client] = {}  # a kept-alive connection stays with the worker that accepted it
    deadline = time.monotonic() + 10
    while len(by_pid) < 2:
        assert time.monotonic() < deadline, "SO_REUSEPORT sent every connection to one worker"
        client = httpx.Client(base_url=server.url, timeout=10)
        pid = client.post("/seen", json={}).json()["pid"]
        if pid in by_pid:
            client.close()
        else:
            by_pid[pid] = client
    a, b = by_pid.values()
    try:
        ids = [submit(a, "repeat", item={"text": str(i)}) for i in range(3)]
        for i, task_id in enumerate(ids):  # the other worker answers for tasks it did not run
            wait_for(b, "repeat", task_id, "completed")
            assert b.get("/repeat/get", params={"task_id": task_id}).text == str(i)

        running = submit(a, "slow", label="cross-running")
        pending = submit(a, "slow", label="cross-pending")
        wait_for(b, "slow", running, "in_progress")
        for task_id in (running, pending):  # canceled through the worker that does not hold them
            assert b.put("/slow/cancel", params={"task_id": task_id}).json()["status"] == "canceled"
        deadline = time.monotonic() + SLOW_S + 5
        while "cross-running" not in a.post("/seen", json={}).json()["slow_runs"]:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        time.sleep(0.3)  # the pending one would have started by now
        assert "cross-pending" not in a.post("/seen", json={}).json()["slow_runs"]
        for task_id in (running, pending):
            assert a.get("/slow/status", params={"task_id": task_id}).json()["status"] == "canceled"
            assert a.get("/slow/get", params={"task_id": task_id}).status_code == 410

        time.sleep(4.5)  # the TTL: every finished task is forgotten, on disk too
        r = b.get("/repeat/get", params={"task_id": ids[0]})
        assert r.status_code == 404 and "forgotten" in r.json()["error"]
        deadline = time.monotonic() + 5
        while any((tmp_path / "state" / "Tasks" / "tasks" / f"{t}.out").exists() for t in [*ids, running, pending]):
            assert time.monotonic() < deadline, "expired results were not removed from disk"
            time.sleep(0.2)
    finally:
        a.close()
        b.close()
