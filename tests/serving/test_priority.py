"""Thread priorities of a real server: batch threads favoured over the event loop and request threads, by
lowering their nice where the process may (root, CAP_SYS_NICE) and by raising the others' where it may not."""

from __future__ import annotations

import os
import shutil
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from bento_like.serving.instances import name_native_thread, native_thread_name
from bento_like.serving.priority import PriorityPlan, apply_switch_interval, may_lower_nice, thread_nice
from bento_like.serving.tuning import Tuning

SERVICES = Path(__file__).parent / "services"
pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="per-thread nice is Linux's")

# Running as root without CAP_SYS_NICE is what an unprivileged image user gets.
DROP_SYS_NICE = ["setpriv", "--inh-caps=-sys_nice", "--bounding-set=-sys_nice"]


def threads_of(pid: int) -> dict[int, tuple[str, int]]:
    """tid -> (OS thread name, nice) for every thread of the process."""
    out = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        task = f"/proc/{pid}/task/{tid}"
        try:
            comm = Path(task, "comm").read_text().strip()
            stat = Path(task, "stat").read_text()
        except FileNotFoundError:  # the thread ended meanwhile
            continue
        out[int(tid)] = (comm, int(stat.rsplit(")", 1)[1].split()[16]))
    return out


def exercise(url: str) -> None:
    """One batch and one direct call, so that both kinds of thread have started and run a job."""
    assert httpx.post(url + "/double", json={"x": [[1, 2]]}, timeout=10).json() == [[2, 4]]
    assert httpx.post(url + "/double_direct", json={"x": [[1, 2]]}, timeout=10).json() == [[2, 4]]


def nice_by_kind(pid: int) -> dict[str, set[int]]:
    kinds: dict[str, set[int]] = {"loop": set(), "batch": set(), "request": set()}
    for tid, (comm, nice) in threads_of(pid).items():
        if tid == pid:
            kinds["loop"].add(nice)  # uvicorn runs the event loop on the main thread
        elif comm == "Batch-0-batch-0":
            kinds["batch"].add(nice)
        elif comm.startswith("Batched-0-"):
            kinds["request"].add(nice)
    assert all(kinds.values()), f"missing a kind of thread: {threads_of(pid)}"
    return kinds


@pytest.mark.skipif(not may_lower_nice(10), reason="needs CAP_SYS_NICE or RLIMIT_NICE (root has them)")
def test_batch_threads_run_ten_steps_above_the_rest_when_the_process_may_lower_nice(start_server) -> None:
    server = start_server("batched.py:Batched", cwd=SERVICES, env={"BATCH_DELAY": "0"})
    exercise(server.url)
    base = thread_nice()  # the server inherits this process's nice
    assert nice_by_kind(server.proc.pid) == {"loop": {base}, "request": {base}, "batch": {max(-20, base - 10)}}


def test_without_the_privilege_the_loop_and_request_threads_move_down_instead(start_server) -> None:
    if may_lower_nice(10):
        if os.geteuid() != 0 or shutil.which("setpriv") is None:
            pytest.skip("privileged, and cannot drop CAP_SYS_NICE for the server (needs root and setpriv)")
        prefix = DROP_SYS_NICE
    else:
        prefix = []  # already unprivileged: the server is too
    server = start_server("batched.py:Batched", cwd=SERVICES, env={"BATCH_DELAY": "0"}, prefix=prefix)
    exercise(server.url)
    base = thread_nice()
    assert nice_by_kind(server.proc.pid) == {"loop": {min(19, base + 10)}, "request": {min(19, base + 10)}, "batch": {base}}


def test_batch_priority_0_leaves_every_thread_alone(start_server) -> None:
    server = start_server("batched.py:Batched", cwd=SERVICES, env={"BATCH_DELAY": "0", "BENTO_LIKE_BATCH_PRIORITY": "0"})
    exercise(server.url)
    base = thread_nice()
    assert nice_by_kind(server.proc.pid) == {"loop": {base}, "request": {base}, "batch": {base}}


def test_a_bad_priority_setting_stops_pkg_serve_with_a_message_naming_it(start_server) -> None:
    server = start_server("batched.py:Batched", cwd=SERVICES, env={"BENTO_LIKE_BATCH_PRIORITY": "high"}, ready=False)
    assert server.proc.wait(60) == 1
    assert "Error: BENTO_LIKE_BATCH_PRIORITY must be an integer number of nice steps, got 'high'" in server.log()
    assert "Traceback" not in server.log()


def run_in_thread(fn) -> int:
    """Run fn on a fresh thread (whose nice may change for good) and return that thread's nice after it."""
    result: list[int] = []

    def body() -> None:
        fn()
        result.append(thread_nice())

    t = threading.Thread(target=body)
    t.start()
    t.join()
    return result[0]


def test_plan_targets_are_absolute_so_an_inherited_nice_does_not_add_up() -> None:
    base = thread_nice()
    plan = PriorityPlan(steps=3, favour_batches=False)
    assert plan.mode == "other threads down"

    def twice() -> None:
        plan.other_thread()
        plan.other_thread()

    assert run_in_thread(twice) == min(19, base + 3)
    assert run_in_thread(plan.batch_thread) == base  # this mode never touches batch threads
    assert PriorityPlan(steps=0).mode == "off"
    assert run_in_thread(PriorityPlan(steps=0, favour_batches=False).other_thread) == base


def test_settings_are_read_from_the_environment_and_validated() -> None:
    tuning = Tuning.from_env({})
    assert tuning.batch_priority == 10 and tuning.switch_interval_ms == 1.0
    assert Tuning.from_env({"BENTO_LIKE_BATCH_PRIORITY": "3"}).batch_priority == 3
    with pytest.raises(ValueError, match="BENTO_LIKE_BATCH_PRIORITY must be between 0 and 39"):
        Tuning.from_env({"BENTO_LIKE_BATCH_PRIORITY": "40"})
    with pytest.raises(ValueError, match="BENTO_LIKE_SWITCH_INTERVAL_MS must be a number of milliseconds, got 'fast'"):
        Tuning.from_env({"BENTO_LIKE_SWITCH_INTERVAL_MS": "fast"})
    with pytest.raises(ValueError, match="BENTO_LIKE_SWITCH_INTERVAL_MS must not be below 0"):
        Tuning.from_env({"BENTO_LIKE_SWITCH_INTERVAL_MS": "-1"})


def test_switch_interval_is_applied_and_0_keeps_pythons() -> None:
    before = sys.getswitchinterval()
    try:
        apply_switch_interval(2.5)
        assert sys.getswitchinterval() == pytest.approx(0.0025)
        apply_switch_interval(0)
        assert sys.getswitchinterval() == pytest.approx(0.0025)
    finally:
        sys.setswitchinterval(before)


def test_native_thread_names_shorten_the_service_name_and_keep_the_rest() -> None:
    assert native_thread_name("mlp-0-batch-0") == "mlp-0-batch-0"
    assert native_thread_name("Batched-0-batch-0") == "Batch-0-batch-0"
    assert native_thread_name("AVeryLongServiceName-12-3") == "AVeryLongS-12-3"
    assert native_thread_name("x-" + "y" * 20) == "y" * 15
    names: list[str] = []

    def body() -> None:
        name_native_thread("AVeryLongServiceName-3-batch-0")
        names.append(Path(f"/proc/self/task/{threading.get_native_id()}/comm").read_text().strip())

    t = threading.Thread(target=body)
    t.start()
    t.join()
    assert names == ["AVery-3-batch-0"]
