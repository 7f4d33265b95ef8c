"""The records and results of tasks, on disk, shared by every worker of a server (docs/tasks.md).

One directory per service: ``<id>.json`` is a task's record (its status and times), ``<id>.out`` the answer it
finished with (the encoded result, or the error body), ``<id>.in`` the request of a failed task (for a retry).
Each file is written whole to a temporary name and renamed over, so a reader in any process sees the old file or
the new one, never half of one. A transition (start, finish, cancel) reads and rewrites a record under the
directory's lock, so a cancel from one worker and a finish in another cannot both win.

A task in progress belongs to the process running it. Each process holds a lock on ``owners/<owner>.lock`` while
it lives; the lock is free once it is gone, killed or not, so a task whose owner's lock is free was interrupted:
it is marked failed when it is next read. Nothing here imports asyncio: the routes call it on a thread.
"""

from __future__ import annotations

import fcntl
import logging
import os
import re
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO, Iterator

import msgspec

from .tuning import STATE_DIR_ENV

log = logging.getLogger("bento_like.serving")

PENDING = "pending"
IN_PROGRESS = "in_progress"
COMPLETED = "completed"
FAILED = "failed"
CANCELED = "canceled"
FINISHED = frozenset({COMPLETED, FAILED, CANCELED})

STALE_TMP_S = 3600.0  # a temporary file this old was left by a process killed while writing it

_TASK_ID = re.compile(r"[0-9a-f]{32}")
_JSON = "application/json"


class TaskRecord(msgspec.Struct, forbid_unknown_fields=False):
    """What is known of one task. Times are seconds since the epoch."""

    task_id: str
    api: str
    status: str
    created_at: float
    owner: str  # the process that runs (or ran) it
    executed_at: float | None = None
    completed_at: float | None = None
    answer_status: int = 200  # the HTTP status ``get`` answers with: the API's, or its error's
    answer_type: str = _JSON  # the Content-Type of ``<id>.out``
    input_type: str | None = None  # the Content-Type of ``<id>.in``, kept for a retry of a failed task
    retry_of: str | None = None

    def to_json(self) -> dict[str, object]:
        """The body of ``GET /<route>/status``: BentoML's fields, times in ISO 8601 (UTC)."""
        return {
            "task_id": self.task_id,
            "status": self.status,
            "created_at": _iso(self.created_at),
            "executed_at": _iso(self.executed_at),
            "completed_at": _iso(self.completed_at),
        }


def _iso(when: float | None) -> str | None:
    if when is None:
        return None
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(when)) + f".{int(when % 1 * 1e6):06d}+00:00"


def valid_task_id(task_id: str) -> bool:
    """Whether ``task_id`` has the shape of an id this store makes (32 lowercase hex digits): checked before it
    becomes part of a path, so no id can name a file outside the store."""
    return _TASK_ID.fullmatch(task_id) is not None


