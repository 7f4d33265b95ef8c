"""Run the quickstart end to end: serve ``service.py:Demo``, wait until it is ready, ask it for a prediction, stop it.

    python examples/quickstart/run.py            # from anywhere, once bento_like is installed

It starts the server the way a user does (``pkg serve``, here as ``python -m bento_like serve`` so it works
even when pip's script folder is not on PATH), talks to it over plain HTTP, and stops it with SIGTERM, the
signal an orchestrator sends. It exits non-zero if any step fails, and then prints the server's log.
"""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

HERE = Path(__file__).resolve().parent
HOST = "127.0.0.1"
SPECIES = ("setosa", "versicolor", "virginica")  # the order of Demo.predict's columns


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def wait_ready(http: httpx.Client, server: subprocess.Popen, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"the server exited with {server.returncode} before it was ready")
        try:
            if http.get("/readyz", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"the server was not ready after {timeout:g} s")


def stop(server: subprocess.Popen, timeout: float = 30.0) -> int:
    if server.poll() is None:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(timeout)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
    return server.returncode


def predict(http: httpx.Client, x: list[list[float]]) -> list[list[float]]:
    print(f"$ curl -s -X POST {str(http.base_url).rstrip('/')}/predict -H 'content-type: application/json' -d '{json.dumps({'x': x})}'")
    response = http.post("/predict", json={"x": x})
    if response.status_code != 200:
        raise RuntimeError(f"/predict answered {response.status_code}: {response.text}")
    return response.json()


def main() -> int:
    port = free_port()
    command = [sys.executable, "-m", "bento_like", "serve", "service.py:Demo", "--host", HOST, "--port", str(port)]
    x = [[5.1, 3.5, 1.4, 0.2], [6.7, 3.0, 5.2, 2.3]]  # the first and the last flower of iris.csv
    with tempfile.TemporaryDirectory() as tmp:
        log = Path(tmp) / "server.log"
        print(f"$ pkg serve service.py:Demo --host {HOST} --port {port}        (in {HERE})")
        with open(log, "wb") as log_file:
            server = subprocess.Popen(command, cwd=HERE, stdout=log_file, stderr=subprocess.STDOUT)
        failure = None
        # trust_env=False: a proxy configured in the environment must not receive requests meant for this machine.
        with httpx.Client(base_url=f"http://{HOST}:{port}", timeout=10, trust_env=False) as http:
            try:
                wait_ready(http, server)
                prediction = predict(http, x)
                print(f"prediction: {[[round(p, 3) for p in row] for row in prediction]}")
                species = [SPECIES[row.index(max(row))] for row in prediction]
                print(f"species: {', '.join(species)}")
                if species != ["setosa", "virginica"]:
                    failure = f"the model misclassified two textbook flowers: {species}"
            except (RuntimeError, httpx.HTTPError) as exc:
                failure = str(exc)
            finally:
                code = stop(server)
        print(f"server stopped with exit code {code}")
        if failure is None and code != 0:
            failure = f"the server exited with {code} on SIGTERM, not 0"
        if failure is not None:
            print(f"quickstart failed: {failure}\n--- server log ---\n{log.read_text(errors='replace')}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
