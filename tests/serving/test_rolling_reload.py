"""Rolling reload of `pkg serve`: SIGHUP under a supervisor, and `--follow NAME`. Under steady load on kept-open
connections no request fails while the workers are replaced; a new generation that cannot start is given up,
and the old one serves on."""

from __future__ import annotations

import os
import re
import signal
import threading
import time
from pathlib import Path
from typing import Any, Callable

import httpx

SOURCE = """
import os

import bento_like as bl

VERSION = {version}


@bl.service(name="reloadable")
class Reloadable:
    def __init__(self) -> None:
        {init}

    @bl.api
    def version(self) -> list:
        return [VERSION, os.getpid()]
"""


def _write(directory: Path, version: Any, init: str = "pass") -> None:
    (directory / "svc.py").write_text(SOURCE.format(version=version, init=init))


class Load:
    """Client threads, each with its own kept-open connection (an httpx.Client, as a real client has), calling
    /version at a modest rate; each call's outcome: (status code or transport error, version, pid)."""

    def __init__(self, url: str, clients: int = 4, pause: float = 0.05) -> None:
        self.url, self.pause = url, pause
        self.outcomes: list[list[tuple[Any, Any, Any]]] = [[] for _ in range(clients)]
        self.done = threading.Event()
        self.threads = [threading.Thread(target=self._run, args=(out,), daemon=True) for out in self.outcomes]

    def __enter__(self) -> Load:
        for t in self.threads:
            t.start()
        _wait_for(lambda: all(out for out in self.outcomes), 30, "every client's first answer")
        return self

    def __exit__(self, *exc: object) -> None:
        self.done.set()
        for t in self.threads:
            t.join(30)

    def _run(self, out: list[tuple[Any, Any, Any]]) -> None:
        with httpx.Client(base_url=self.url, timeout=30) as client:
            while not self.done.is_set():
                try:
                    r = client.post("/version", json={})
                    out.append((r.status_code, *r.json()) if r.status_code == 200 else (r.status_code, None, None))
                except httpx.TransportError as exc:
                    out.append((f"{type(exc).__name__}: {exc}", None, None))
                time.sleep(self.pause)

    def mark(self) -> list[int]:
        return [len(out) for out in self.outcomes]

    def answers_since(self, mark: list[int], at_least: int = 3) -> list[tuple[Any, Any, Any]]:
        """The outcomes after ``mark``, once every client has had ``at_least`` more."""
        _wait_for(lambda: all(len(out) >= m + at_least for out, m in zip(self.outcomes, mark)), 30, "more answers")
        return [o for out, m in zip(self.outcomes, mark) for o in out[m:]]

    def failures(self) -> list[tuple[Any, Any, Any]]:
        return [o for out in self.outcomes for o in out if o[0] != 200]

    def count(self) -> int:
        return sum(len(out) for out in self.outcomes)


