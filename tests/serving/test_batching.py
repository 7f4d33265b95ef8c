"""The adaptive batcher through a real server: batch formation, splitting, order, lone requests, overload,
deadlines, disconnects and failure isolation."""

from __future__ import annotations

import asyncio
import importlib.util
import statistics
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from bento_like.sdk.service import get_spec
from bento_like.serving.app import ServerState, ServeOptions
from bento_like.serving.batching import Batcher, LatencyModel

SERVICES = Path(__file__).parent / "services"
pytestmark = pytest.mark.usefixtures("frozen_heap")  # several tests bound request times measured from here


async def post_many(url: str, bodies: list[dict], headers: dict | None = None) -> list[httpx.Response]:
    async with httpx.AsyncClient(base_url=url, timeout=30, limits=httpx.Limits(max_connections=200)) as client:
        return await asyncio.gather(*(client.post("/double", json=b, headers=headers) for b in bodies))


def seen(url: str, reset: bool = True) -> list[list[float]]:
    return httpx.post(url + "/batches_seen", json={"reset": reset}).json()


def test_concurrent_requests_form_batches_and_get_their_own_rows_back(start_server) -> None:
    server = start_server("batched.py:Batched", cwd=SERVICES)
    seen(server.url)  # forget the warm-up batches
    bodies = [{"x": [[float(i), float(i) + 0.5]]} for i in range(40)]
    responses = asyncio.run(post_many(server.url, bodies))
    assert [r.status_code for r in responses] == [200] * 40
    for i, r in enumerate(responses):
        assert r.json() == [[2.0 * i, 2.0 * i + 1.0]]
    batches = seen(server.url)
    sizes = [len(b) for b in batches]
    assert sum(sizes) == 40 and max(sizes) <= 8
    assert max(sizes) == 8, f"40 concurrent requests never filled a batch of 8: {sizes}"
    assert len(batches) <= 10
    metrics = httpx.get(server.url + "/metrics").text
    assert 'bento_like_batch_size_bucket{api="double",le="8"}' in metrics
    assert "bento_like_queue_wait_seconds_count" in metrics and "bento_like_batch_execution_seconds_sum" in metrics


def test_closed_loop_clients_keep_making_full_batches_on_one_thread(start_server) -> None:
    # 16 clients that each send again as soon as they are answered: after a batch of 8 ends, the dispatcher
    # waits (within the budget) for its 8 clients to come back instead of running the first few alone.
    server = start_server("batched.py:Batched", cwd=SERVICES, env={"BATCH_DELAY": "0.03"})

    async def clients() -> None:
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
            stop = time.perf_counter() + 1.5

            async def loop(i: int) -> None:
                while time.perf_counter() < stop:
                    r = await client.post("/double", json={"x": [[i, i]]})
                    assert r.status_code == 200 and r.json() == [[2 * i, 2 * i]]

            await asyncio.gather(*(loop(i) for i in range(16)))

    seen(server.url)
    asyncio.run(clients())
    sizes = [len(b) for b in seen(server.url)]
    assert len(sizes) >= 10 and sum(s == 8 for s in sizes) >= 0.8 * len(sizes), sizes
    threads = httpx.post(server.url + "/batch_threads", json={}).json()
    assert len(threads) == 1 and "-batch-" in threads[0], threads


def test_request_larger_than_max_batch_is_split_and_reassembled_in_order(start_server) -> None:
    server = start_server("batched.py:Batched", cwd=SERVICES)
    seen(server.url)
    x = np.arange(40, dtype=np.float32).reshape(20, 2)
    r = httpx.post(server.url + "/double", json={"x": x.tolist()}, timeout=30)
    assert r.status_code == 200
    np.testing.assert_array_equal(np.asarray(r.json()), x * 2)
    assert sorted(len(b) for b in seen(server.url)) == [4, 8, 8]


