"""Adaptive batching under load, against the model's own ceiling and a hand-written server, in one run.

1. Ceiling: the MLP at batch 64 in a tight loop, in a separate process, with the same torch thread count the
   server's instance gets (``--threads``, default 1). Also a direct unbatched call (batch 1), the floor for a
   lone request's latency.
2. Served: ``pkg serve`` of bench/batching_service.py (batchable, max_batch_size=64, max_latency_ms from
   ``--max-latency-ms``), driven by ``hey`` (Debian package) with 16 and 64 concurrent connections, and at 1
   connection by a socket client timed in microseconds (``--one-client hey`` for hey there too, whose times
   have 0.1 ms resolution), each request one 784-float row as JSON.
3. Hand-written: bench/handwritten.py, the same model behind uvicorn and a bare ASGI function that runs each
   request at once on the event loop (no batching), at 1 and 64 connections.

Shared machines drift by 10-30% within a minute, so at 1 and 64 connections the run is cut into rounds, each
one a ceiling slice, our server, then the hand-written one: every figure a target judges is measured in the
same minute as its baseline. Prints items/s, p50/p99 and non-200 counts, the ratio to the ceiling, and the
targets: at 64 clients at least 0.7 of the ceiling with p99 within max_latency_ms + one batch-64 execution
and no rejections; at 1 client a p50 within a direct call + 1 ms.

    python bench/batching.py [--duration 10] [--rounds 4] [--threads 1] [--max-latency-ms auto] [--one-client socket]

The issue's setting is max_latency_ms 60 on a machine where the MLP's batch of 64 takes 30 ms (AVX-512). Where
a batch of 64 takes longer than half the budget (53-67 ms on 2 AVX2 vCPUs), 64 clients cannot all be answered
within it and some are refused by design. So ``--max-latency-ms auto`` (the default) keeps that ratio: twice
the batch-64 time measured at the start, rounded up to 10 ms (60 on the issue's machine). A number sets it.
``BENCH_SERVER_LOG=FILE`` keeps the server's log (it is discarded otherwise).
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import os
import re
import shutil
import signal
import statistics
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import urlsplit
from typing import Any

import httpx

HERE = Path(__file__).resolve().parent

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


BASELINE = """
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
    print("ready", flush=True)
    for line in sys.stdin:
        seconds = float(line)
        n, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            model(x64)
            n += 1
        elapsed = time.perf_counter() - start
        singles, until = [], time.perf_counter() + seconds / 2
        while time.perf_counter() < until:
            t = time.perf_counter()
            model(x1)
            singles.append(time.perf_counter() - t)
        print(json.dumps({{"items_per_s": n * 64 / elapsed, "batch64_ms": elapsed / n * 1000,
                          "batch1_ms": statistics.median(singles) * 1000}}), flush=True)
