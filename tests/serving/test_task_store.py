"""The task store on its own: transitions, TTL, the cap, interrupted owners, and ids that are not ids."""

from __future__ import annotations

import os
import time
from pathlib import Path

import msgspec
import pytest

from bento_like.serving.task_store import (
    CANCELED, COMPLETED, FAILED, IN_PROGRESS, PENDING, STALE_TMP_S, TaskStore, valid_task_id,
)


@pytest.fixture
def store(tmp_path: Path):
    s = TaskStore(tmp_path / "tasks", result_ttl=60, max_results=3)
    s.open()
    yield s
    s.close()


def finished(store: TaskStore, answer: bytes = b'"ok"') -> str:
    record = store.create("api")
    assert store.start(record.task_id)
    assert store.finish(record.task_id, COMPLETED, 200, "application/json", answer)
    return record.task_id


def test_a_task_goes_pending_running_completed(store: TaskStore) -> None:
    record = store.create("api")
    assert valid_task_id(record.task_id) and record.status == PENDING
    assert store.start(record.task_id) and store.read(record.task_id).status == IN_PROGRESS
    assert not store.start(record.task_id)  # only a pending task starts
    assert store.finish(record.task_id, COMPLETED, 200, "text/plain", b"done")
    read = store.read(record.task_id)
    assert read.status == COMPLETED and read.answer_type == "text/plain"
    assert read.created_at <= read.executed_at <= read.completed_at
    assert store.answer(record.task_id) == b"done"
    assert not list(store.directory.glob("*.tmp")) and not list(store.directory.glob(".*.tmp"))


def test_a_canceled_task_keeps_its_cancel_and_drops_the_late_result(store: TaskStore) -> None:
    record = store.create("api")
    store.start(record.task_id)
    assert store.cancel(record.task_id, "api").status == CANCELED
    assert not store.finish(record.task_id, COMPLETED, 200, "application/json", b"late", ("application/json", b"{}"))
    assert store.read(record.task_id).status == CANCELED
    assert msgspec.json.decode(store.answer(record.task_id))["status"] == 410
    assert store.kept_input(record.task_id) is None
    assert store.cancel(finished(store), "api").status == COMPLETED  # a finished task is left as it is
    assert store.cancel(store.create("api").task_id, "other") is None  # another API's task is not touched


def test_a_failed_task_keeps_its_input_for_a_retry(store: TaskStore) -> None:
    record = store.create("api")
    store.start(record.task_id)
    store.finish(record.task_id, FAILED, 500, "application/json", b'{"error": "x"}', ("application/json", b'{"a": 1}'))
    assert store.read(record.task_id).input_type == "application/json"
    assert store.kept_input(record.task_id) == b'{"a": 1}'
    assert store.kept_input(finished(store)) is None  # a completed task's input is not kept


def test_results_expire_after_the_ttl(tmp_path: Path) -> None:
    store = TaskStore(tmp_path, result_ttl=0.2, max_results=10)
    store.open()
    kept, swept = finished(store), finished(store)
    time.sleep(0.3)
    assert store.read(kept) is None and not (tmp_path / f"{kept}.out").exists()
    assert store.sweep() == 1 and not (tmp_path / f"{swept}.json").exists()
    store.close()


def test_the_oldest_finished_tasks_go_first_past_the_cap(store: TaskStore) -> None:
    ids = [finished(store) for _ in range(5)]
    running = store.create("api").task_id  # unfinished tasks are never evicted
    assert store.sweep() == 2
    assert [store.read(t) is not None for t in ids] == [False, False, True, True, True]
    assert store.read(running).status == PENDING


def test_a_task_whose_process_is_gone_reads_as_failed(store: TaskStore) -> None:
    other = TaskStore(store.directory, result_ttl=60, max_results=3)
    other.open()
    record = other.create("api")
    other.start(record.task_id)
    assert store.read(record.task_id).status == IN_PROGRESS  # its owner still holds its lock
    other._owner_lock.close()  # as if killed: the lock is free, the file stays
    read = store.read(record.task_id)
    assert read.status == FAILED
    assert b"interrupted" in store.answer(record.task_id)
    store.sweep()
    assert not (store.directory / "owners" / f"{other.owner}.lock").exists()
    assert (store.directory / "owners" / f"{store.owner}.lock").exists()


def test_stopping_marks_unfinished_tasks_failed_and_keeps_their_input(store: TaskStore) -> None:
    record = store.create("api")
    store.abandon({record.task_id: ("application/json", b'{"x": 1}')}, "the server stopped before it finished")
    read = store.read(record.task_id)
    assert read.status == FAILED and store.kept_input(record.task_id) == b'{"x": 1}'
    assert b"the server stopped before it finished" in store.answer(record.task_id)


@pytest.mark.parametrize("task_id", ["../../etc/passwd", "0" * 31, "A" * 32, "0" * 32 + "/", "", "owners"])
def test_what_is_not_an_id_never_reaches_the_filesystem(store: TaskStore, task_id: str) -> None:
    assert not valid_task_id(task_id)
    assert store.read(task_id) is None


def test_stale_temporary_files_are_swept(store: TaskStore) -> None:
    stale = store.directory / ".leftover.tmp"
    stale.write_bytes(b"x")
    old = time.time() - STALE_TMP_S - 1
    os.utime(stale, (old, old))
    store.sweep()
    assert not stale.exists()


def test_the_settings_come_from_the_environment_and_are_checked(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from bento_like.serving.tuning import SettingsError, Tuning

    tasks = Tuning.from_env({"BENTO_LIKE_STATE_DIR": str(tmp_path), "BENTO_LIKE_TASK_RESULT_TTL_S": "5",
                             "BENTO_LIKE_TASK_MAX_RESULTS": "7", "BENTO_LIKE_TASK_TIMEOUT_S": "600"}).tasks
    assert (tasks.result_ttl_s, tasks.max_results, tasks.timeout_s) == (5.0, 7, 600.0)
    assert tasks.directory("Svc") == str(tmp_path / "Svc" / "tasks")
    monkeypatch.setenv("BENTO_LIKE_HOME", str(tmp_path / "home"))
    assert Tuning.from_env({}).tasks.directory("Svc") == str(tmp_path / "home" / "state" / "Svc" / "tasks")
    with pytest.raises(SettingsError, match="BENTO_LIKE_TASK_RESULT_TTL_S must be > 0"):
        Tuning.from_env({"BENTO_LIKE_TASK_RESULT_TTL_S": "0"})
    with pytest.raises(SettingsError, match="BENTO_LIKE_TASK_MAX_RESULTS must be an integer"):
        Tuning.from_env({"BENTO_LIKE_TASK_MAX_RESULTS": "many"})