def test_a_lone_request_is_not_held_back_for_a_batch(start_server) -> None:
    # With max_latency_ms=1000, a dispatcher that waited for company would add up to a second.
    server = start_server("batched.py:Batched", cwd=SERVICES)
    with httpx.Client(base_url=server.url, timeout=30) as client:
        def timed(path: str) -> float:
            started = time.perf_counter()
            assert client.post(path, json={"x": [[1, 2]]}).status_code == 200
            return time.perf_counter() - started

        for _ in range(3):
            timed("/double")
        batched = statistics.median(timed("/double") for _ in range(15))
        direct = statistics.median(timed("/double_direct") for _ in range(15))
    assert batched < direct + 0.02, f"lone batched request {batched * 1000:.1f} ms vs direct {direct * 1000:.1f} ms"


def test_full_queue_answers_429_with_retry_after_at_once(start_server) -> None:
    server = start_server("batched.py:Batched", cwd=SERVICES, env={"MAX_QUEUE": "4", "BATCH_DELAY": "0.3"})
    started = time.perf_counter()
    responses = asyncio.run(post_many(server.url, [{"x": [[1, 1]]} for _ in range(30)]))
    codes = [r.status_code for r in responses]
    assert set(codes) == {200, 429}, codes
    assert codes.count(200) >= 4
    refused = [r for r in responses if r.status_code == 429]
    assert all(int(r.headers["retry-after"]) >= 1 for r in refused)
    assert "max_queue" in refused[0].json()["error"]
    assert time.perf_counter() - started < 10
    assert 'reason="queue_full"' in httpx.get(server.url + "/metrics").text


def test_expired_deadline_is_504_and_never_reaches_the_model(start_server) -> None:
    server = start_server("batched.py:Batched", cwd=SERVICES, env={"BATCH_DELAY": "0.5", "MAX_LATENCY_MS": "5000"})
    seen(server.url)

    async def scenario() -> tuple[httpx.Response, httpx.Response]:
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
            busy = asyncio.create_task(client.post("/double", json={"x": [[7] * 2] * 8}))  # a full batch: 0.5 s
            await asyncio.sleep(0.1)
            late = await client.post("/double", json={"x": [[9, 9]]}, headers={"X-Request-Timeout": "0.2"})
            return await busy, late

    busy, late = asyncio.run(scenario())
    assert busy.status_code == 200
    assert late.status_code == 504
    assert "deadline" in late.json()["error"]
    time.sleep(0.6)
    assert all(9.0 not in batch for batch in seen(server.url)), "the expired request still ran"
    bad = httpx.post(server.url + "/double", json={"x": [[1, 1]]}, headers={"X-Request-Timeout": "soon"})
    assert bad.status_code == 400 and "X-Request-Timeout" in bad.json()["error"]


def test_client_that_disconnects_is_removed_from_the_queue(start_server) -> None:
    server = start_server("batched.py:Batched", cwd=SERVICES, env={"BATCH_DELAY": "0.5", "MAX_LATENCY_MS": "5000"})
    seen(server.url)

    async def scenario() -> None:
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
            busy = asyncio.create_task(client.post("/double", json={"x": [[7] * 2] * 8}))
            await asyncio.sleep(0.1)
            with pytest.raises(httpx.TimeoutException):
                await client.post("/double", json={"x": [[5, 5]]}, timeout=0.15)
            await busy

    asyncio.run(scenario())
    time.sleep(0.7)
    assert all(5.0 not in batch for batch in seen(server.url)), "the abandoned request still ran"
    assert 'bento_like_rejections_total{api="double",reason="disconnected"} 1' in httpx.get(server.url + "/metrics").text


def test_slow_direct_calls_run_side_by_side_and_an_abandoned_one_never_runs(start_server) -> None:
    """Not batched: four calls take the instance's four threads (one each, none queued behind another), the
    fifth waits for a thread and its client leaves."""
    server = start_server("batched.py:Batched", cwd=SERVICES, env={"BATCH_DELAY": "0.6"})

    async def scenario() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
            busy = [asyncio.create_task(client.post("/double_direct", json={"x": [[i, 0]]})) for i in (1, 2, 3, 4)]
            await asyncio.sleep(0.15)
            with pytest.raises(httpx.TimeoutException):
                await client.post("/double_direct", json={"x": [[5, 5]]}, timeout=0.2)
            return list(await asyncio.gather(*busy))

    assert [r.status_code for r in asyncio.run(scenario())] == [200] * 4
    time.sleep(0.8)  # long enough for the abandoned call to have run, had it been kept
    ran = httpx.post(server.url + "/direct_seen").json()[1:]  # after the warm-up call
    assert sorted(x for x, _ in ran) == [1, 2, 3, 4]
    assert len({thread for _, thread in ran}) == 4
    assert 'bento_like_rejections_total{api="double_direct",reason="disconnected"} 1' in httpx.get(
        server.url + "/metrics"
    ).text


