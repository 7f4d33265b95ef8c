"""CPU priority of the threads that run batches, and the interpreter's GIL switch interval.

Under load, a CPU instance's batch thread shares the cores with the event loop (parsing requests, encoding
responses) and, on a small machine, with everything else. Linux's scheduler gives runnable threads of equal
nice equal shares, so a batch of 30 ms that gets preempted for the loop's work finishes later, and every request
in it waits. Measured here (2 vCPUs, the 20M-parameter MLP of bench/batching.py at batch 64): a busy thread of
the same nice on the model's vCPU makes the batch take 61 ms instead of 27; a nice 19 one, 28 ms. Under 3x
overload the batch thread waited in the run queue for 10% of the time at equal nice and 4% at nice -10.

So the batch threads are favoured by ``Tuning.batch_priority`` nice steps (``BENTO_LIKE_BATCH_PRIORITY``, 10 by
default; 0 leaves every thread alone). Lowering a thread's nice needs CAP_SYS_NICE (root has it) or an RLIMIT_NICE that allows it;
without either (an image that runs as an unprivileged user, say), the same difference is made the other way:
the event loop's thread and the request threads are raised by that many steps instead, which any process may
do. Within a container (its own cgroup) only the difference between the process's threads matters, so both
give the batch thread the same share.

Linux only (nice is per thread there); elsewhere nothing changes.

The GIL switch interval (``Tuning.switch_interval_ms``, 1 ms by default; CPython's is 5 ms) bounds how long
a thread that holds the GIL keeps a waiting one out: the batch thread needs it between torch calls, the loop to
answer requests, and a shorter interval shortens both their waits under load.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
from typing import Any

log = logging.getLogger("bento_like.serving")

_CAP_SYS_NICE = 23  # bit in /proc/self/status CapEff


def apply_switch_interval(ms: float) -> None:
    """Set the interpreter's GIL switch interval to ``ms`` milliseconds; 0 keeps Python's own."""
    if ms:
        sys.setswitchinterval(ms / 1000)


def thread_nice() -> int:
    """The calling thread's nice value."""
    return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())


def may_lower_nice(steps: int) -> bool:
    """Whether this process may lower a thread's nice by ``steps`` (CAP_SYS_NICE, or RLIMIT_NICE allows it)."""
    if not hasattr(os, "setpriority") or not sys.platform.startswith("linux"):
        return False
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("CapEff:") and int(line.split()[1], 16) >> _CAP_SYS_NICE & 1:
                    return True
    except OSError:
        pass
    import resource

    soft, _ = resource.getrlimit(resource.RLIMIT_NICE)
    # RLIMIT_NICE n allows nice values down to 20 - n
    return soft == resource.RLIM_INFINITY or 20 - soft <= thread_nice() - steps


class PriorityPlan:
    """Which threads move, decided once per process: the batch threads up, or the others down."""

    def __init__(self, steps: int, favour_batches: bool | None = None) -> None:
        self.steps = steps
        linux = sys.platform.startswith("linux") and hasattr(os, "setpriority")
        if not linux:
            self.steps = 0
        self.favour_batches = may_lower_nice(self.steps) if favour_batches is None else favour_batches
        # Targets are absolute, from the nice of the thread that made the plan (the event loop's): a thread
        # that inherited a changed nice from the thread that started it still lands where it should.
        self.base = thread_nice() if linux else 0
        self._said = False

    @property
    def mode(self) -> str:
        if not self.steps:
            return "off"
        return "batch threads up" if self.favour_batches else "other threads down"

    def batch_thread(self) -> None:
        """Called on each batch thread as it starts (torch's intra-op threads, started from it, inherit it)."""
        if self.steps and self.favour_batches:
            self._set(self.base - self.steps)

    def other_thread(self) -> None:
        """Called on the event loop's thread, after the batch threads started (an unprivileged thread cannot
        lower its nice again, so they must not inherit the raised one), and on each request thread."""
        if self.steps and not self.favour_batches:
            self._set(self.base + self.steps)

    def _set(self, nice: int) -> None:
        tid = threading.get_native_id()
        target = max(-20, min(19, nice))
        if thread_nice() == target:
            return
        try:
            os.setpriority(os.PRIO_PROCESS, tid, target)
        except OSError as exc:  # e.g. a seccomp profile that forbids it: serve anyway, just unfavoured
            if not self._said:
                self._said = True
                log.warning("could not set thread priority (%s); batches share the CPU equally", exc)
