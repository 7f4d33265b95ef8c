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
import logging
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any


from ..models import ModelNotFoundError, ModelStoreError, default_store, parse_tag
from .instances import Generation
from .repository_control import ControlDir, Operation
from .swap_checks import (
    Check,
    LoadFailed,
    call_on,
    check_quality,
    example_input,
    free_memory,
    load_failure,
    same_structure,
    show,
    structure,
    tensors,
)

if TYPE_CHECKING:
    from ..models import Model
    from ..sdk.model_ref import ModelRef
    from .app import ServerState

log = logging.getLogger("bento_like.serving")

READY, LOADING, UNLOADING, UNAVAILABLE = "READY", "LOADING", "UNLOADING", "UNAVAILABLE"


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
        self.lock = asyncio.Lock()
        tuning = state.tuning.updates
        self.swap_mode = tuning.swap_mode
        self.control = ControlDir(Path(state.control_dir), self) if state.control_dir else None
        self.workers = state.workers

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
        """Whether ``version`` (or a prefix of it) of ``name`` serves on every instance; None when the service has
        no model of that name."""
        slot = self.slots.get(name)
        if slot is None:
            return None
        serving = self.serving(slot)
        return slot.state == READY and len(serving) == 1 and serving[0].startswith(version) and bool(version)

    def initial_choice(self) -> dict[str, Any]:
        """The stored versions the instances are first built with: those pinned by an earlier worker (in the
        control directory), else each reference's own tag."""
        pins = self.control.read_pins() if self.control is not None else {}
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
        return await self.control.coordinate(op)

    async def run(self, op: Operation) -> dict[str, Any]:
        """Prepare and commit ``op`` in this process."""
        async with self.lock:
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
            raise LoadFailed(load_failure(stored, exc)) from None
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
        if self.control is not None:
            self.control.write_pins({n: slot.pinned for n, slot in self.slots.items() if slot.pinned})
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
                raise LoadFailed(f"cannot load {stored.tag}: its signature's {kind} are {tensors(now)}, those of "
                                 f"the serving {current.tag} {tensors(was)}")

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
                new = await call_on(ep, inst, gen, kwargs)
                old_gen = inst.generation
                if i or old_gen is None or old_gen.obj is None:
                    continue
                old = await call_on(ep, inst, old_gen, kwargs)
                was, now = structure(old), structure(new)
                if not same_structure(was, now):
                    assert prepared.stored is not None
                    raise LoadFailed(f"API {ep.name!r} answers {show(now)} with {prepared.stored.tag}, and "
                                     f"{show(was)} with the serving {old_gen.label}, on the same input")
                if check is not None:
                    check_quality(ep.name, check, old, new)

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
                raise LoadFailed(load_failure(stored, exc)) from None
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