def test_a_failing_item_fails_alone(start_server) -> None:
    server = start_server("batched.py:Batched", cwd=SERVICES)
    bodies = [{"x": [[float(i), 0]]} for i in range(12)]
    bodies[5] = {"x": [[-1, -1]]}
    responses = asyncio.run(post_many(server.url, bodies))
    codes = [r.status_code for r in responses]
    assert codes[5] == 500 and "error_id" in responses[5].json()
    assert codes[:5] + codes[6:] == [200] * 11
    assert responses[7].json() == [[14.0, 0.0]]


def test_a_burst_is_served_up_to_what_fits_the_latency_budget_and_the_rest_refused_fast(start_server) -> None:
    # 0.1 s per batch of 8, budget 0.35 s: about three batches of a 48-request burst fit, the rest cannot.
    server = start_server("batched.py:Batched", cwd=SERVICES, env={"BATCH_DELAY": "0.1", "MAX_LATENCY_MS": "350"})

    async def timed_post(client: httpx.AsyncClient, i: int) -> tuple[int, float]:
        started = time.perf_counter()
        r = await client.post("/double", json={"x": [[i, i]]})
        return r.status_code, time.perf_counter() - started

    async def burst() -> list[tuple[int, float]]:
        async with httpx.AsyncClient(base_url=server.url, timeout=30, limits=httpx.Limits(max_connections=100)) as c:
            return await asyncio.gather(*(timed_post(c, i) for i in range(48)))

    results = asyncio.run(burst())
    served = [t for code, t in results if code == 200]
    refused = [t for code, t in results if code == 429]
    assert len(served) + len(refused) == 48
    assert 16 <= len(served) <= 40, f"served {len(served)} of a burst of 48"
    assert max(served) < 0.35 + 0.1 + 0.25  # the budget plus one batch, plus HTTP on a shared machine
    assert 'reason="latency"' in httpx.get(server.url + "/metrics").text


def test_under_sustained_overload_batches_run_back_to_back_one_at_a_time_with_the_right_rows(start_server) -> None:
    """Past capacity the next batch is handed to the instance's thread before the running one ends: still one
    batch at a time on one thread, every accepted row answered with its own result, the rest refused."""
    server = start_server("batched.py:Batched", cwd=SERVICES, env={"BATCH_DELAY": "0.04", "MAX_LATENCY_MS": "150"},
                          args=["--log-level", "debug"])
    seen(server.url)  # drop the warm-up's batches

    async def stream() -> list[tuple[float, httpx.Response]]:
        async with httpx.AsyncClient(base_url=server.url, timeout=30, limits=httpx.Limits(max_connections=400)) as c:
            tasks = []
            for i in range(400):  # 400/s for 1 s against a capacity of 8 / 40 ms = 200/s
                tasks.append(asyncio.create_task(c.post("/double", json={"x": [[i, -i - 2]]})))
                await asyncio.sleep(0.0025)
            return list(zip(range(400), await asyncio.gather(*tasks)))

    results = asyncio.run(stream())
    codes = [r.status_code for _, r in results]
    assert set(codes) == {200, 429}, set(codes)
    ok = [(i, r) for i, r in results if r.status_code == 200]
    assert len(ok) >= 100, len(ok)
    for i, r in ok:
        assert r.json() == [[2 * i, 2 * (-i - 2)]]
    assert sum(len(b) for b in seen(server.url)) == len(ok)  # each accepted row ran exactly once
    assert httpx.post(server.url + "/batch_overlaps", json={}).json() == 0
    assert len(httpx.post(server.url + "/batch_threads", json={}).json()) == 1
    assert "handed on before the running one ended" in server.log()  # the early hand-off did happen


