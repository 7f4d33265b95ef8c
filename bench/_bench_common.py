"""What bench/batching.py (and through it bench/overload.py) is made of: the baseline process that measures
the MLP's ceiling, the load generators (``hey``, and a socket client for one connection), and starting the
servers (``pkg serve`` of bench/batching_service.py, and bench/handwritten.py under uvicorn)."""

from __future__ import annotations

import argparse
import atexit
import csv
import functools
import io
import json
import math
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx

HERE = Path(__file__).resolve().parent

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
        seconds, single_seconds = map(float, line.split())
        n, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            model(x64)
            n += 1
        elapsed = time.perf_counter() - start
        result = {{"items_per_s": n * 64 / elapsed, "batch64_ms": elapsed / n * 1000}}
        singles, until = [], time.perf_counter() + single_seconds
        while time.perf_counter() < until:
            t = time.perf_counter()
            model(x1)
            singles.append(time.perf_counter() - t)
        if singles:
            result["batch1_ms"] = statistics.median(singles) * 1000
        print(json.dumps(result), flush=True)
"""


class Baseline:
    """The ceiling and the direct call, measured on demand in slices by one long-lived process (the model is
    built once), so that slices can alternate with the served runs they judge."""

    def __init__(self, threads: int) -> None:
        self.threads = threads
        self.proc = subprocess.Popen(
            [sys.executable, "-c", BASELINE.format(here=str(HERE), threads=threads)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )
        assert self.proc.stdin and self.proc.stdout
        if self.proc.stdout.readline().strip() != "ready":
            sys.exit("the baseline process failed to start (is torch installed?)")

    def slice(self, seconds: float, singles: bool = True) -> dict[str, float]:
        """``seconds`` of batch-64 calls (``items_per_s``, ``batch64_ms``), then, with ``singles``, half as long
        of batch-1 calls (their median: ``batch1_ms``)."""
        assert self.proc.stdin and self.proc.stdout
        self.proc.stdin.write(f"{seconds} {seconds / 2 if singles else 0}\n")
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


def latency_arg(value: str) -> float | str:
    if value == "auto":
        return value
    try:
        return float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--max-latency-ms takes a number of ms or auto, not {value!r}") from None


def resolve_latency(value: float | str, batch64_ms: float, factor: float = 2.0) -> float:
    """``auto``: ``factor`` times the batch-64 time, rounded up to 10 ms (twice: the issue's 60 ms against a
    30 ms batch)."""
    if value != "auto":
        return float(value)
    chosen = max(10.0, 10.0 * math.ceil(factor * batch64_ms / 10))
    print(f"max_latency_ms auto: {chosen:g} ({factor:g} x the {batch64_ms:.1f} ms batch of 64 measured now)", flush=True)
    return chosen


def hey(url: str, body_file: str, connections: int, duration: float) -> dict[str, Any]:
    """Run hey; latencies come from its CSV (0.1 ms resolution, like its summary), which leaves out requests
    that got no answer (transport errors): ``statuses`` counts the answers by status."""
    out = subprocess.run(
        ["hey", "-z", f"{duration}s", "-c", str(connections), "-m", "POST", "-T", "application/json", "-D", body_file,
         "-o", "csv", url],
        capture_output=True, text=True, check=True,
    ).stdout
    rows = list(csv.DictReader(io.StringIO(out)))
    ok = [float(r["response-time"]) * 1000 for r in rows if r["status-code"] == "200"]
    took = max((float(r["offset"]) + float(r["response-time"]) for r in rows), default=duration)
    statuses = Counter(int(r["status-code"]) for r in rows)
    return {"ok_ms": ok, "statuses": dict(statuses), "non200": len(rows) - len(ok), "seconds": took}


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
    statuses: Counter[int] = Counter()
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
            status = int(lines[0].split()[1])
            statuses[status] += 1
            if status == 200:
                ok.append((time.perf_counter() - sent) * 1000)
    return {"ok_ms": ok, "statuses": dict(statuses), "non200": sum(statuses.values()) - len(ok),
            "seconds": time.perf_counter() - started}


def recv(sock: socket.socket) -> bytes:
    data = sock.recv(65536)
    if not data:
        sys.exit("the server closed the connection")
    return data


def quantile(sorted_ms: list[float], q: float) -> float:
    return sorted_ms[min(len(sorted_ms) - 1, int(q * len(sorted_ms)))] if sorted_ms else float("nan")


def summarize(runs: list[dict[str, Any]]) -> dict[str, float]:
    """Throughput and latency quantiles over one or more load runs, pooled."""
    ok = sorted(ms for r in runs for ms in r["ok_ms"])
    seconds = sum(r["seconds"] for r in runs)
    return {"items_per_s": len(ok) / seconds, "p50": quantile(ok, 0.50), "p99": quantile(ok, 0.99),
            "non200": sum(r["non200"] for r in runs)}


def mean_batch(metrics: str) -> float | None:
    """The mean batch size of the predict API since the server started, from its /metrics text."""
    batches = re.search(r'bento_like_batch_size_count\{api="predict"\} (\d+)', metrics)
    items = re.search(r'bento_like_batch_size_sum\{api="predict"\} ([\d.]+)', metrics)
    if not (batches and items and int(batches.group(1))):
        return None
    return float(items.group(1)) / int(batches.group(1))


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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@functools.cache
def body_file() -> str:
    """A request body file: one 784-float row (one file per process, removed at exit)."""
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump({"x": [[0.01 * (i % 100) for i in range(784)]]}, f)
    atexit.register(os.unlink, f.name)
    return f.name


def start_mlp_server(threads: int, max_latency_ms: float, typed: bool = True,
                     pythonpath: str | None = None) -> tuple[subprocess.Popen, str, str]:
    """`pkg serve` of the MLP, ready; returns the process, its URL and a request body file (one 784-float row).

    ``typed``: the input declared with its shape and dtype (else a plain np.ndarray: BENCH_TYPED=0).
    ``pythonpath``: another checkout whose ``bento_like`` the server imports (ahead of the editable install).
    ``BENCH_SERVER_LOG=FILE``: the server's log is appended there, under a line naming the server."""
    port = free_port()
    env = {**os.environ, "BENTO_LIKE_COMPUTE_THREADS": str(threads), "BENCH_MAX_LATENCY_MS": str(max_latency_ms),
           "BENCH_TYPED": "1" if typed else "0"}
    if pythonpath:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (pythonpath, os.environ.get("PYTHONPATH")) if p)
    log_path = os.environ.get("BENCH_SERVER_LOG")
    with open(log_path, "a") if log_path else open(os.devnull, "w") as log:
        log.write(f"== bento_like from {pythonpath or 'this checkout'}, threads={threads} "
                  f"max_latency_ms={max_latency_ms:g} typed={typed} port={port}\n")
        log.flush()
        server = subprocess.Popen(
            [sys.executable, "-m", "bento_like", "serve", "batching_service:MLP", "--port", str(port),
             "--log-level", "warning"],
            cwd=HERE, env=env, stdout=subprocess.DEVNULL, stderr=log,
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


def stop(*procs: subprocess.Popen) -> None:
    """SIGTERM, then wait for each to exit."""
    for proc in procs:
        proc.send_signal(signal.SIGTERM)
    for proc in procs:
        proc.wait(60)
