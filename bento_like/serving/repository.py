"""Changing the model versions a running server serves: load beside, check, swap between batches, release.

A *slot* is one stored model the served service references (``bl.model("iris:latest")``), named as in the
store. Loading a version into it, on every instance: build a new object of the service class with that version
(the other models' loaded objects are shared, not reloaded), run its startup hooks, call each API once on it
with an example input, compare what it returns with what the serving object returns on the same input (and,
when asked, a quality metric), then make every instance serve with the new objects in one step on the event
loop. A batch binds the object it runs on when it is formed, so no batch mixes versions; calls that started on
the old objects finish on them; then the old objects' shutdown hooks run and they are dropped. Any failure
before the swap leaves the old version serving and is the answer's reason.

With ``--workers N`` every worker runs the same operation: the one that took the request writes it to the
supervisor's control directory, each worker prepares it, and the swap happens only if all prepared it (a
two-phase commit over files); the versions chosen are kept there, so workers started later (a restart, a
rolling reload) load the same ones.
"""

from __future__ import annotations

import asyncio
import gc
import hmac
import json
import logging
import os
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

import numpy as np
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from .. import _fidelity
from ..models import ModelNotFoundError, ModelStoreError, default_store, parse_tag
from .errors import HTTPError
from .instances import Generation

if TYPE_CHECKING:
    from ..models import Model
    from ..sdk.model_ref import ModelRef
    from .app import ServerState
    from .routes import APIEndpoint

log = logging.getLogger("bento_like.serving")

READY, LOADING, UNLOADING, UNAVAILABLE = "READY", "LOADING", "UNLOADING", "UNAVAILABLE"
PINS_FILE = "pins.json"
CONTROL_POLL_S = 0.05
PREPARE_TIMEOUT_S = 600.0  # a worker that neither prepares nor fails in this long is taken as failed