def test_batches_are_cut_to_fit_the_budget_when_a_full_batch_is_too_slow(start_server) -> None:
    # 25 ms per item: a full batch of 8 takes 200 ms, over a 120 ms budget, so batches of about 4 are cut.
    server = start_server(
        "batched.py:Batched", cwd=SERVICES, env={"BATCH_DELAY": "0", "ITEM_DELAY": "0.025", "MAX_LATENCY_MS": "120"}
    )
    seen(server.url)
    responses = asyncio.run(post_many(server.url, [{"x": [[i, i]]} for i in range(8)]))
    assert all(r.status_code in (200, 429) for r in responses)
    sizes = [len(b) for b in seen(server.url)]
    assert sizes and max(sizes) <= 5, sizes


def test_an_api_kept_busy_does_not_starve_another_on_the_same_instance(start_server) -> None:
    # 40 closed-loop clients keep /double's queue full for 2 s (50 ms batches of 8). Its dispatcher runs the
    # next full batch on the instance as soon as one ends, but not while another API waits for the instance:
    # each /negate request gets its turn within a batch or two instead of after the flood.
    server = start_server("batched.py:TwoBatched", cwd=SERVICES)

    async def scenario() -> tuple[list[int], list[float]]:
        async with httpx.AsyncClient(base_url=server.url, timeout=30, limits=httpx.Limits(max_connections=64)) as c:
            stop = time.perf_counter() + 2.0
            codes: list[int] = []

            async def flood() -> None:
                while time.perf_counter() < stop:
                    codes.append((await c.post("/double", json={"x": [[1, 1]]})).status_code)

            async def other() -> list[float]:
                await asyncio.sleep(0.5)  # the flood is under way
                took = []
                for i in range(4):
                    started = time.perf_counter()
                    r = await c.post("/negate", json={"x": [[i, i]]})
                    assert r.status_code == 200 and r.json() == [[-i, -i]]
                    took.append(time.perf_counter() - started)
                return took

            results = await asyncio.gather(other(), *(flood() for _ in range(40)))
            return codes, results[0]

    codes, took = asyncio.run(scenario())
    assert codes.count(200) >= 100, f"the flood itself was not served: {len(codes)} requests"
    assert max(took) < 0.6, f"/negate waited {max(took):.2f} s behind /double's flood"


def _batched_double():  # type: ignore[no-untyped-def]
    module_spec = importlib.util.spec_from_file_location("batched_service", SERVICES / "batched.py")
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    spec = get_spec(module.Batched)
    return spec, next(e.config for e in spec.apis if e.attr == "double")


SPEC, CONFIG = _batched_double()


def learned_batcher(*observed: tuple[int, float]) -> Batcher:
    """A batcher of Batched.double (built in a running loop) whose latency model has seen these executions."""
    batcher = Batcher(ServerState(SPEC, ServeOptions()), "double", CONFIG, False, 64)
    for size, seconds in observed:
        batcher.model.observe(size, seconds)
    return batcher


def test_predicted_wait_counts_the_items_that_will_join_the_batch_before_it_runs() -> None:
    # Under steady traffic a request's batch is filled up to the cap by later arrivals before an instance is
    # free for it, and a full batch takes longer than the part of it queued now.
    async def check() -> None:
        batcher = learned_batcher((1, 0.010), (8, 0.050))
        batcher.queued_items = 2
        assert batcher.predicted_wait(1) == pytest.approx(batcher.model.predict(3))  # nothing else arriving
        now = time.monotonic()  # the batcher's clock
        batcher.rate.add(400, now)  # 1600 items/s
        batcher.busy, batcher._finishing = 1, {0: now + 0.04}  # the one instance runs a batch for 40 ms more
        assert batcher.predicted_wait(1) == pytest.approx(0.050, rel=0.01)  # its batch will be full
        batcher.queued_items = 10  # a full batch ahead, then its own (full too)
        assert batcher.predicted_wait(1) == pytest.approx(0.100, rel=0.01)

    asyncio.run(check())


