"""What a model swap costs the traffic it happens under.

Serves bench/updates_service.py (a stored 784-1024-10 MLP, batchable) with ``--admin`` and drives it with a
closed-loop ``hey`` (Debian package; ``--clients`` connections, one 784-float row per request). Each round is two phases
of ``--duration`` s on the same server, one after the other: *steady* (no swap) and *swapping* (a load of
another stored version every ``--every`` s through the repository API). Prints, per phase, requests/s, p50, p99
and max latency, non-200 answers and transport errors, the swaps' own durations, and the ratio of the swapping
phase's p99 and throughput to the steady phase's of the same round. Every round is printed, not the best.

    python bench/model_updates.py [--rounds 3] [--duration 8] [--every 1] [--clients 16]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

HERE = Path(__file__).resolve().parent
TOKEN = "bench-token"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def save_versions(root: Path, count: int) -> list[str]:
    import torch

    import bento_like as bl

    store = bl.models.ModelStore(root)
    tags = []
    for seed in range(count):
        torch.manual_seed(seed)
        model = torch.nn.Sequential(torch.nn.Linear(784, 1024), torch.nn.ReLU(), torch.nn.Linear(1024, 10)).eval()
        tags.append(store.save("bench-mlp", model, framework="torch"))
    return tags


def hey(url: str, clients: int, seconds: float, body: Path) -> dict[str, float]:
    """``hey`` (Debian package): a Go load generator, so that the client is not what limits a 2-core machine."""
    out = subprocess.run(["hey", "-z", f"{seconds}s", "-c", str(clients), "-m", "POST", "-T", "application/json",
                          "-D", str(body), f"{url}/predict"], capture_output=True, text=True, check=True).stdout
    number = lambda pattern: float(re.search(pattern, out).group(1)) if re.search(pattern, out) else 0.0  # noqa: E731
    codes = {int(c): int(n) for c, n in re.findall(r"\[(\d{3})\]\s+(\d+) responses", out)}
    errors = sum(int(n) for n in re.findall(r"\[(\d+)\]\s+Post", out))
    return {"rps": number(r"Requests/sec:\s+([\d.]+)"), "p50": number(r"50% in ([\d.]+) secs") * 1000,
            "p99": number(r"99% in ([\d.]+) secs") * 1000, "max": number(r"Slowest:\s+([\d.]+) secs") * 1000,
            "non200": sum(n for c, n in codes.items() if c != 200), "errors": errors}


def phase(url: str, clients: int, seconds: float, tags: list[str] | None, every: float, body: Path) -> dict[str, float]:
    swaps: list[float] = []
    failed: list[str] = []
    done = threading.Event()

    def swapper() -> None:
        i = 0
        while tags and not done.wait(every):
            started = time.perf_counter()
            r = httpx.post(f"{url}/v2/repository/models/bench-mlp/load", headers={"Authorization": f"Bearer {TOKEN}"},
                           json={"parameters": {"version": tags[i % len(tags)]}}, timeout=120)
            swaps.append(time.perf_counter() - started)
            if r.status_code != 200:
                failed.append(r.text)
            i += 1

    thread = threading.Thread(target=swapper, daemon=True)
    thread.start()
    result = hey(url, clients, seconds, body)
    done.set()
    thread.join()
    result.update(swaps=len(swaps), swap_ms=statistics.median(swaps) * 1000 if swaps else 0.0, failed_swaps=len(failed))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=float, default=8.0)
    parser.add_argument("--every", type=float, default=1.0)
    parser.add_argument("--clients", type=int, default=16)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "store"
        tags = save_versions(root, 3)
        port = free_port()
        env = {**os.environ, "BENTO_LIKE_MODEL_STORE": str(root), "BENTO_LIKE_ADMIN_TOKEN": TOKEN}
        log = open(Path(tmp) / "server.log", "wb")
        server = subprocess.Popen([sys.executable, "-m", "bento_like", "serve", "updates_service.py:Updates",
                                   "--port", str(port), "--admin"], cwd=HERE, env=env, stdout=log,
                                  stderr=subprocess.STDOUT)
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                try:
                    if httpx.get(url + "/readyz", timeout=1).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                time.sleep(0.2)
            body = Path(tmp) / "body.json"
            body.write_text(json.dumps({"x": [[0.5] * 784]}))
            phase(url, args.clients, 2.0, None, args.every, body)  # warm the batcher
            header = (f"{'round':>5} {'phase':>9} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8} "
                      f"{'non200':>6} {'errors':>6} {'swaps':>5} {'swap ms':>8}")
            print(header)
            ratios = []
            for n in range(1, args.rounds + 1):
                steady = phase(url, args.clients, args.duration, None, args.every, body)
                swapping = phase(url, args.clients, args.duration, tags, args.every, body)
                for name, r in (("steady", steady), ("swapping", swapping)):
                    print(f"{n:>5} {name:>9} {r['rps']:>8.0f} {r['p50']:>8.2f} {r['p99']:>8.2f} {r['max']:>8.1f} "
                          f"{r['non200']:>6} {r['errors']:>6} {r['swaps']:>5} {r['swap_ms']:>8.0f}")
                ratios.append((swapping["p99"] / steady["p99"], swapping["rps"] / steady["rps"]))
            print()
            for n, (p99, rps) in enumerate(ratios, 1):
                print(f"round {n}: swapping/steady p99 x{p99:.2f}, throughput x{rps:.2f}")
            failed = sum(r["failed_swaps"] for r in [swapping])
            if failed:
                print(f"{failed} swap(s) failed: see {tmp}/server.log")
        finally:
            server.send_signal(signal.SIGTERM)
            server.wait(30)


if __name__ == "__main__":
    main()
