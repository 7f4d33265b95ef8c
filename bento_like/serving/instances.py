"""Service instances: built once each, on their device, with their models and dependencies, before ready.

An instance is the user's class constructed the way the runtime owns it: ``__new__``, then the model
references and ``depends(...)`` services filled in for that instance's device, then ``__init__``, then the
``@on_startup`` hooks. Shutdown hooks run in the reverse order.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import queue
import sys
import threading
import weakref
from contextvars import ContextVar
from dataclasses import dataclass
from time import monotonic
from typing import Any, Callable

from .._remote import local_object
from ..sdk.service import ServiceSpec, get_spec
from .dependencies import Dependencies
from .placement import compute_threads, plan_devices
from .priority import PriorityPlan, apply_switch_interval
from .tuning import Tuning

log = logging.getLogger("bento_like.serving")


_STOP = object()


@dataclass(frozen=True)
class AbandonedCall:
    """A call still running on a thread after the request that made it stopped waiting for it."""

    id: int  # the same while it runs
    name: str  # the function's name (an API's method name)
    seconds: float  # since it started


def _call_name(fn: Callable[..., Any], args: tuple[Any, ...]) -> str:
    # The runtime's wrappers (timing a call, a generator's next) pass the user's callable first.
    target = args[0] if args and hasattr(args[0], "__qualname__") else fn
    return getattr(target, "__name__", type(target).__name__)


def native_thread_name(name: str) -> str:
    """``name`` in Linux's 15 bytes: the service's name is shortened, the instance and kind of thread after
    it are kept (``Batched-0-batch-0`` becomes ``Batch-0-batch-0``)."""
    raw = name.encode()
    if len(raw) <= 15:
        return name
    head, sep, rest = name.partition("-")
    tail = (sep + rest).encode()
    if not sep or len(tail) >= 15:
        return raw[-15:].decode(errors="ignore")
    return head.encode()[: 15 - len(tail)].decode(errors="ignore") + sep + rest


def name_native_thread(name: str) -> None:
    """Give the calling thread's OS thread this name: what ``top -H``, ``ps -L`` and /proc show, so that the
    batch threads can be told from the request threads and the event loop when diagnosing load."""
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        libc = ctypes.CDLL(None)
        libc.prctl(15, ctypes.c_char_p(native_thread_name(name).encode()), 0, 0, 0)  # 15 = PR_SET_NAME
    except (OSError, AttributeError):  # no usable libc: the name is only a convenience
        pass


class ThreadRunner:
    """Runs an instance's sync methods on threads of its own and hands results back to the event loop.

    A thread takes every job waiting (up to ``drain``) in one wake-up, unless another thread is free to take
    them, and returns all their results in one ``call_soon_threadsafe``: under load that amortises the two
    thread switches a job costs with a plain executor (measured here: 20 us per call with ThreadPoolExecutor
    at 64 concurrent calls, 5 us with this).
    """

    def __init__(self, threads: int, name: str, drain: int = 8, initializer: Callable[[], None] | None = None) -> None:
        self.threads = threads
        self.name = name
        self.drain = drain
        self.initializer = initializer
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._workers: list[threading.Thread] = []
        self._idle: list[int] = []  # threads waiting for a job (list append/remove are atomic under the GIL)
        # what each thread runs now: (future, fn, args, start time); each thread writes only its own slot
        self._running: list[tuple[asyncio.Future[Any], Callable[..., Any], tuple[Any, ...], float] | None] = (
            [None] * threads
        )
        self._loop: asyncio.AbstractEventLoop | None = None

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        for i in range(self.threads):
            t = threading.Thread(target=self._work, args=(i,), name=f"{self.name}-{i}", daemon=True)
            t.start()
            self._workers.append(t)

    def stop(self) -> None:
        for _ in self._workers:
            self._queue.put(_STOP)

    def submit(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> asyncio.Future[Any]:
        assert self._loop is not None, "runner not started"
        fut = self._loop.create_future()
        self._queue.put((fut, fn, args, kwargs))
        return fut

    def abandoned(self) -> list[AbandonedCall]:
        """The calls running now whose future was cancelled (their deadline passed, their client went away):
        Python cannot stop a thread, so each holds its thread until it returns."""
        now = monotonic()
        return [
            AbandonedCall(id(job[0]), _call_name(job[1], job[2]), now - job[3])
            for job in list(self._running)
            if job is not None and job[0].done()
        ]

    def _work(self, index: int) -> None:
        name_native_thread(threading.current_thread().name)
        if self.initializer is not None:
            self.initializer()
        get, get_nowait, drain, idle = self._queue.get, self._queue.get_nowait, self.drain, self._idle
        running = self._running
        me = threading.get_ident()
        while True:
            idle.append(me)
            jobs = [get()]
            idle.remove(me)
            try:
                # More jobs only while no other thread is free to take them: a slow job must not hold back
                # the ones queued after it when another thread could run them now.
                while len(jobs) < drain and not idle:
                    jobs.append(get_nowait())
            except queue.Empty:
                pass
            done = []
            stop = False
            for job in jobs:
                if job is _STOP:
                    stop = True
                    continue
                fut, fn, args, kwargs = job
                if fut.cancelled():  # its deadline passed while it waited
                    continue
                running[index] = (fut, fn, args, monotonic())
                try:
                    done.append((fut, True, fn(*args, **kwargs)))
                except BaseException as exc:  # noqa: BLE001 - delivered to the awaiting request
                    done.append((fut, False, exc))
                running[index] = None
            if done:
                assert self._loop is not None
                try:
                    self._loop.call_soon_threadsafe(_deliver, done)
                except RuntimeError:  # the loop is closed: the server is gone
                    return
            if stop:
                return
            # Hold nothing of these calls while waiting for the next: a bound method kept here would keep a
            # replaced model's objects alive until this thread's next call.
            jobs = done = job = fn = args = kwargs = fut = None  # type: ignore[assignment]


def _deliver(done: list[tuple[asyncio.Future[Any], bool, Any]]) -> None:
    for fut, ok, value in done:
        if fut.done():
            continue
        if ok:
            fut.set_result(value)
        else:
            fut.set_exception(value)


class Generation:
    """The service object an instance serves with now, the stored model versions it was built with, and how
    many calls run on it: a model swap builds a new generation beside it and releases this one once idle."""

    __slots__ = ("obj", "models", "loaded", "label", "calls", "retired", "_idle", "__weakref__")

    def __init__(self, obj: Any, models: dict[str, Any], loaded: dict[str, Any]) -> None:
        self.obj = obj
        self.models = models  # attribute -> stored model (bento_like.models.Model) it holds
        self.loaded = loaded  # attribute -> what was loaded for it (shared with the next generation if unchanged)
        self.label = version_label(models)
        self.calls = 0
        self.retired = False
        self._idle: asyncio.Event | None = None

    def enter(self) -> None:
        self.calls += 1

    def leave(self) -> None:
        self.calls -= 1
        if not self.calls and self._idle is not None:
            self._idle.set()

    async def idle(self) -> None:
        """Return once no call runs on this generation (it is retired: no new call starts on it)."""
        self.retired = True
        if self.calls:
            self._idle = asyncio.Event()
            await self._idle.wait()

    def drop(self) -> list[Any]:
        """Forget the objects, so that the last reference to the old model is gone with this generation's;
        returns weak references to them, to tell whether they were freed."""
        refs = []
        for value in (self.obj, *self.loaded.values()):
            try:
                refs.append(weakref.ref(value))
            except TypeError:  # no weak reference to it (a builtin type): nothing to tell
                pass
        self.obj = None
        self.loaded = {}
        return refs


# The model version a request was served by, written where its call binds an instance's objects (directly or
# in a batch) and read when its response starts: a one-item list per request of a service that has models.
served_version: ContextVar[list[str] | None] = ContextVar("served_version", default=None)


def record_version(label: str) -> None:
    version = served_version.get()
    if version is not None:
        version[0] = label


def version_label(models: dict[str, Any]) -> str:
    """``iris:3f2c...`` (several models: comma-separated, in attribute order): what ``x-model-version`` says."""
    return ", ".join(m.tag for m in models.values())


class Instance:
    """One built object of the service class plus the objects of the services it depends on."""

    def __init__(self, spec: ServiceSpec, device: str, index: int = 0, threads: int = 4, compute_threads: int = 1,
                 remotes: Dependencies | None = None) -> None:
        self.spec = spec
        self.remotes = remotes or Dependencies(spec, None)  # without addresses: only url= dependencies are remote
        self.device = device
        self.index = index
        self.obj: Any = None  # always self.generation.obj (read on every call, so kept as a plain attribute)
        self.generation: Generation | None = None
        self._resumed: asyncio.Event | None = None  # set while a replace-mode swap holds this instance
        self.in_flight = 0
        self.compute_threads = compute_threads
        # the objects of the dependencies built in this process with their specs, in the order their startup
        # hooks ran; they live as long as the instance (a model swap rebuilds only the service's own object)
        self._started: list[tuple[ServiceSpec, Any]] = []
        self.priority: PriorityPlan | None = None  # set by the pool before its threads start
        self.runner = ThreadRunner(threads, f"{spec.name}-{index}", initializer=self._request_thread_init)
        # Batches run one at a time per instance, always on this one thread: the model's working set (its
        # BLAS library's per-thread buffers, the caches of the core it last ran on) stays warm between batches.
        self.batch_runner = ThreadRunner(1, f"{spec.name}-{index}-batch", drain=1, initializer=self._batch_thread_init)

    def _request_thread_init(self) -> None:
        if self.priority is not None:
            self.priority.other_thread()
        self.limit_threads()

    def _batch_thread_init(self) -> None:
        if self.priority is not None:
            self.priority.batch_thread()
        self.limit_threads()

    def limit_threads(self) -> None:
        """Cap torch's intra-op threads so that the instances of all workers share the cores, not fight."""
        torch = sys.modules.get("torch")
        if torch is not None and self.device == "cpu":
            torch.set_num_threads(self.compute_threads)

    def build(self, choose: dict[str, Any] | None = None) -> None:
        self.limit_threads()
        self.use(self.build_generation(choose or {}))
        self.limit_threads()  # the service may have imported torch just now

    def use(self, generation: Generation | None) -> None:
        """Serve with ``generation`` from the next call on (calls that started keep the one they started on)."""
        self.generation = generation
        self.obj = generation.obj if generation is not None else None

    def pause(self) -> None:
        """Take no new direct call until ``resume`` (a replace-mode swap releases the objects first)."""
        self._resumed = asyncio.Event()
        self.obj = None

    def resume(self) -> None:
        resumed, self._resumed = self._resumed, None
        if resumed is not None:
            resumed.set()

    async def serving(self) -> Generation:
        """The generation a call starts on now, once one serves (while paused, after the swap)."""
        while self._resumed is not None:
            await self._resumed.wait()
        assert self.generation is not None and self.obj is not None, "no model is loaded"
        return self.generation

    def build_generation(self, choose: dict[str, Any], reuse: Generation | None = None) -> Generation:
        """A new object of the service class, its ``__init__`` run: the attributes in ``choose`` get those stored
        versions, the others what ``reuse`` holds (the same loaded objects) or what their reference resolves to.
        The dependencies' objects are built the first time and shared by every later generation."""
        from ..sdk.model_ref import model_refs

        spec = self.spec
        obj = spec.cls.__new__(spec.cls)
        obj.__dict__["device"] = self.device
        for attr, dep in spec.dependencies.items():
            if reuse is not None and reuse.obj is not None and attr in reuse.obj.__dict__:
                obj.__dict__[attr] = reuse.obj.__dict__[attr]
            else:
                obj.__dict__[attr] = self._dependency(dep)
        models: dict[str, Any] = {}
        loaded: dict[str, Any] = {}
        for attr, ref in model_refs(spec.cls).items():
            stored = choose.get(attr)
            if stored is None and reuse is not None and attr in reuse.loaded:
                models[attr], loaded[attr] = reuse.models[attr], reuse.loaded[attr]
            else:
                models[attr] = stored = stored or ref.resolve()
                loaded[attr] = ref.materialize(stored, self.device)
            obj.__dict__[attr] = loaded[attr]
        obj.__init__()
        return Generation(obj, models, loaded)

    def _dependency(self, dep: Any) -> Any:
        # a client when the dependency runs as its own server (or lives at a URL), else built here
        value = self.remotes.client(dep)
        if value is None:
            value = local_object(self._construct(get_spec(dep.target)))
        return value if dep.mode is None else getattr(value, f"to_{dep.mode}")

    def _construct(self, spec: ServiceSpec) -> Any:
        from ..sdk.model_ref import model_refs

        obj = spec.cls.__new__(spec.cls)
        obj.__dict__["device"] = self.device
        for attr, dep in spec.dependencies.items():
            obj.__dict__[attr] = self._dependency(dep)
        for attr, ref in model_refs(spec.cls).items():
            obj.__dict__[attr] = ref.load(device=self.device)
        obj.__init__()
        self._started.append((spec, obj))
        return obj

    async def run_hooks(self, kind: str, generation: Generation | None = None, dependencies: bool = True) -> None:
        """The startup or shutdown hooks: the dependencies' first (startup) or last (shutdown), and the
        service's own object's (``generation``'s, by default the one serving)."""
        generation = generation or self.generation
        own = [(self.spec, generation.obj)] if generation is not None and generation.obj is not None else []
        deps = self._started if dependencies else []
        order = deps + own if kind == "startup" else own + list(reversed(deps))
        for spec, obj in order:
            for attr in spec.startup_hooks if kind == "startup" else spec.shutdown_hooks:
                hook = getattr(obj, attr)
                if inspect.iscoroutinefunction(hook):
                    await hook()
                else:  # like __init__, a sync hook may block: keep the event loop answering meanwhile
                    result = await asyncio.get_running_loop().run_in_executor(None, hook)
                    if inspect.isawaitable(result):
                        await result