"""


class Baseline:
    """The ceiling and the direct call, measured on demand in slices by one long-lived process (the model is
    built once), so that slices can alternate with the served runs they judge."""

    def __init__(self, threads: int) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", BASELINE.format(here=str(HERE), threads=threads)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )
        assert self.proc.stdin and self.proc.stdout
        if self.proc.stdout.readline().strip() != "ready":
            sys.exit("the baseline process failed to start (is torch installed?)")

    def slice(self, seconds: float) -> dict[str, float]:
        """``seconds`` of batch-64 calls, then half as long of batch-1 calls."""
        assert self.proc.stdin and self.proc.stdout
        self.proc.stdin.write(f"{seconds}\n")
        self.proc.stdin.flush()
        return json.loads(self.proc.stdout.readline())

    def close(self) -> None:
        if self.proc.stdin:
            self.proc.stdin.close()
        self.proc.wait(30)


def ceiling(threads: int, seconds: float) -> dict[str, float]:
    """One baseline slice in a fresh process: batch-64 items/s and ms, and the median direct batch-1 call."""
    baseline = Baseline(threads)
    try:
        return baseline.slice(seconds)
    finally:
        baseline.close()


def hey(url: str, body_file: str, connections: int, duration: float) -> dict[str, Any]:
    """Run hey; latencies come from its CSV (0.1 ms resolution, like its summary)."""
    out = subprocess.run(
        ["hey", "-z", f"{duration}s", "-c", str(connections), "-m", "POST", "-T", "application/json", "-D", body_file,
         "-o", "csv", url],
        capture_output=True, text=True, check=True,
    ).stdout
    rows = list(csv.DictReader(io.StringIO(out)))
    ok = [float(r["response-time"]) * 1000 for r in rows if r["status-code"] == "200"]
    took = max((float(r["offset"]) + float(r["response-time"]) for r in rows), default=duration)
    return {"ok_ms": ok, "non200": len(rows) - len(ok), "seconds": took}


def one_client(url: str, body_file: str, duration: float) -> dict[str, Any]:
    """One keep-alive connection sending the same request again as soon as the answer is in, timed with
    perf_counter: microsecond resolution where hey's is 0.1 ms, and less of the client's own time (a bare
    uvicorn app that spins 5 ms: 5.40-5.50 ms p50 from here, 5.6 from hey; answering at once, 0.15-0.18
    against 0.3). Same result shape as ``hey``."""
    parts = urlsplit(url)
    body = Path(body_file).read_bytes()
    request = (f"POST {parts.path or '/'} HTTP/1.1\r\nHost: {parts.netloc}\r\nContent-Type: application/json\r\n"
               f"Content-Length: {len(body)}\r\n\r\n").encode() + body
    ok: list[float] = []
    failed = 0
    with socket.create_connection((parts.hostname, parts.port)) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        buffer = b""
        started = time.perf_counter()
        end = started + duration
        while (sent := time.perf_counter()) < end:
            sock.sendall(request)
            while b"\r\n\r\n" not in buffer:
                buffer += recv(sock)
            head, _, rest = buffer.partition(b"\r\n\r\n")
            lines = head.split(b"\r\n")
            lengths = [int(line.split(b":", 1)[1]) for line in lines[1:] if line.lower().startswith(b"content-length:")]
            if not lengths:
                sys.exit(f"{url} answered without a Content-Length; one_client() reads only those")
            while len(rest) < lengths[0]:
                rest += recv(sock)
            buffer = rest[lengths[0]:]
            if lines[0].split()[1] == b"200":
                ok.append((time.perf_counter() - sent) * 1000)
            else:
                failed += 1
    return {"ok_ms": ok, "non200": failed, "seconds": time.perf_counter() - started}


def recv(sock: socket.socket) -> bytes:
    data = sock.recv(65536)
    if not data:
        sys.exit("the server closed the connection")
    return data


def summarize(runs: list[dict[str, Any]]) -> dict[str, float]:
    """Throughput and latency quantiles over one or more hey runs, pooled."""
    ok = sorted(ms for r in runs for ms in r["ok_ms"])
    seconds = sum(r["seconds"] for r in runs)
    quantile = (lambda q: ok[min(len(ok) - 1, int(q * len(ok)))]) if ok else (lambda q: float("nan"))
    return {"items_per_s": len(ok) / seconds, "p50": quantile(0.50), "p99": quantile(0.99),
            "non200": sum(r["non200"] for r in runs)}


def latency_arg(value: str) -> float | str:
    if value == "auto":
        return value
    try:
        return float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--max-latency-ms takes a number of ms or auto, not {value!r}") from None


def resolve_latency(value: float | str, batch64_ms: float) -> float:
    """``auto``: twice the batch-64 time, rounded up to 10 ms (the issue's 60 ms against a 30 ms batch)."""
    if value != "auto":
        return float(value)
    chosen = max(10.0, 10.0 * math.ceil(2 * batch64_ms / 10))
    print(f"max_latency_ms auto: {chosen:g} (twice the {batch64_ms:.1f} ms batch of 64 measured now)", flush=True)
    return chosen


def wait_ready(proc: subprocess.Popen, url: str, what: str, any_status: bool = False) -> None:
    """Until a GET of ``url`` answers 200 (any status: ``any_status``); exits if ``proc`` ends first."""
    deadline = time.monotonic() + 120
    while True:
        if proc.poll() is not None:
            sys.exit(f"{what} exited with {proc.returncode} before it was ready")
        if time.monotonic() > deadline:
            proc.kill()
            sys.exit(f"{what} was not ready within 120 s")
        try:
            if httpx.get(url).status_code == 200 or any_status:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)


def body_file() -> str:
    """A request body file: one 784-float row."""
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump({"x": [[0.01 * (i % 100) for i in range(784)]]}, f)
    return f.name


