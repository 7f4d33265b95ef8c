"""Adaptive batching under load, against the model's own ceiling, measured in one run.

1. Ceiling: the MLP at batch 64 in a tight loop, in a fresh process, with the same torch thread count the
   server's instance gets (``--threads``, default 1). Also a direct unbatched call (batch 1), the floor for a
   lone request's latency.
2. Served: ``pkg serve`` of bench/batching_service.py (batchable, max_batch_size=64, max_latency_ms from
   ``--max-latency-ms``), driven by ``hey`` (Debian package) with 1, 16 and 64 concurrent connections, each
   request one 784-float row as JSON.

Prints items/s, p50/p99 and non-200 counts, the ratio to the ceiling, and the targets: at 64 clients at least
0.7 of the ceiling with p99 within max_latency_ms + one batch-64 execution and no rejections; at 1 client a
p50 within a direct call + 1 ms. Shared machines drift by 10-20% within a minute, so each target is judged
against the ceiling and direct call measured again right before and after the run it judges (averaged).

    python bench/batching.py [--duration 10] [--threads 1] [--max-latency-ms auto]

The issue's setting is max_latency_ms 60 on a machine where the MLP's batch of 64 takes 30 ms (AVX-512). Where
a batch of 64 takes longer than half the budget (53-67 ms on 2 AVX2 vCPUs), 64 clients cannot all be answered
within it and some are refused by design. So ``--max-latency-ms auto`` (the default) keeps that ratio: twice
the batch-64 time measured at the start, to the nearest 10 ms (60 on the issue's machine). A number sets it.
``BENCH_SERVER_LOG=FILE`` keeps the server's log (it is discarded otherwise).
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

HERE = Path(__file__).resolve().parent

CEILING = """
import json, statistics, sys, time
import torch
sys.path.insert(0, {here!r})
from batching_service import build_mlp
torch.set_num_threads({threads})
model = build_mlp()
x64, x1 = torch.randn(64, 784), torch.randn(1, 784)
with torch.inference_mode():
    for _ in range(10):
        model(x64)
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < {seconds}:
        model(x64)
        n += 1
    elapsed = time.perf_counter() - start
    singles = []
    for _ in range(300):
        t = time.perf_counter()
        model(x1)
        singles.append(time.perf_counter() - t)
print(json.dumps({{"items_per_s": n * 64 / elapsed, "batch64_ms": elapsed / n * 1000,
                  "batch1_ms": statistics.median(singles) * 1000}}))
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ceiling(threads: int, seconds: float) -> dict[str, float]:
    out = subprocess.run(
        [sys.executable, "-c", CEILING.format(here=str(HERE), threads=threads, seconds=seconds)],
        capture_output=True, text=True, check=True,
    ).stdout
    return json.loads(out.strip().splitlines()[-1])


def hey(url: str, body_file: str, connections: int, duration: float) -> dict[str, float]:
    """Run hey; latencies come from its CSV (microsecond resolution; its summary rounds to 0.1 ms)."""
    out = subprocess.run(
        ["hey", "-z", f"{duration}s", "-c", str(connections), "-m", "POST", "-T", "application/json", "-D", body_file,
         "-o", "csv", url],
        capture_output=True, text=True, check=True,
    ).stdout
    rows = list(csv.DictReader(io.StringIO(out)))
    ok = sorted(float(r["response-time"]) for r in rows if r["status-code"] == "200")
    took = max((float(r["offset"]) + float(r["response-time"]) for r in rows), default=duration)
    quantile = (lambda q: ok[min(len(ok) - 1, int(q * len(ok)))] * 1000) if ok else (lambda q: float("nan"))
    return {"items_per_s": len(ok) / took, "p50": quantile(0.50), "p99": quantile(0.99), "non200": len(rows) - len(ok)}


def latency_arg(value: str) -> float | str:
    if value == "auto":
        return value
    try:
        return float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--max-latency-ms takes a number of ms or auto, not {value!r}") from None


def resolve_latency(value: float | str, batch64_ms: float) -> float:
    """``auto``: twice the batch-64 time, to the nearest 10 ms (the issue's 60 ms against a 30 ms batch)."""
    if value != "auto":
        return float(value)
    chosen = max(10.0, 10.0 * int(2 * batch64_ms / 10 + 0.5))
    print(f"max_latency_ms auto: {chosen:g} (twice the {batch64_ms:.1f} ms batch of 64 measured now)", flush=True)
    return chosen


