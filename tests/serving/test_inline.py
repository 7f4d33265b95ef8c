"""Short lone sync calls run on the event loop's thread (saving two cross-CPU wake-ups); anything slow, any
batch, or a server told not to, keeps them on instance threads."""

from __future__ import annotations

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


def test_batches_never_run_on_the_loop_thread(start_server) -> None:
    server = start_server("threads.py:Threads", cwd=SERVICES)
    with httpx.Client(base_url=server.url, timeout=10) as client:
        assert {where_batched(client) for _ in range(40)} & {"MainThread"} == set()


def test_inline_can_be_turned_off(start_server) -> None:
    server = start_server("threads.py:Threads", cwd=SERVICES, env={"BENTO_LIKE_INLINE_MS": "0"})
    with httpx.Client(base_url=server.url, timeout=10) as client:
        assert {where(client) for _ in range(40)} & {"MainThread"} == set()