class InstancePool:
    """The instances of the served service in this process, and which one takes the next request."""

    def __init__(self, spec: ServiceSpec, tuning: Tuning | None = None, workers: int = 1,
                 remotes: Dependencies | None = None) -> None:
        self.spec = spec
        self.tuning = tuning or Tuning()
        placement = self.tuning.placement
        self.devices = plan_devices(spec)
        compute = compute_threads(placement, self.devices, workers)
        threads = placement.request_threads
        self.instances = [Instance(spec, d, i, threads, compute, remotes) for i, d in enumerate(self.devices)]
        self._idle: asyncio.Queue[Instance] | None = None
        self._waiting: dict[object, int] = {}  # who waits for an instance now (the batchers), how many times

    async def acquire(self, owner: object = None) -> Instance:
        """Wait for an instance that runs no batch, and take it (batched APIs run one batch per instance)."""
        idle = self._idle_queue()
        self._waiting[owner] = self._waiting.get(owner, 0) + 1
        try:
            return await idle.get()
        finally:
            self._waiting[owner] -= 1
            if not self._waiting[owner]:
                del self._waiting[owner]

    def try_acquire(self) -> Instance | None:
        """An instance that runs no batch and that nobody waits for, taken now; None if there is none."""
        idle = self._idle_queue()
        if idle.empty() or self._waiting:
            return None
        return idle.get_nowait()

    def _idle_queue(self) -> asyncio.Queue[Instance]:
        if self._idle is None:  # made on first use: an asyncio.Queue belongs to the running loop
            self._idle = asyncio.Queue()
            for inst in self.instances:
                self._idle.put_nowait(inst)
        return self._idle

    def has_idle(self) -> bool:
        """Whether an instance runs no batch and nobody waits for one (what ``try_acquire`` would take)."""
        idle = self._idle_queue()
        return not idle.empty() and not self._waiting

    def others_waiting(self, owner: object) -> bool:
        """Whether anyone but ``owner`` waits for an instance."""
        return any(who is not owner for who in self._waiting)

    def release(self, instance: Instance) -> None:
        assert self._idle is not None
        self._idle.put_nowait(instance)

    async def start(self, choose: dict[str, Any] | None = None) -> None:
        """Start the threads and build every instance (``choose``: stored versions for some model attributes,
        the ones an earlier worker was switched to)."""
        loop = asyncio.get_running_loop()
        apply_switch_interval(self.tuning.switch_interval_ms)
        # Only a service with batched APIs has batch threads worth favouring.
        batched = any(entry.config.batchable for entry in self.spec.apis)
        priority = PriorityPlan(self.tuning.batch_priority) if batched else None
        for inst in self.instances:
            inst.priority = priority
            inst.batch_runner.start(loop)
        if priority is not None:
            log.debug("thread priority: %s by %d nice steps", priority.mode, priority.steps)
            priority.other_thread()  # this is the event loop's thread
        for inst in self.instances:
            inst.runner.start(loop)
        for inst in self.instances:
            # __init__ may load large models: keep the event loop free to answer /livez meanwhile.
            await loop.run_in_executor(None, inst.build, choose)
            await inst.run_hooks("startup")
            log.info("instance of %s ready on %s", self.spec.name, inst.device)

    async def stop(self) -> None:
        for inst in self.instances:
            try:
                await inst.run_hooks("shutdown")
            except Exception:
                log.exception("shutdown hook of %s failed", self.spec.name)
            inst.runner.stop()
            inst.batch_runner.stop()

    def pick(self) -> Instance:
        instances = self.instances
        if len(instances) == 1:
            return instances[0]
        return min(instances, key=lambda i: i.in_flight)
