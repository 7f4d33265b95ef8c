"""The event loop's lag is exported: an async API that blocks the loop shows up in it, and it falls back."""

from __future__ import annotations

import re
import time
from pathlib import Path

import httpx

SERVICES = Path(__file__).parent / "services"


def lag(client: httpx.Client) -> float:
    metrics = client.get("/metrics").text
    found = re.search(r"^bento_like_event_loop_lag_seconds (\S+)$", metrics, re.M)
    assert found, "no bento_like_event_loop_lag_seconds sample in /metrics"
    return float(found.group(1))


def test_a_blocked_event_loop_shows_in_the_lag_gauge(start_server) -> None:
    server = start_server("threads.py:Threads", cwd=SERVICES)
    with httpx.Client(base_url=server.url, timeout=10) as client:
        time.sleep(0.3)  # a few watchdog ticks on an idle loop
        idle = lag(client)
        r = client.post("/blocks_loop", json={"ms": 300})
        assert r.status_code == 200, r.text
        # The watchdog notices at its next tick, which may run after the first scrape: the highest of a few.
        samples = []
        for _ in range(10):
            samples.append(lag(client))
            time.sleep(0.02)
        blocked = max(samples)
        # The tick due during the 300 ms ran ~250 ms late: the moving average moves 0.3 of the way there.
        assert blocked > 0.04 and blocked > 4 * idle, (idle, blocked)
        time.sleep(1.0)  # 20 ticks on time: the average decays by 0.7 each
        assert lag(client) < blocked / 4
