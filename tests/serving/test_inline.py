"""Short lone sync calls and lone short batches run on the event loop's thread (saving two cross-CPU wake-ups);
anything slow, batches formed under concurrency, or a server told not to, keep them on instance threads."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx

SERVICES = Path(__file__).parent / "services"


def where(client: httpx.Client, sleep_ms: float = 0.0) -> str:
    r = client.post("/where", json={"sleep_ms": sleep_ms})
    assert r.status_code == 200, r.text
    return r.text  # a str result is sent as text/plain


def where_batched(client: httpx.Client, sleep_ms: float = 0.0) -> str:
    r = client.post("/where_batched", json={"x": [[sleep_ms]]})
    assert r.status_code == 200, r.text
    return r.json()[0]


def test_fast_sync_api_goes_inline_until_one_call_is_slow(start_server) -> None:
    server = start_server("threads.py:Threads", cwd=SERVICES)
    with httpx.Client(base_url=server.url, timeout=10) as client:
        first = [where(client) for _ in range(32)]
        assert "MainThread" not in first, "inline only after calls were seen to be fast"
        assert where(client) == "MainThread"
        assert where(client, sleep_ms=5) == "MainThread"  # not known to be slow until it ran
        later = {where(client) for _ in range(40)}
        assert "MainThread" not in later, "one slow call turns inlining off for good"


def test_a_lone_batch_runs_inline_until_one_is_slow(start_server) -> None:
    server = start_server("threads.py:Threads", cwd=SERVICES)
    with httpx.Client(base_url=server.url, timeout=10) as client:
        assert {where_batched(client) for _ in range(10)} == {"MainThread"}
        assert where_batched(client, sleep_ms=50) == "MainThread"  # not known to be slow until it ran
        later = {where_batched(client) for _ in range(10)}
        assert len(later) == 1 and "batch" in later.pop(), "one slow batch turns inlining off for good"


def test_batches_formed_under_concurrency_run_on_the_instance_thread(start_server) -> None:
    server = start_server("threads.py:Threads", cwd=SERVICES)

    async def flood() -> list[str]:
        async with httpx.AsyncClient(base_url=server.url, timeout=10) as client:

            async def one() -> str:
                r = await client.post("/where_batched", json={"x": [[2.0]]})  # 2 ms: short enough to inline
                assert r.status_code == 200, r.text
                return r.json()[0]

            return list(await asyncio.gather(*(one() for _ in range(48))))

    threads = asyncio.run(flood())
    batch_threads = [t for t in threads if "batch" in t]
    # Only a request that finds no other in progress (a burst's first) may run inline. Without that rule (only
    # "nothing queued") the loop runs the first requests it reads inline one by one while the rest of the burst
    # waits unread: 7 of 48 here.
    assert len(batch_threads) >= 46, threads


def test_inline_can_be_turned_off(start_server) -> None:
    server = start_server("threads.py:Threads", cwd=SERVICES, env={"BENTO_LIKE_INLINE_MS": "0"})
    with httpx.Client(base_url=server.url, timeout=10) as client:
        assert {where(client) for _ in range(40)} & {"MainThread"} == set()
        assert {where_batched(client) for _ in range(20)} & {"MainThread"} == set()
