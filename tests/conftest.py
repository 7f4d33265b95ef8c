"""Shared fixtures: a real `pkg serve` process on 127.0.0.1 and a private model store per test."""

from __future__ import annotations

import gc
import os
import sys
from pathlib import Path
from typing import Iterator

REPO = Path(__file__).resolve().parents[1]

# `python -m pytest` puts the working directory, the checkout, first on sys.path. There our kernels/ (installed
# as bento_like.kernels) would be found as the top-level `kernels`, which transformers imports when PyPI's
# `kernels` is installed ("cannot import name 'CUDAProperties' from 'kernels'"). Nothing imports from the
# checkout's root by that path: bento_like, builders and kernels come from the installed package.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != REPO]
if "kernels" in sys.modules and getattr(sys.modules["kernels"], "__file__", "").startswith(str(REPO)):
    del sys.modules["kernels"]

# A CI runner may itself be a Kubernetes pod; the servers the tests start must stop as they do on a laptop
# (no 5 s drain delay), unless a test asks for one.
os.environ.pop("KUBERNETES_SERVICE_HOST", None)

import pytest  # noqa: E402

from live_server import Server  # noqa: E402


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A private BENTO_LIKE_HOME for this test, for the test process and any server it starts."""
    path = tmp_path / "bento_home"
    path.mkdir()
    monkeypatch.setenv("BENTO_LIKE_HOME", str(path))
    return path


@pytest.fixture(scope="module")
def frozen_heap() -> Iterator[None]:
    """Keep this process's cyclic GC off the objects that exist now (the frameworks earlier tests imported),
    for modules that time requests from here: with torch and transformers loaded a full collection takes 0.3 s
    or more on a small VM, and one falling inside a burst of requests added 0.5-0.9 s to every request's
    client-side time (seen under the full suite only)."""
    gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


@pytest.fixture
def start_server(tmp_path: Path) -> Iterator:
    """Start real servers: ``start_server("svc.py:Svc", cwd=dir, args=[...])`` -> a ready Server.
    ``prefix`` runs the server under a wrapper command (``setpriv ...``, say)."""
    servers: list[Server] = []

    def start(target: str, cwd: Path | None = None, args: list[str] | None = None, ready: bool = True,
              env: dict[str, str] | None = None, prefix: list[str] | None = None) -> Server:
        full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        server = Server(target, cwd or REPO, args or [], full_env, tmp_path / f"server-{len(servers)}.log", prefix)
        servers.append(server)
        if ready:
            server.wait_ready()
        return server

    yield start
    for server in servers:
        server.stop()