def start_mlp_server(threads: int, max_latency_ms: float) -> tuple[subprocess.Popen, str, str]:
    """`pkg serve` of the MLP, ready; returns the process, its URL and a request body file (one 784-float row)."""
    port = free_port()
    env = {**os.environ, "BENTO_LIKE_COMPUTE_THREADS": str(threads), "BENCH_MAX_LATENCY_MS": str(max_latency_ms)}
    log = os.environ.get("BENCH_SERVER_LOG")
    server = subprocess.Popen(
        [sys.executable, "-m", "bento_like", "serve", "batching_service:MLP", "--port", str(port), "--log-level", "warning"],
        cwd=HERE, env=env, stdout=subprocess.DEVNULL, stderr=open(log, "w") if log else subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    wait_ready(server, url + "/readyz", "the server (is bento_like installed?)")
    return server, url, body_file()


def start_handwritten(threads: int) -> tuple[subprocess.Popen, str]:
    """bench/handwritten.py under uvicorn (httptools, uvloop, no access log), ready."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "handwritten:app", "--port", str(port), "--http", "httptools", "--loop",
         "uvloop", "--no-access-log", "--log-level", "warning"],
        cwd=HERE, env={**os.environ, "OMP_NUM_THREADS": str(threads)}, stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    wait_ready(proc, url, "the hand-written server", any_status=True)  # no health route: any answer will do
    return proc, url


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=10.0, help="seconds of load per server and concurrency")
    parser.add_argument("--rounds", type=int, default=4, help="slices at 1 and 64 connections, each with a baseline")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--max-latency-ms", type=latency_arg, default="auto", help="a number of ms, or auto")
    parser.add_argument("--connections", default="1,16,64")
    parser.add_argument("--one-client", choices=("socket", "hey"), default="socket",
                        help="what drives 1 connection: a timed socket (default; microseconds) or hey (0.1 ms)")
    args = parser.parse_args()
    if shutil.which("hey") is None:
        sys.exit("needs hey: apt-get install hey")

    baseline = Baseline(args.threads)
    first = baseline.slice(min(args.duration, 4.0))
    args.max_latency_ms = resolve_latency(args.max_latency_ms, first["batch64_ms"])
    server, url, body = start_mlp_server(args.threads, args.max_latency_ms)
    hand, hand_url = start_handwritten(args.threads)
    ours: dict[int, dict[str, float]] = {}
    theirs: dict[int, dict[str, float]] = {}
    near: dict[int, dict[str, float]] = {}
    try:
        for c in [int(c) for c in args.connections.split(",")]:
            judged = c in (1, 64)
            if c == 1 and args.one_client == "socket":
                drive = lambda target, body, c, seconds: one_client(target, body, seconds)  # noqa: E731
            else:
                drive = hey
            drive(url + "/predict", body, c, 2.0)  # warm-up at this concurrency
            if not judged:
                ours[c] = summarize([drive(url + "/predict", body, c, args.duration)])
                continue
            drive(hand_url, body, c, 2.0)
            slice_s = args.duration / args.rounds
            mine, hand_runs, slices = [], [], []
            for _ in range(args.rounds):
                slices.append(baseline.slice(min(slice_s, 3.0)))
                mine.append(drive(url + "/predict", body, c, slice_s))
                hand_runs.append(drive(hand_url, body, c, slice_s))
            slices.append(baseline.slice(min(slice_s, 3.0)))
            ours[c], theirs[c] = summarize(mine), summarize(hand_runs)
            near[c] = {k: statistics.mean(s[k] for s in slices) for k in slices[0]}
        metrics = httpx.get(url + "/metrics").text
    finally:
        server.send_signal(signal.SIGTERM)
        hand.send_signal(signal.SIGTERM)
        server.wait(60)
        hand.wait(60)
        baseline.close()
    batches = re.search(r'bento_like_batch_size_count\{api="predict"\} (\d+)', metrics)
    items = re.search(r'bento_like_batch_size_sum\{api="predict"\} ([\d.]+)', metrics)
    ceil = near.get(64) or first
    print(f"cpus={os.cpu_count()} torch_threads={args.threads} max_latency_ms={args.max_latency_ms:g} "
          f"duration={args.duration:g}s rounds={args.rounds}")
    print(f"ceiling (batch 64 tight loop): {ceil['items_per_s']:.0f} items/s, {ceil['batch64_ms']:.1f} ms per batch; "
          f"direct batch-1 call: {(near.get(1) or first)['batch1_ms']:.2f} ms (means of the slices)")
    if ceil["batch64_ms"] > args.max_latency_ms / 2:
        print(f"note: a batch of 64 takes {ceil['batch64_ms']:.0f} ms here, over half of max_latency_ms; 64 clients "
              f"cannot all be answered within it (--max-latency-ms auto keeps the issue's ratio)")
    print(f"{'server':>12} {'clients':>7} {'items/s':>9} {'vs ceiling':>10} {'p50 ms':>8} {'p99 ms':>8} {'non-200':>8}")
    for c, r in ours.items():
        rows = [("bento_like", r)] + ([("hand-written", theirs[c])] if c in theirs else [])
        for name, row in rows:
            ref = (near.get(c) or ceil)["items_per_s"]
            print(f"{name:>12} {c:>7} {row['items_per_s']:>9.0f} {row['items_per_s'] / ref:>10.2f} {row['p50']:>8.2f} "
                  f"{row['p99']:>8.2f} {row['non200']:>8}")
    if batches and items:
        print(f"mean batch size over the run: {float(items.group(1)) / int(batches.group(1)):.1f}")
    if 64 in ours:
        r, ref = ours[64], near[64]
        bound = args.max_latency_ms + ref["batch64_ms"]
        print(f"target 64 clients: >= 0.70 of the ceiling measured in the same rounds ({ref['items_per_s']:.0f} items/s) "
              f"-> {r['items_per_s'] / ref['items_per_s']:.3f} (hand-written: {theirs[64]['items_per_s'] / ref['items_per_s']:.3f}); "
              f"p99 <= {bound:.1f} ms -> {r['p99']:.1f}; rejections 0 -> {r['non200']}")
    if 1 in ours:
        direct = near[1]["batch1_ms"]
        print(f"target 1 client ({args.one_client}): p50 <= direct batch-1 call measured in the same rounds ({direct:.2f} ms) + 1 ms = "
              f"{direct + 1:.2f} ms -> {ours[1]['p50']:.2f} (hand-written: {theirs[1]['p50']:.2f})")


if __name__ == "__main__":
    main()
