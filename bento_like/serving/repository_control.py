"""With ``--workers N``, a load or unload reaches every worker through the supervisor's control directory: the
worker that took the request writes the operation; each worker prepares it and writes whether it could; the first
one commits it when all could, else aborts it (a two-phase commit over files). The versions chosen are kept
there too (``pins.json``), so a worker started later serves them."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .swap_checks import LoadFailed

if TYPE_CHECKING:
    from .repository import ModelRepository

log = logging.getLogger("bento_like.serving")

PINS_FILE = "pins.json"
POLL_S = 0.05
PREPARE_TIMEOUT_S = 600.0  # a worker that neither prepares nor fails in this long is taken as failed


@dataclass
class Operation:
    """A load or unload, as written to the control directory for every worker."""

    id: str
    kind: str  # load | unload
    name: str
    version: str | None = None
    quality: dict[str, Any] | None = None
    expected: int = 1  # how many workers must prepare it
    pin: bool = True  # keep this version until the next load (the watcher's loads keep following the tag)

    def encode(self) -> bytes:
        return json.dumps(self.__dict__).encode()


class ControlDir:
    """The control directory as one worker sees it."""

    def __init__(self, path: Path, repository: ModelRepository) -> None:
        self.path = path
        self.repository = repository
        self.me = str(os.getpid())  # worker numbers repeat across a rolling reload's generations; pids do not
        self._seen: set[str] = set()

    def read_pins(self) -> dict[str, str]:
        """The pinned versions, and from now on only the operations written after this are taken (those before
        are in the pins already)."""
        self._seen.update(p.stem for p in self.path.glob("op-*.json"))
        try:
            return json.loads((self.path / PINS_FILE).read_text())
        except (OSError, ValueError):
            return {}

    def write_pins(self, pins: dict[str, str]) -> None:
        _write(self.path / PINS_FILE, json.dumps(pins).encode())

    async def coordinate(self, op: Operation) -> dict[str, Any]:
        """Write ``op`` for every worker, wait until each prepared it or failed, then commit or abort it."""
        _write(self.path / f"op-{op.id}.json", op.encode())
        deadline = time.monotonic() + PREPARE_TIMEOUT_S
        results: dict[str, dict[str, Any]] = {}
        while len(results) < op.expected and time.monotonic() < deadline:
            await asyncio.sleep(POLL_S)
            for path in self.path.glob(f"prepared-{op.id}-*.json"):
                try:
                    results[path.stem.rsplit("-", 1)[1]] = json.loads(path.read_text())
                except (OSError, ValueError):
                    continue
        failures = [r for r in results.values() if not r.get("ok")]
        decision = "commit" if len(results) >= op.expected and not failures else "abort"
        _write(self.path / f"{decision}-{op.id}", b"")
        if decision == "abort":
            if failures:
                raise LoadFailed(failures[0]["reason"], failures[0].get("status", 400))
            raise LoadFailed(f"only {len(results)} of {op.expected} workers prepared the {op.kind} of {op.name} "
                             f"within {PREPARE_TIMEOUT_S:g} s; nothing changed", 503)
        while time.monotonic() < deadline:
            done = sorted(self.path.glob(f"done-{op.id}-*.json"))
            if len(done) >= op.expected:
                return json.loads(done[0].read_text())
            await asyncio.sleep(POLL_S)
        raise LoadFailed(f"the {op.kind} of {op.name} was committed but not every worker said it was done", 503)

    async def follow(self) -> None:
        """Every worker: take the operations written to the directory, prepare each, wait for the decision,
        commit or abort it."""
        state = self.repository.state
        while not state.ready:  # an operation written meanwhile is taken once the instances are built
            if state.failure:
                return
            await asyncio.sleep(POLL_S)
        while True:
            await asyncio.sleep(POLL_S)
            for path in sorted(self.path.glob("op-*.json"), key=_mtime):
                if path.stem in self._seen:
                    continue
                self._seen.add(path.stem)
                try:
                    op = Operation(**json.loads(path.read_text()))
                except (OSError, ValueError, TypeError):
                    continue
                await self._take(op)

    async def _take(self, op: Operation) -> None:
        repository = self.repository
        async with repository.lock:
            mine = self.path / f"prepared-{op.id}-{self.me}.json"
            try:
                prepared = await repository.prepare(op)
            except LoadFailed as exc:
                _write(mine, json.dumps({"ok": False, "reason": str(exc), "status": exc.status}).encode())
                return
            except Exception as exc:  # noqa: BLE001 - reported to the worker that waits for the answer
                log.exception("preparing %s of %s failed", op.kind, op.name)
                _write(mine, json.dumps({"ok": False, "reason": f"{type(exc).__name__}: {exc}"}).encode())
                return
            _write(mine, json.dumps({"ok": True}).encode())
            while True:
                if (self.path / f"commit-{op.id}").exists():
                    answer = await repository.commit(op, prepared)
                    _write(self.path / f"done-{op.id}-{self.me}.json", json.dumps(answer).encode())
                    return
                if (self.path / f"abort-{op.id}").exists():
                    await repository.abort(prepared)
                    return
                await asyncio.sleep(POLL_S)


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0


def _write(path: Path, data: bytes) -> None:
    scratch = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    scratch.write_bytes(data)
    os.replace(scratch, path)


