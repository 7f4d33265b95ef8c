"""Per-request overhead of the runtime: our `tag` API against a bare Starlette app doing the same work.

Both run under the same server (uvicorn, httptools, uvloop, no access log) with the same process count, and
`hey` (Debian package) drives them from this machine, one after the other in the same run. Prints requests/s,
p50 and p99 at 1 and 64 connections, and our throughput as a ratio of the bare app's.

    python bench/overhead.py [--duration 10] [--workers 1]
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

HERE = Path(__file__).resolve().parent
BODY = '{"item": {"text": "hello", "lang": "fr"}}'


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(kind: str, workers: int) -> tuple[subprocess.Popen, str]:
    port = free_port()
    if kind == "bare":
        cmd = [sys.executable, "-m", "uvicorn", "overhead_services:bare_app", "--port", str(port),
               "--no-access-log", "--log-level", "warning", "--workers", str(workers)]
    else:
        cmd = [sys.executable, "-m", "bento_like", "serve", "overhead_services:Overhead", "--port", str(port),
               "--log-level", "warning", "--workers", str(workers)]
    proc = subprocess.Popen(cmd, cwd=HERE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            if httpx.post(url + "/tag", content=BODY, headers={"content-type": "application/json"}).status_code == 200:
                return proc, url
        except httpx.TransportError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError(f"{kind} server did not start")


def hey(url: str, connections: int, duration: float) -> dict[str, float]:
    out = subprocess.run(
        ["hey", "-z", f"{duration}s", "-c", str(connections), "-m", "POST", "-T", "application/json", "-d", BODY, url],
        capture_output=True, text=True, check=True,
    ).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    p50 = float(re.search(r"50%+ in ([\d.]+) secs", out).group(1)) * 1000
    p99 = float(re.search(r"99%+ in ([\d.]+) secs", out).group(1)) * 1000
    codes = dict((int(c), int(n)) for c, n in re.findall(r"\[(\d+)\]\s+(\d+) responses", out))
    return {"rps": rps, "p50": p50, "p99": p99, "non200": sum(n for c, n in codes.items() if c != 200)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--connections", default="1,64")
    args = parser.parse_args()
    if shutil.which("hey") is None:
        sys.exit("needs hey: apt-get install hey")
    conns = [int(c) for c in args.connections.split(",")]
    rows = []
    for kind, path in (("bare starlette", "bare"), ("bento_like async", "/tag"), ("bento_like sync", "/tag_sync")):
        proc, url = start("bare" if path == "bare" else "ours", args.workers)
        try:
            for c in conns:
                hey(url + ("/tag" if path == "bare" else path), c, 1.0)  # warm-up
                rows.append((kind, c, hey(url + ("/tag" if path == "bare" else path), c, args.duration)))
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(30)
    base = {c: r["rps"] for k, c, r in rows if k == "bare starlette"}
    print(f"workers={args.workers} duration={args.duration}s cpus={os.cpu_count()}")
    print(f"{'server':<18} {'conns':>5} {'req/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'non-200':>7} {'vs bare':>8}")
    for kind, c, r in rows:
        print(f"{kind:<18} {c:>5} {r['rps']:>9.0f} {r['p50']:>8.2f} {r['p99']:>8.2f} {r['non200']:>7} {r['rps'] / base[c]:>8.2f}")


if __name__ == "__main__":
    main()