class TaskStore:
    def __init__(self, directory: Path, result_ttl: float, max_results: int) -> None:
        self.directory = directory
        self.result_ttl = result_ttl
        self.max_results = max_results
        self.owner = uuid.uuid4().hex
        self._owner_lock: BinaryIO | None = None
        self._encoder = msgspec.json.Encoder()
        self._decoder = msgspec.json.Decoder(TaskRecord)

    def open(self) -> None:
        """Make the directory and take this process's owner lock (in the serving process: a supervisor that
        only builds the app to check it touches nothing)."""
        try:
            (self.directory / "owners").mkdir(parents=True, exist_ok=True)
            # Held open (and locked) for the life of the process: the sign that its tasks in progress still run.
            self._owner_lock = open(self.directory / "owners" / f"{self.owner}.lock", "wb")
        except OSError as exc:
            raise OSError(f"cannot keep tasks in {self.directory} ({exc.strerror}): set {STATE_DIR_ENV} to a "
                          "writable directory") from exc
        fcntl.flock(self._owner_lock, fcntl.LOCK_EX | fcntl.LOCK_NB)

    def close(self) -> None:
        if self._owner_lock is not None:
            (self.directory / "owners" / f"{self.owner}.lock").unlink(missing_ok=True)
            self._owner_lock.close()
            self._owner_lock = None

    # -- reading ----------------------------------------------------------------------------------------------

    def read(self, task_id: str) -> TaskRecord | None:
        """The record of ``task_id``; None when there is none (never made, expired, or evicted). A finished one
        past its TTL is removed here; an unfinished one whose process is gone is marked failed."""
        if not valid_task_id(task_id):
            return None
        record = self._load(task_id)
        if record is None:
            return None
        if record.status in FINISHED:
            if record.completed_at is not None and time.time() - record.completed_at > self.result_ttl:
                self._remove(task_id)
                return None
            return record
        if not self._alive(record.owner):
            with self._locked():
                record = self._load(task_id)
                if record is not None and record.status not in FINISHED and not self._alive(record.owner):
                    record = self._interrupted(record)
        return record

    def answer(self, task_id: str) -> bytes | None:
        """What ``get`` answers for a finished task: the encoded result or the error body."""
        try:
            return (self.directory / f"{task_id}.out").read_bytes()
        except FileNotFoundError:
            return None

    def kept_input(self, task_id: str) -> bytes | None:
        try:
            return (self.directory / f"{task_id}.in").read_bytes()
        except FileNotFoundError:
            return None

    # -- transitions ------------------------------------------------------------------------------------------

    def create(self, api: str, retry_of: str | None = None) -> TaskRecord:
        record = TaskRecord(uuid.uuid4().hex, api, PENDING, time.time(), self.owner, retry_of=retry_of)
        self._write_record(record)
        return record

    def start(self, task_id: str) -> bool:
        """pending -> in_progress; False when the task is no longer pending (canceled meanwhile, maybe by
        another worker) and must not run."""
        with self._locked():
            record = self._load(task_id)
            if record is None or record.status != PENDING:
                return False
            record.status, record.executed_at = IN_PROGRESS, time.time()
            self._write_record(record)
            return True

    def finish(self, task_id: str, status: str, answer_status: int, answer_type: str, answer: bytes,
               kept_input: tuple[str, bytes] | None = None) -> bool:
        """Record how a task ended; False (and nothing kept) when it was canceled meanwhile."""
        # The (maybe large) files are written before taking the lock, and put in place only if the task is kept:
        # a task canceled meanwhile keeps the answer its cancel wrote.
        staged = {".out": self._stage(answer)}
        if kept_input is not None:
            staged[".in"] = self._stage(kept_input[1])
        try:
            with self._locked():
                record = self._load(task_id)
                if record is None or record.status in FINISHED:
                    return False
                for suffix, tmp in staged.items():
                    os.replace(tmp, self.directory / f"{task_id}{suffix}")
                record.status, record.completed_at = status, time.time()
                record.answer_status, record.answer_type = answer_status, answer_type
                record.input_type = kept_input[0] if kept_input is not None else None
                self._write_record(record)
                return True
        finally:
            for tmp in staged.values():
                tmp.unlink(missing_ok=True)

    def cancel(self, task_id: str, api: str) -> TaskRecord | None:
        """Mark a pending or running task of ``api`` canceled; the record as it is after (unchanged when it had
        finished), or None when ``api`` has no such task."""
        with self._locked():
            record = self._load(task_id)
            if record is None or record.api != api:
                return None
            if record.status in FINISHED:
                return record
            message = f"task {task_id} was canceled"
            self._write_file(f"{task_id}.out", msgspec.json.encode({"error": message, "status": 410}))
            record.status, record.completed_at = CANCELED, time.time()
            record.answer_status, record.answer_type = 410, _JSON
            self._write_record(record)
            return record

    def abandon(self, inputs: dict[str, tuple[str, bytes]], reason: str) -> None:
        """Mark tasks this process will not finish (the server is stopping) failed, with ``reason``, keeping
        their inputs (id -> Content-Type, body) for a retry."""
        with self._locked():
            for task_id, (input_type, body) in inputs.items():
                record = self._load(task_id)
                if record is not None and record.status not in FINISHED:
                    self._write_file(f"{task_id}.in", body)
                    record.input_type = input_type
                    self._interrupted(record, reason + "; retry it to run it again")

    # -- upkeep -----------------------------------------------------------------------------------------------

    def sweep(self) -> int:
        """Forget finished tasks past the TTL, then the oldest finished ones past ``max_results``; remove the
        lock files of processes that are gone, and stale temporary files. Returns how many tasks were forgotten."""
        now = time.time()
        finished: list[tuple[float, str]] = []
        forgotten = 0
        for entry in os.scandir(self.directory):
            if entry.name.endswith(".tmp") and now - entry.stat().st_mtime > STALE_TMP_S:
                Path(entry.path).unlink(missing_ok=True)  # left by a process killed while writing
            if not entry.name.endswith(".json") or not valid_task_id(entry.name[:-5]):
                continue
            task_id = entry.name[:-5]
            record = self._load(task_id)
            if record is None or record.status not in FINISHED or record.completed_at is None:
                continue
            if now - record.completed_at > self.result_ttl:
                self._remove(task_id)
                forgotten += 1
            else:
                finished.append((record.completed_at, task_id))
        finished.sort()
        for _, task_id in finished[: max(0, len(finished) - self.max_results)]:
            self._remove(task_id)
            forgotten += 1
        for entry in os.scandir(self.directory / "owners"):
            owner = entry.name.removesuffix(".lock")
            if owner != self.owner and not self._alive(owner):
                Path(entry.path).unlink(missing_ok=True)
        return forgotten

    # -- files ------------------------------------------------------------------------------------------------

    def _load(self, task_id: str) -> TaskRecord | None:
        try:
            data = (self.directory / f"{task_id}.json").read_bytes()
        except FileNotFoundError:
            return None
        try:
            return self._decoder.decode(data)
        except msgspec.DecodeError:  # written by hand, or by another version: not ours to serve
            log.warning("task record %s is unreadable; treated as unknown", task_id)
            return None

    def _write_record(self, record: TaskRecord) -> None:
        self._write_file(f"{record.task_id}.json", self._encoder.encode(record))

    def _write_file(self, name: str, data: bytes) -> None:
        os.replace(self._stage(data), self.directory / name)

    def _stage(self, data: bytes) -> Path:
        """``data`` in a temporary file of the directory, to be renamed into place (or removed)."""
        tmp = self.directory / f".{uuid.uuid4().hex}.tmp"
        tmp.write_bytes(data)
        return tmp

    def _remove(self, task_id: str) -> None:
        # The record first: a reader never finds a record whose answer is already gone, but for a moment.
        self._remove_files(task_id, ".json", ".out", ".in")

    def _remove_files(self, task_id: str, *suffixes: str) -> None:
        for suffix in suffixes:
            (self.directory / f"{task_id}{suffix}").unlink(missing_ok=True)

    def _interrupted(self, record: TaskRecord, reason: str = "the server process running it stopped before it "
                     "finished (it crashed or was killed); submit it again") -> TaskRecord:
        message = f"task {record.task_id} was interrupted: {reason}"
        self._write_file(f"{record.task_id}.out", msgspec.json.encode({"error": message, "status": 500}))
        record.status, record.completed_at = FAILED, time.time()
        record.answer_status, record.answer_type = 500, _JSON
        self._write_record(record)
        return record

    def _alive(self, owner: str) -> bool:
        if owner == self.owner:
            return True
        if not valid_task_id(owner):
            return False
        try:
            with open(self.directory / "owners" / f"{owner}.lock", "rb") as f:
                try:
                    fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    return True
                fcntl.flock(f, fcntl.LOCK_UN)
                return False
        except FileNotFoundError:
            return False

    @contextmanager
    def _locked(self) -> Iterator[None]:
        with open(self.directory / ".lock", "ab") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)