def start_mlp_server(threads: int, max_latency_ms: float) -> tuple[subprocess.Popen, str, str]:
    """`pkg serve` of the MLP, ready; returns the process, its URL and a request body file (one 784-float row)."""
    port = free_port()
    env = {**os.environ, "BENTO_LIKE_COMPUTE_THREADS": str(threads), "BENCH_MAX_LATENCY_MS": str(max_latency_ms)}
    server = subprocess.Popen(
        [sys.executable, "-m", "bento_like", "serve", "batching_service:MLP", "--port", str(port), "--log-level", "warning"],
        cwd=HERE, env=env, stdout=subprocess.DEVNULL, stderr=open(os.environ["BENCH_SERVER_LOG"], "w") if os.environ.get("BENCH_SERVER_LOG") else subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        if server.poll() is not None:
            sys.exit(f"the server exited with {server.returncode} before it was ready (is bento_like installed?)")
        if time.monotonic() > deadline:
            server.kill()
            sys.exit("the server was not ready within 120 s")
        try:
            if httpx.get(url + "/readyz").status_code == 200:
                break
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump({"x": [[0.01 * (i % 100) for i in range(784)]]}, f)
    return server, url, f.name


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--max-latency-ms", type=latency_arg, default="auto", help="a number of ms, or auto")
    parser.add_argument("--connections", default="1,16,64")
    args = parser.parse_args()
    if shutil.which("hey") is None:
        sys.exit("needs hey: apt-get install hey")

    ceil = ceiling(args.threads, min(args.duration, 8.0))
    args.max_latency_ms = resolve_latency(args.max_latency_ms, ceil["batch64_ms"])
    server, url, body = start_mlp_server(args.threads, args.max_latency_ms)
    rows = []
    around: dict[int, dict[str, float]] = {}
    try:
        for c in [int(c) for c in args.connections.split(",")]:
            hey(url + "/predict", body, c, 2.0)  # warm-up at this concurrency
            # The baselines again, right before and after the run they judge: a shared machine drifts.
            if c in (1, 64):
                before = ceiling(args.threads, 3.0)
            rows.append((c, hey(url + "/predict", body, c, args.duration)))
            if c in (1, 64):
                after = ceiling(args.threads, 3.0)
                around[c] = {k: (before[k] + after[k]) / 2 for k in before}
        metrics = httpx.get(url + "/metrics").text
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(60)
    batches = re.search(r'bento_like_batch_size_count\{api="predict"\} (\d+)', metrics)
    items = re.search(r'bento_like_batch_size_sum\{api="predict"\} ([\d.]+)', metrics)
    print(f"cpus={os.cpu_count()} torch_threads={args.threads} max_latency_ms={args.max_latency_ms:g} duration={args.duration:g}s")
    print(f"ceiling (batch 64 tight loop): {ceil['items_per_s']:.0f} items/s, {ceil['batch64_ms']:.1f} ms per batch; "
          f"direct batch-1 call: {ceil['batch1_ms']:.2f} ms")
    if ceil["batch64_ms"] > args.max_latency_ms / 2:
        print(f"note: a batch of 64 takes {ceil['batch64_ms']:.0f} ms here, over half of max_latency_ms; 64 clients "
              f"cannot all be answered within it (--max-latency-ms auto keeps the issue's ratio)")
    print(f"{'clients':>7} {'items/s':>9} {'vs ceiling':>10} {'p50 ms':>8} {'p99 ms':>8} {'non-200':>8}")
    for c, r in rows:
        print(f"{c:>7} {r['items_per_s']:>9.0f} {r['items_per_s'] / ceil['items_per_s']:>10.2f} {r['p50']:>8.2f} {r['p99']:>8.2f} {r['non200']:>8}")
    if batches and items:
        print(f"mean batch size over the run: {float(items.group(1)) / int(batches.group(1)):.1f}")
    by_c = dict(rows)
    if 64 in by_c:
        r, near = by_c[64], around[64]
        bound = args.max_latency_ms + near["batch64_ms"]
        print(f"target 64 clients: >= 0.70 of the ceiling measured around the run ({near['items_per_s']:.0f} items/s) "
              f"-> {r['items_per_s'] / near['items_per_s']:.3f}; p99 <= {bound:.1f} ms -> {r['p99']:.1f}; "
              f"rejections 0 -> {r['non200']}")
    if 1 in by_c:
        direct = around[1]["batch1_ms"]
        print(f"target 1 client: p50 <= direct batch-1 call measured around the run ({direct:.2f} ms) + 1 ms = "
              f"{direct + 1:.2f} ms -> {by_c[1]['p50']:.2f}")


if __name__ == "__main__":
    main()