def _wait_for(condition: Callable[[], Any], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"waited {timeout} s for {what}"
        time.sleep(0.05)


def _workers(url: str, want: int) -> dict[int, int]:
    """pid -> version of ``want`` distinct workers, each asked on a new connection (the kernel spreads those)."""
    found: dict[int, int] = {}
    deadline = time.monotonic() + 30
    while len(found) < want and time.monotonic() < deadline:
        with httpx.Client(base_url=url) as client:
            version, pid = client.post("/version", json={}, timeout=10).json()
        found[pid] = version
    assert len(found) == want, found
    return found


def _gone(pid: int) -> bool:
    """Exited (reaped, or a zombie its parent has yet to reap)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def _reload_to(server: Any, load: Load, old: set[int], version: int) -> set[int]:
    """After a reload was asked: the old workers exit, and from then on only new workers, with the new code,
    answer; their pids."""
    _wait_for(lambda: all(_gone(pid) for pid in old), 60, f"workers {old} to exit\n{server.log()}")
    answers = load.answers_since(load.mark())
    new = _workers(server.url, 2 if "--workers" in server.proc.args else 1)
    assert set(new.values()) == {version} and not set(new) & old
    assert {v for _, v, _ in answers} == {version} and {pid for _, _, pid in answers} <= set(new)
    return set(new)


def test_sighup_replaces_the_workers_under_load_and_no_request_fails(start_server, tmp_path: Path) -> None:
    _write(tmp_path, 1)
    server = start_server("svc.py:Reloadable", cwd=tmp_path, args=["--workers", "2"])
    pids = set(_workers(server.url, 2))
    with Load(server.url) as load:
        for version in (2, 3):
            _write(tmp_path, version)
            os.kill(server.proc.pid, signal.SIGHUP)
            pids = _reload_to(server, load, pids, version)
            # a new worker publishes its metrics in place of its predecessor of the same number: a scrape holds
            # at most one sample per worker number (one a second old, or none yet), never both generations'
            text = httpx.get(server.url + "/metrics", timeout=10).text
            samples = re.findall(r'^bento_like_requests_total\{api="version",status="200",worker="(\d+)"\}', text, re.M)
            assert samples and len(samples) == len(set(samples)) and set(samples) <= {"0", "1"}, text
    assert load.failures() == [], load.failures()[:5]
    print(f"{load.count()} requests, all answered 200 across two reloads")
    assert re.search(r"reload 2: done, the workers it replaced have exited", server.log())
    assert server.stop() == 0


def test_a_reload_onto_broken_code_is_given_up_and_the_old_workers_serve_on(start_server, tmp_path: Path) -> None:
    _write(tmp_path, 1)
    server = start_server("svc.py:Reloadable", cwd=tmp_path, args=["--workers", "2"])
    pids = set(_workers(server.url, 2))
    with Load(server.url, clients=2) as load:
        # a syntax error: the new workers cannot import the service (exit 1); an exception in __init__: they
        # cannot build their instances (exit 3, uvicorn's startup failure)
        broken = [("1 +", "pass", 1), (1, "raise RuntimeError('no model today')", 3)]
        for number, (version, init, code) in enumerate(broken, start=1):
            (tmp_path / "svc.py").write_text(SOURCE.format(version=version, init=init))
            os.kill(server.proc.pid, signal.SIGHUP)
            why = rf"reload {number} of svc.py:Reloadable aborted: worker \d of the new generation \(pid \d+\) " \
                  rf"exited with code {code} before it was ready"
            _wait_for(lambda: re.search(why, server.log()), 60, f"{why!r} in the log\n{server.log()}")
            _wait_for(lambda: f"reload {number}: its workers have stopped" in server.log(), 60, "the given-up workers")
            answers = load.answers_since(load.mark())
            assert {v for _, v, _ in answers} == {1} and {pid for _, _, pid in answers} <= pids
            assert set(_workers(server.url, 2)) == pids
        assert "RuntimeError: no model today" in server.log()
        _write(tmp_path, 2)
        os.kill(server.proc.pid, signal.SIGHUP)
        _reload_to(server, load, pids, 2)
    assert load.failures() == [], load.failures()[:5]
    assert server.stop() == 0


def test_a_new_generation_not_ready_in_time_is_given_up(start_server, tmp_path: Path) -> None:
    _write(tmp_path, 1)
    server = start_server("svc.py:Reloadable", cwd=tmp_path, args=["--workers", "2", "--graceful-timeout", "1"],
                          env={"BENTO_LIKE_RELOAD_TIMEOUT_S": "2"})
    pids = set(_workers(server.url, 2))
    _write(tmp_path, 2, init="import time; time.sleep(120)")
    os.kill(server.proc.pid, signal.SIGHUP)
    _wait_for(lambda: "reload 1: its workers have stopped" in server.log(), 60, f"the given-up workers\n{server.log()}")
    assert ("reload 1 of svc.py:Reloadable aborted: the new generation was not ready within 2 s "
            "(BENTO_LIKE_RELOAD_TIMEOUT_S)") in server.log()
    assert _workers(server.url, 2) == {pid: 1 for pid in pids}
    assert server.stop() == 0


def test_follow_serves_each_new_version_of_a_bento(start_server, tmp_path: Path, home: Path) -> None:
    from bento_like.builders.bento import build_bento

    project = tmp_path / "project"
    project.mkdir()
    (project / "bentofile.yaml").write_text("service: svc.py:Reloadable\n")
    _write(project, 1)
    first = build_bento(project).bento.tag
    server = start_server("reloadable", cwd=tmp_path, args=["--follow"], env={"BENTO_LIKE_FOLLOW_INTERVAL_S": "0.2"})
    pids = set(_workers(server.url, 1))
    with Load(server.url, clients=2) as load:
        _write(project, 2)
        second = build_bento(project).bento.tag
        pids = _reload_to(server, load, pids, 2)
        assert f"following reloadable: {first} -> {second}" in server.log()
        # a version that cannot start is given up (and not tried again until another one is stored)
        _write(project, 3, init="raise RuntimeError('no model today')")
        third = build_bento(project).bento.tag
        why = f"reload 2 of {third} aborted"
        _wait_for(lambda: f"reload 2: its workers have stopped" in server.log(), 60, f"{why!r}\n{server.log()}")
        assert why in server.log()
        answers = load.answers_since(load.mark())
        assert {v for _, v, _ in answers} == {2} and {pid for _, _, pid in answers} <= pids
    assert load.failures() == [], load.failures()[:5]
    assert server.stop() == 0


def test_sigterm_during_a_reload_stops_every_worker(start_server, tmp_path: Path) -> None:
    _write(tmp_path, 1)
    server = start_server("svc.py:Reloadable", cwd=tmp_path, args=["--workers", "2"])
    _write(tmp_path, 2, init="import time; time.sleep(2)")
    os.kill(server.proc.pid, signal.SIGHUP)
    _wait_for(lambda: "reload 1: started workers" in server.log(), 30, "the new workers")
    new = [int(pid) for pid in re.search(r"reload 1: started workers (\d+), (\d+)", server.log()).groups()]
    assert server.stop() == 0
    assert all(_gone(pid) for pid in new)


def test_sighup_without_a_supervisor_is_logged_and_serving_goes_on(start_server, tmp_path: Path) -> None:
    _write(tmp_path, 1)
    server = start_server("svc.py:Reloadable", cwd=tmp_path)
    os.kill(server.proc.pid, signal.SIGHUP)
    _wait_for(lambda: "SIGHUP ignored" in server.log(), 30, "the warning")
    assert "--workers N with N > 1, or --follow" in server.log()
    assert httpx.post(server.url + "/version", json={}, timeout=10).json()[0] == 1
    assert server.proc.poll() is None
    assert server.stop() == 0