def test_a_burst_that_ended_is_not_waited_for_as_if_the_stream_went_on() -> None:
    # 16 closed-loop clients: after each batch their 16 requests come back 50 us apart, then nothing until
    # that batch ends. Once all are in, the batch must go (it used to wait 2 / rate = 2.5 ms more).
    async def check() -> None:
        batcher = learned_batcher((1, 0.003), (8, 0.010))
        batcher.max_batch = 64
        t = time.monotonic() - 1.0
        for cycle in range(61):  # cycles of a batch of 16 ending, then the 16 coming back
            if cycle:
                t += 0.012  # the batch runs
            batcher.last_done, batcher._returning = t, 16
            for i in range(16):
                t += 0.0015 if i == 0 else 0.00005
                batcher.learn_arrival(1, t)
        assert 700 < batcher.rate.get(t) < 1300  # the mean rate: 16 items per ~14 ms cycle
        assert batcher.gap == pytest.approx(0.00005, rel=0.2)
        assert batcher.wait_time(16, waited=0.0023, now=t + 0.0003) == 0.0  # over: flush
        assert batcher.wait_time(16, waited=0.0023, now=t) > 0.0  # just arrived: a moment for the next one
        batcher._returning = 4  # 4 have not come back yet: wait for them
        assert batcher.wait_time(12, waited=0.0023, now=t + 0.0003) > 0.0

    asyncio.run(check())


def test_batch_dim_is_required_on_batched_inputs(start_server) -> None:
    server = start_server("batched.py:Batched", cwd=SERVICES)
    r = httpx.post(server.url + "/double", json={"x": [1, 2]})
    assert r.status_code == 422 and r.json()["field"] == "$.x"


def test_latency_model_interpolates_and_extrapolates() -> None:
    model = LatencyModel()
    assert model.predict(8) == 0.0
    model.observe(1, 0.004)
    model.observe(64, 0.030)
    assert model.predict(1) == pytest.approx(0.004)
    assert 0.004 < model.predict(32) < 0.030
    assert model.predict(128) > 0.030
    assert model.largest_within(0.030, 64) == 64
    assert model.largest_within(0.017, 64) == pytest.approx(32, abs=1)
    assert model.largest_within(0.001, 64) == 1


def test_latency_model_carries_a_slowdown_seen_at_one_size_to_all_sizes_and_back() -> None:
    model = LatencyModel()
    model.observe(1, 0.004)  # the warm-up: quiet machine
    model.observe(16, 0.010)
    model.observe(64, 0.030)
    assert model.largest_within(0.040, 64) == 64
    for _ in range(30):  # under load only batches of 16 run, twice as slow as alone
        model.observe(16, 0.020)
    assert model.predict(16) == pytest.approx(0.020, rel=0.02)
    assert model.factor > 1.6  # the rest went into the shape of 16, slowly
    assert model.predict(64) > 0.050  # never observed under load, still predicted slow
    assert model.predict(1) > 0.0065
    assert model.largest_within(0.040, 64) < 64
    for _ in range(30):  # the load went away
        model.observe(16, 0.010)
    assert model.predict(16) == pytest.approx(0.010, rel=0.02)
    assert model.largest_within(0.040, 64) == 64


def test_one_outlier_moves_the_latency_model_a_bounded_step() -> None:
    model = LatencyModel()
    model.observe(8, 0.010)
    model.observe(8, 1.0)  # a 100x pause of the whole process
    assert model.factor == pytest.approx(1 + 0.2 * (4 - 1))
    assert model.predict(8) < 0.02


def test_a_size_whose_warm_up_ran_slow_does_not_make_the_others_look_fast() -> None:
    model = LatencyModel()
    model.observe(1, 0.1)
    model.observe(4, 0.1)
    model.observe(8, 0.2)  # its warm-up ran on a busy machine
    for _ in range(10):
        model.observe(8, 0.1)
    assert model.factor == pytest.approx(1.0)
    assert model.predict(4) == pytest.approx(0.1)  # the shared factor did not fall to 0.5
    assert model.predict(8) < 0.17  # its own shape comes down, slowly: too slow errs on the safe side
    for _ in range(50):
        model.observe(8, 0.1)
    assert model.predict(8) == pytest.approx(0.1, rel=0.1)