class LoadFailed(Exception):
    """A load or unload that did not happen; ``status`` is the HTTP answer, the message its reason."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


@dataclass
class Slot:
    """One stored model the service references: its attributes, what state it is in, why."""

    name: str
    attrs: list[str]
    ref: ModelRef
    state: str = READY
    reason: str = ""
    pinned: str | None = None  # the version chosen through the API or the watcher; None: the reference's tag


@dataclass
class Check:
    """What a load verifies before the swap: each API's output against the serving version's, and a metric."""

    metric: str | None = None  # cosine, max_abs or argmax
    min: float | None = None
    max: float | None = None

    @classmethod
    def parse(cls, raw: Any) -> Check | None:
        if raw is None:
            return None
        if not isinstance(raw, dict) or set(raw) - {"metric", "min", "max"}:
            raise LoadFailed("parameters.quality must be an object with metric and min or max, e.g. "
                             '{"metric": "cosine", "min": 0.99}')
        metric = raw.get("metric", "cosine")
        if metric not in ("cosine", "max_abs", "argmax"):
            raise LoadFailed(f"parameters.quality.metric must be cosine, max_abs or argmax, got {metric!r}")
        low, high = raw.get("min"), raw.get("max")
        for key, value in (("min", low), ("max", high)):
            if value is not None and (not isinstance(value, (int, float)) or isinstance(value, bool)):
                raise LoadFailed(f"parameters.quality.{key} must be a number, got {value!r}")
        if (low is None) == (high is None):
            if low is None and high is None:
                low, high = (None, 1e-2) if metric == "max_abs" else (0.99, None)
            else:
                raise LoadFailed("parameters.quality takes min or max, not both")
        return cls(metric, low, high)


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


@dataclass
class _Prepared:
    """New generations built for a load, one per instance, not yet serving."""

    slot: Slot
    stored: Model | None
    generations: list[Generation] = field(default_factory=list)


class ModelRepository:
    """The slots of one server process and the operations on them, one at a time."""

    def __init__(self, state: ServerState) -> None:
        self.state = state
        self.slots: dict[str, Slot] = {}
        for attr, ref in state.spec.model_refs().items():
            name = parse_tag(ref.tag)[0]
            if name in self.slots:
                self.slots[name].attrs.append(attr)
            else:
                self.slots[name] = Slot(name, [attr], ref)
        self.versioned = bool(self.slots)
        self._lock = asyncio.Lock()
        tuning = state.tuning.updates
        self.swap_mode = tuning.swap_mode
        self.control = Path(state.control_dir) if state.control_dir else None
        self.workers = state.workers
        self.worker_id = state.worker_id or "0"
        self._seen: set[str] = set()

    # -- what serves now ------------------------------------------------------------------------------------

    def serving(self, slot: Slot) -> list[str]:
        """The versions of ``slot`` the instances serve with now (one, except during a swap in another process)."""
        versions = []
        for inst in self.state.pool.instances:
            gen = inst.generation
            if gen is not None and gen.obj is not None:
                version = gen.models[slot.attrs[0]].version
                if version not in versions:
                    versions.append(version)
        return versions

    def index(self, ready_only: bool = False) -> list[dict[str, Any]]:
        """The repository index: each slot with its serving version and state (Triton's fields)."""
        rows = []
        for slot in self.slots.values():
            versions = self.serving(slot) or [slot.pinned or ""]
            state = slot.state
            if ready_only and state != READY:
                continue
            rows.append({"name": slot.name, "version": versions[0], "state": state, "reason": slot.reason})
        return rows

    def version_ready(self, name: str, version: str) -> bool | None:
        """Whether ``version`` (or a unique prefix of it) of ``name`` serves on every instance; None when the
        service has no model of that name."""
        slot = self.slots.get(name)
        if slot is None:
            return None
        serving = self.serving(slot)
        return slot.state == READY and len(serving) == 1 and serving[0].startswith(version) and bool(version)

    def initial_choice(self) -> dict[str, Any]:
        """The stored versions the instances are first built with: those pinned by an earlier worker (in the
        control directory), else each reference's own tag."""
        pins = self._read_pins()
        if self.control is not None:  # the operations before this point are in the pins already
            self._seen.update(p.stem for p in self.control.glob("op-*.json"))
        choose: dict[str, Any] = {}
        for name, version in pins.items():
            slot = self.slots.get(name)
            if slot is None:
                continue
            try:
                stored = default_store().get(f"{name}:{version}")
            except ModelStoreError as exc:
                log.warning("model %s:%s chosen earlier is not in the store (%s); serving %s", name, version, exc,
                            slot.ref.tag)
                continue
            slot.pinned = version
            for attr in slot.attrs:
                choose[attr] = stored
        return choose

    # -- operations -----------------------------------------------------------------------------------------

    async def request(self, kind: str, name: str, version: str | None, quality: Any,
                      pin: bool = True) -> dict[str, Any]:
        """Run a load or unload asked for over the API: here only, or in every worker (``--workers N``)."""
        if name not in self.slots:
            known = ", ".join(sorted(self.slots)) or "none"
            raise LoadFailed(f"service {self.state.spec.name!r} uses no model {name!r} (its models: {known})", 404)
        if version is not None and not isinstance(version, str):
            raise LoadFailed(f"parameters.version must be a string such as '{name}:<version>', got {version!r}")
        Check.parse(quality)  # a bad one is refused before any worker starts
        op = Operation(uuid.uuid4().hex[:12], kind, name, version, quality, self.workers, pin)
        if self.control is None or self.workers <= 1:
            return await self.run(op)
        return await self._coordinate(op)

    async def run(self, op: Operation) -> dict[str, Any]:
        """Prepare and commit ``op`` in this process."""
        async with self._lock:
            prepared = await self.prepare(op)
            return await self.commit(op, prepared)

    async def prepare(self, op: Operation) -> _Prepared | None:
        """Everything up to the swap: for a load, the new generations built, started and checked. None: nothing
        to do (that version already serves, or the model is already unloaded)."""
        slot = self.slots[op.name]
        if op.kind == "unload":
            return None if slot.state == UNAVAILABLE else _Prepared(slot, None)
        stored = self._resolve(slot, op.version)
        if slot.state == READY and self.serving(slot) == [stored.version]:
            return None
        self._check_signature(slot, stored)
        if self.swap_mode == "beside" and slot.state == READY:
            self._check_memory(stored)
        prepared = _Prepared(slot, stored)
        if self.swap_mode == "replace" and slot.state == READY:
            return prepared  # built in commit, one instance at a time, after its old objects are released
        previous, slot.state, slot.reason = slot.state, LOADING, ""
        try:
            await self._build(prepared)
            await self._check(prepared, Check.parse(op.quality))
        except Exception as exc:
            await self._discard(prepared)
            slot.state = previous
            raise LoadFailed(_reason(stored, exc)) from None
        return prepared

    async def abort(self, prepared: _Prepared | None) -> None:
        if prepared is not None:
            await self._discard(prepared)
            if prepared.slot.state == LOADING:
                prepared.slot.state = READY if self.serving(prepared.slot) else UNAVAILABLE

    async def commit(self, op: Operation, prepared: _Prepared | None) -> dict[str, Any]:
        slot = self.slots[op.name]
        if prepared is None:
            return self._answer(slot, "no change")
        if op.kind == "unload":
            await self._unload(slot)
            return self._answer(slot, "unloaded")
        assert prepared.stored is not None
        if not prepared.generations:  # replace mode
            await self._replace(prepared)
        else:
            self._swap(prepared)
        slot.pinned = prepared.stored.version if op.pin else None
        self._write_pins()
        return self._answer(slot, "loaded")

    def _answer(self, slot: Slot, outcome: str) -> dict[str, Any]:
        versions = self.serving(slot)
        return {"name": slot.name, "version": versions[0] if versions else "", "state": slot.state,
                "outcome": outcome}

    # -- the steps --------------------------------------------------------------------------------------------

    def _resolve(self, slot: Slot, version: str | None) -> Model:
        """The stored model a load means: ``name:version``, a bare version, another tag (``latest``), or,
        without one, what the reference's own tag resolves to now."""
        tag = version if version else slot.ref.tag
        if ":" not in tag:
            tag = f"{slot.name}:{tag}"
        name = parse_tag(tag)[0] if _valid_tag(tag) else None
        if name != slot.name:
            raise LoadFailed(f"parameters.version {version!r} is not a version of model {slot.name!r}; give "
                             f"'{slot.name}:<version>' or a bare version")
        try:
            return default_store().get(tag)
        except ModelNotFoundError as exc:
            raise LoadFailed(f"cannot load {tag}: {exc}", 404) from None
        except ModelStoreError as exc:
            raise LoadFailed(f"cannot load {tag}: {exc}") from None

    def _check_signature(self, slot: Slot, stored: Model) -> None:
        """A new version whose recorded inputs or outputs differ from the serving one's is refused before it is
        loaded: the service's code was written for the old ones."""
        current = self._serving_model(slot)
        if current is None or not current.info.signatures or not stored.info.signatures:
            return
        old, new = current.info.signatures[0], stored.info.signatures[0]
        for kind in ("inputs", "outputs"):
            was = [(t.name, t.dtype, list(t.shape)) for t in getattr(old, kind)]
            now = [(t.name, t.dtype, list(t.shape)) for t in getattr(new, kind)]
            if was != now:
                raise LoadFailed(f"cannot load {stored.tag}: its signature's {kind} are {_tensors(now)}, those of "
                                 f"the serving {current.tag} {_tensors(was)}")

    def _serving_model(self, slot: Slot) -> Model | None:
        for inst in self.state.pool.instances:
            if inst.generation is not None and inst.generation.obj is not None:
                return inst.generation.models[slot.attrs[0]]
        return None

    def _check_memory(self, stored: Model) -> None:
        """Beside mode holds both versions at once on each instance's device: refuse when the new one's size
        (on disk: what its weights take loaded, near enough) does not fit in what the device has free."""
        need: dict[str, int] = {}
        for inst in self.state.pool.instances:
            need[inst.device] = need.get(inst.device, 0) + stored.info.size
        for device, size in need.items():
            free = free_memory(device)
            if free is not None and size > free:
                raise LoadFailed(
                    f"cannot load {stored.tag} beside the serving version: it needs about {_mib(size)} on {device} "
                    f"and {_mib(free)} is free; serve with --swap-mode replace to release the old version first "
                    "(each instance pauses while it loads)", 409)

    async def _build(self, prepared: _Prepared) -> None:
        loop = asyncio.get_running_loop()
        choose = {attr: prepared.stored for attr in prepared.slot.attrs}
        for inst in self.state.pool.instances:
            reuse = inst.generation if inst.generation is not None and inst.generation.obj is not None else None
            gen = await loop.run_in_executor(None, inst.build_generation, choose, reuse)
            prepared.generations.append(gen)
            await inst.run_hooks("startup", gen, dependencies=False)

    async def _check(self, prepared: _Prepared, check: Check | None) -> None:
        """Call each API once on every new generation with an example input (a warm-up), and compare the first
        instance's answers with what the serving generation gives on the same input."""
        for ep in self.state.endpoints:
            if ep.is_gen or ep.is_async_gen:
                continue
            kwargs = example_input(self.state, ep)
            if kwargs is None:
                log.info("API %r has no example input (no warmup= and no request served yet): the new version "
                         "is not called before it serves it", ep.name)
                continue
            for i, (inst, gen) in enumerate(zip(self.state.pool.instances, prepared.generations)):
                new = await _call(ep, inst, gen, kwargs)
                old_gen = inst.generation
                if i or old_gen is None or old_gen.obj is None:
                    continue
                old = await _call(ep, inst, old_gen, kwargs)
                was, now = _structure(old), _structure(new)
                if was != now:
                    assert prepared.stored is not None
                    raise LoadFailed(f"API {ep.name!r} answers {_show(now)} with {prepared.stored.tag}, and "
                                     f"{_show(was)} with the serving {old_gen.label}, on the same input")
                if check is not None:
                    _quality(ep.name, check, old, new)

    def _swap(self, prepared: _Prepared) -> None:
        """Every instance serves with its new generation from now on: one synchronous step on the loop."""
        old = []
        for inst, gen in zip(self.state.pool.instances, prepared.generations):
            if inst.generation is not None:
                old.append((inst, inst.generation))
            inst.use(gen)
        prepared.slot.state, prepared.slot.reason = READY, ""
        self.state.serving_again()
        log.info("model %s now serves %s", prepared.slot.name, prepared.generations[0].label)
        asyncio.get_running_loop().create_task(self._release(old))

    async def _release(self, old: list[tuple[Any, Generation]]) -> None:
        refs: list[Any] = []
        for inst, gen in old:
            await gen.idle()
            try:
                await inst.run_hooks("shutdown", gen, dependencies=False)
            except Exception:
                log.exception("a shutdown hook of the replaced %s object failed", self.state.spec.name)
            refs += gen.drop()
        _collect(refs)

    async def _replace(self, prepared: _Prepared) -> None:
        """Replace mode: per instance, take it out of service (it finishes its batch), release its objects, load
        the new version, serve again; requests wait for it meanwhile. A failure puts the old version back."""
        slot, stored = prepared.slot, prepared.stored
        assert stored is not None
        loop = asyncio.get_running_loop()
        pool = self.state.pool
        choose = {attr: stored for attr in slot.attrs}
        slot.state = LOADING
        todo = list(pool.instances)
        while todo:
            # the pool hands out whichever instance is idle first: one already replaced is held aside
            # (not handed out again) until the next is done
            inst = await pool.acquire(self)
            held = [inst]
            while inst not in todo:
                inst = await pool.acquire(self)
                held.append(inst)
            todo.remove(inst)
            try:
                await self._replace_one(inst, slot, stored, choose, loop)
            finally:
                for each in held:
                    pool.release(each)
        slot.state = READY
        log.info("model %s now serves %s (replaced in place)", slot.name, stored.tag)

    async def _replace_one(self, inst: Any, slot: Slot, stored: Model, choose: dict[str, Any],
                           loop: asyncio.AbstractEventLoop) -> None:
        old = inst.generation
        assert old is not None
        inst.pause()
        try:
            await old.idle()
            await inst.run_hooks("shutdown", old, dependencies=False)
            back = {attr: old.models[attr] for attr in slot.attrs}
            # what the new objects share with the old: the other models, and the dependencies' objects
            deps = SimpleNamespace(**{a: old.obj.__dict__[a] for a in self.state.spec.dependencies
                                      if a in old.obj.__dict__})
            shared = Generation(deps, old.models, {a: v for a, v in old.loaded.items() if a not in slot.attrs})
            refs = old.drop()
            del old
            _collect([ref for ref in refs if ref() is not None and not _shared(ref(), shared)])
            try:
                gen = await loop.run_in_executor(None, inst.build_generation, choose, shared)
                await inst.run_hooks("startup", gen, dependencies=False)
            except Exception as exc:
                gen = await loop.run_in_executor(None, inst.build_generation, back, shared)
                await inst.run_hooks("startup", gen, dependencies=False)
                inst.use(gen)
                slot.state = READY
                raise LoadFailed(_reason(stored, exc)) from None
            inst.use(gen)
        finally:
            inst.resume()

    async def _unload(self, slot: Slot) -> None:
        """Stop taking requests, let those accepted finish, then release every instance's objects."""
        state = self.state
        slot.state = UNLOADING
        state.unavailable = (f"model {slot.name!r} is unloaded; POST /v2/repository/models/{slot.name}/load "
                             "loads it again")
        state.ready = False
        refs: list[Any] = []
        deadline = time.monotonic() + state.timeout
        while state.load.in_flight and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        for inst in state.pool.instances:
            gen = inst.generation
            inst.use(None)
            if gen is not None:
                await gen.idle()
                try:
                    await inst.run_hooks("shutdown", gen, dependencies=False)
                except Exception:
                    log.exception("a shutdown hook of %s failed while unloading", state.spec.name)
                refs += gen.drop()
            gen = None
        slot.state, slot.reason = UNAVAILABLE, "unloaded"
        _collect(refs)
        log.info("model %s unloaded: the service's APIs answer 503 until it is loaded again", slot.name)

    async def _discard(self, prepared: _Prepared) -> None:
        refs: list[Any] = []
        for inst, gen in zip(self.state.pool.instances, prepared.generations):
            try:
                await inst.run_hooks("shutdown", gen, dependencies=False)
            except Exception:
                log.exception("a shutdown hook of a discarded %s object failed", self.state.spec.name)
            refs += gen.drop()
        prepared.generations.clear()
        _collect(refs)

    # -- several workers ------------------------------------------------------------------------------------

    async def _coordinate(self, op: Operation) -> dict[str, Any]:
        """Write ``op`` for every worker, wait until each prepared it or failed, then commit or abort it."""
        assert self.control is not None
        _write(self.control / f"op-{op.id}.json", op.encode())
        deadline = time.monotonic() + PREPARE_TIMEOUT_S
        results: dict[str, dict[str, Any]] = {}
        while len(results) < op.expected and time.monotonic() < deadline:
            await asyncio.sleep(CONTROL_POLL_S)
            for path in self.control.glob(f"prepared-{op.id}-*.json"):
                try:
                    results[path.stem.rsplit("-", 1)[1]] = json.loads(path.read_text())
                except (OSError, ValueError):
                    continue
        failures = [r for r in results.values() if not r.get("ok")]
        decision = "commit" if len(results) == op.expected and not failures else "abort"
        _write(self.control / f"{decision}-{op.id}", b"")
        if decision == "abort":
            if failures:
                raise LoadFailed(failures[0]["reason"], failures[0].get("status", 400))
            raise LoadFailed(f"only {len(results)} of {op.expected} workers prepared the {op.kind} of {op.name} "
                             f"within {PREPARE_TIMEOUT_S:g} s; nothing changed", 503)
        done: dict[str, Any] = {}
        while time.monotonic() < deadline:
            done_files = list(self.control.glob(f"done-{op.id}-*.json"))
            if len(done_files) >= op.expected:
                done = json.loads(done_files[0].read_text())
                break
            await asyncio.sleep(CONTROL_POLL_S)
        return done or self._answer(self.slots[op.name], "committed")

    async def follow_control(self) -> None:
        """Every worker: take the operations written to the control directory, prepare each, wait for the
        decision, commit or abort it."""
        assert self.control is not None
        while not self.state.ready:  # an operation written meanwhile is taken once the instances are built
            if self.state.failure:
                return
            await asyncio.sleep(CONTROL_POLL_S)
        while True:
            await asyncio.sleep(CONTROL_POLL_S)
            for path in sorted(self.control.glob("op-*.json"), key=_mtime):
                if path.stem in self._seen:
                    continue
                self._seen.add(path.stem)
                try:
                    op = Operation(**json.loads(path.read_text()))
                except (OSError, ValueError, TypeError):
                    continue
                await self._take(op)

    async def _take(self, op: Operation) -> None:
        assert self.control is not None
        async with self._lock:
            mine = self.control / f"prepared-{op.id}-{self.worker_id}.json"
            try:
                prepared = await self.prepare(op)
            except LoadFailed as exc:
                _write(mine, json.dumps({"ok": False, "reason": str(exc), "status": exc.status}).encode())
                return
            except Exception as exc:  # noqa: BLE001 - reported to the worker that waits for the answer
                log.exception("preparing %s of %s failed", op.kind, op.name)
                _write(mine, json.dumps({"ok": False, "reason": f"{type(exc).__name__}: {exc}"}).encode())
                return
            _write(mine, json.dumps({"ok": True}).encode())
            while True:
                if (self.control / f"commit-{op.id}").exists():
                    answer = await self.commit(op, prepared)
                    _write(self.control / f"done-{op.id}-{self.worker_id}.json", json.dumps(answer).encode())
                    return
                if (self.control / f"abort-{op.id}").exists():
                    await self.abort(prepared)
                    return
                await asyncio.sleep(CONTROL_POLL_S)

    def _read_pins(self) -> dict[str, str]:
        if self.control is None:
            return {}
        try:
            return json.loads((self.control / PINS_FILE).read_text())
        except (OSError, ValueError):
            return {}

    def _write_pins(self) -> None:
        if self.control is None:
            return
        pins = {name: slot.pinned for name, slot in self.slots.items() if slot.pinned}
        _write(self.control / PINS_FILE, json.dumps(pins).encode())

    # -- watch mode -------------------------------------------------------------------------------------------

    async def watch(self, interval: float) -> None:
        """Poll the store: when a reference's tag (``latest``) resolves to another version than the one serving,
        load it, unless that version was pinned over the API (a pin holds until the next load)."""
        failed: dict[str, str] = {}  # a version that failed to load is not tried again until the tag moves on
        while True:
            await asyncio.sleep(interval)
            if not self.state.ready and not self.state.unavailable:
                continue
            for slot in self.slots.values():
                if slot.pinned or slot.state != READY:
                    continue
                try:
                    stored = await asyncio.get_running_loop().run_in_executor(None, default_store().get, slot.ref.tag)
                except ModelStoreError:
                    continue
                if self.serving(slot) == [stored.version] or failed.get(slot.name) == stored.version:
                    continue
                log.info("model %s: %s now resolves to %s; loading it", slot.name, slot.ref.tag, stored.version)
                try:
                    await self.request("load", slot.name, stored.version, None, pin=False)
                except LoadFailed as exc:
                    failed[slot.name] = stored.version
                    slot.reason = str(exc)
                    log.error("watch: %s", exc)


def example_input(state: ServerState, ep: APIEndpoint) -> dict[str, Any] | None:
    """An input to call ``ep`` with before a new version serves: its warm-up input when it declares one (or one
    made from the model's signature), else the last input it served."""
    plan = state.warmups.get(ep.name)
    if plan is not None:
        try:
            kwargs = plan.complete(state.spec, ep)
            if plan.made_up and ep.codec.rich is not None:
                kwargs = ep.codec.rich.convert(dict(kwargs))
            return kwargs
        except Exception:  # noqa: BLE001 - fall back to a served input
            log.debug("no warm-up input for %r", ep.name, exc_info=True)
    if ep.context is not None or (ep.codec.rich is not None and ep.codec.rich.paths):
        return None  # its request context and its uploaded files were released with its response
    return ep.last_input


async def _call(ep: APIEndpoint, inst: Any, gen: Generation, kwargs: dict[str, Any]) -> Any:
    method = getattr(gen.obj, ep.attr)
    if ep.config.batchable:
        value = kwargs[ep.config.params[0]]
        return await (method(value) if ep.is_async else inst.runner.submit(method, value))
    return await (method(**kwargs) if ep.is_async else inst.runner.submit(method, **kwargs))


def _structure(value: Any) -> Any:
    """What must not change between versions: types, array shapes and dtypes, keys, lengths."""
    if isinstance(value, np.ndarray):
        return ("array", value.shape, value.dtype.str)
    if hasattr(value, "shape") and hasattr(value, "dtype"):  # a framework tensor
        return (type(value).__name__, tuple(value.shape), str(value.dtype))
    if isinstance(value, dict):
        return {k: _structure(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return (type(value).__name__, len(value), _structure(value[0]) if value else None)
    return type(value).__name__


def _show(s: Any) -> str:
    if isinstance(s, tuple) and len(s) == 3 and s[0] == "array":
        return f"an array of shape {s[1]} ({np.dtype(s[2]).name})"
    return repr(s)


def _quality(api: str, check: Check, old: Any, new: Any) -> None:
    ref, cand = _first_array(old), _first_array(new)
    if ref is None or cand is None:
        raise LoadFailed(f"parameters.quality: API {api!r} returns no array to compare")
    ref, cand = ref.reshape(len(ref), -1) if ref.ndim else ref.reshape(1, 1), cand.reshape(len(cand), -1) if cand.ndim else cand.reshape(1, 1)
    if check.metric == "cosine":
        value = float(_fidelity.cosine(ref, cand).mean())
    elif check.metric == "max_abs":
        value = _fidelity.max_abs(ref, cand)
    else:
        agreement = _fidelity.argmax_agreement(ref, cand)
        if agreement is None:
            raise LoadFailed(f"parameters.quality: argmax needs an output with a last axis of 2 or more ({api!r})")
        value = agreement
    passed = (check.min is None or value >= check.min) and (check.max is None or value <= check.max)
    if not passed or not np.isfinite(value):
        bound = f">= {check.min}" if check.min is not None else f"<= {check.max}"
        raise LoadFailed(f"quality check failed on API {api!r}: {check.metric} {value:.6g}, must be {bound}")


def _first_array(value: Any) -> np.ndarray | None:
    if isinstance(value, np.ndarray):
        return value.astype(np.float64) if value.dtype.kind in "biuf" else None
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, (list, tuple)) and value:
        if isinstance(value[0], np.ndarray):
            return _first_array(value[0])
        try:
            return np.asarray(value, dtype=np.float64)
        except (TypeError, ValueError):
            return None
    return None


def _reason(stored: Model | None, exc: BaseException) -> str:
    if isinstance(exc, LoadFailed):
        return str(exc)
    what = stored.tag if stored is not None else "the model"
    return f"cannot load {what}: {type(exc).__name__}: {exc}"


def _tensors(tensors: list[tuple[str, str, list[int]]]) -> str:
    return ", ".join(f"{name} {dtype}{shape}" for name, dtype, shape in tensors) or "none"


def _valid_tag(tag: str) -> bool:
    try:
        parse_tag(tag)
    except ValueError:
        return False
    return True


def _shared(value: Any, generation: Generation) -> bool:
    return any(value is kept for kept in generation.loaded.values())


def _mib(size: int) -> str:
    return f"{size / 2**20:.0f} MiB"


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0


def _write(path: Path, data: bytes) -> None:
    scratch = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    scratch.write_bytes(data)
    os.replace(scratch, path)


def _collect(refs: list[Any]) -> None:
    """Free the released objects now. Most are freed as their last reference goes; those in reference cycles
    need the collector, and those made before startup froze the heap (app._freeze_heap) are out of its reach
    unless the heap is thawed: a full collection of the whole heap, a pause of the event loop, paid only then."""
    if all(ref() is None for ref in refs):
        return
    gc.collect()
    if any(ref() is not None for ref in refs) and gc.get_freeze_count():
        gc.unfreeze()
        gc.collect()
        gc.freeze()


def free_memory(device: str) -> int | None:
    """Bytes free for a new model on ``device``: a GPU's free memory, else the host's available memory
    (bounded by the cgroup's limit, in a container); None when it cannot be told."""
    if device.startswith("cuda"):
        import sys

        torch = sys.modules.get("torch")
        if torch is None:
            return None
        index = int(device.partition(":")[2] or 0)
        return int(torch.cuda.mem_get_info(index)[0])
    available = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                available = int(line.split()[1]) * 1024
    except OSError:
        return None
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        used = int(Path("/sys/fs/cgroup/memory.current").read_text())
        if limit != "max" and available is not None:
            available = min(available, int(limit) - used)
    except (OSError, ValueError):
        pass
    return available


# -- the HTTP API -------------------------------------------------------------------------------------------


def repository_routes(state: ServerState, repository: ModelRepository) -> list[Route]:
    """``POST /v2/repository/index``, ``.../models/{name}/load`` and ``.../unload`` (the Open Inference
    Protocol's model repository extension, with Triton's semantics), each behind the admin bearer token."""
    token = state.tuning.updates.admin_token.encode()

    def authorize(request: Request) -> None:
        given = request.headers.get("authorization", "")
        scheme, _, value = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(value.strip().encode(), token):
            raise HTTPError(401, "the repository API needs the admin token: send 'Authorization: Bearer <token>'",
                            headers={"WWW-Authenticate": 'Bearer realm="bento_like repository"'})

    async def body(request: Request) -> dict[str, Any]:
        raw = await request.body()
        if not raw.strip():
            return {}
        try:
            value = json.loads(raw)
        except ValueError as exc:
            raise HTTPError(400, f"the request body is not JSON: {exc}") from None
        if not isinstance(value, dict):
            raise HTTPError(400, "the request body must be a JSON object")
        return value

    async def index(request: Request) -> Response:
        authorize(request)
        ready = (await body(request)).get("ready", False)
        if not isinstance(ready, bool):
            raise HTTPError(400, f"field 'ready' must be true or false, got {ready!r}", field="$.ready")
        return JSONResponse(repository.index(ready_only=ready))

    async def operate(request: Request, kind: str) -> Response:
        authorize(request)
        payload = await body(request)
        parameters = payload.get("parameters", {})
        if not isinstance(parameters, dict):
            raise HTTPError(400, "field 'parameters' must be an object", field="$.parameters")
        version, quality = parameters.get("version"), parameters.get("quality")
        config = parameters.get("config")  # tritonclient's load_model(config=...) sends a JSON string
        if isinstance(config, str):
            try:
                config = json.loads(config)
            except ValueError:
                raise HTTPError(400, "parameters.config is not JSON", field="$.parameters.config") from None
        if isinstance(config, dict):
            version = config.get("version", version)
            quality = config.get("quality", quality)
        try:
            answer = await repository.request(kind, request.path_params["name"], version, quality)
        except LoadFailed as exc:
            raise HTTPError(exc.status, str(exc)) from None
        return JSONResponse(answer)

    async def load(request: Request) -> Response:
        return await operate(request, "load")

    async def unload(request: Request) -> Response:
        return await operate(request, "unload")

    return [
        Route("/v2/repository/index", index, methods=["POST"]),
        Route("/v2/repository/models/{name}/load", load, methods=["POST"]),
        Route("/v2/repository/models/{name}/unload", unload, methods=["POST"]),
    ]
