"""What a server process serves: a service target or a bento (its src/, its models), resolved from what
`pkg serve` was given; the service loaded from it."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING

import msgspec

from ..models._store import MODEL_STORE_ENV
from ..sdk.api import ServiceDefinitionError
from ..sdk.loader import load_service
from ..sdk.service import ServiceSpec, separate_services
from .tuning import Tuning, knob

if TYPE_CHECKING:
    from ..bentos import Bento

log = logging.getLogger("bento_like.serving")


class ServeError(Exception):
    """The server cannot start (its port is taken, say); the message says why, for one ``Error:`` line."""


class Target(msgspec.Struct, frozen=True):
    """What a server process loads: a service target in a working directory, and the bento it comes from."""

    target: str
    working_dir: str
    bento_dir: str | None = None
    service: str | None = None  # a dependency of the target's service to serve instead (serving/dependencies.py)
    # a bento's models: the model store of the workers that serve it (a reload may move to another bento's)
    model_store: str | None = None


def resolve_bento(target: str, working_dir: str, tuning: Tuning) -> tuple[Target, str | None]:
    """A bento (its directory, or name:version in the bento store) is served from its src/ with its own models
    (or those in ``tuning.models_dir``), exactly as its image serves it; anything else is a service target left
    as it is, with why it is no bento."""
    from ..bentos import MANIFEST_FILE, BentoError, BentoStore

    directory = Path(working_dir) / target
    if (directory / MANIFEST_FILE).is_file():
        bento = BentoStore().get(str(directory))
    elif target.endswith(".py") or ".py:" in target:
        bento = None
    else:
        try:
            bento = BentoStore().get(target)
        except BentoError as exc:
            if tuning.models_dir:
                raise ServeError(f"{target!r} is no bento ({exc}); --models ({knob('models_dir')}) names where "
                                 "a bento's models are") from None
            return Target(target, working_dir), str(exc)  # module or module:Class
    if bento is None:
        if tuning.models_dir:
            raise ServeError(f"--models ({knob('models_dir')}) names where a bento's models are: serve a bento "
                             f"with it, not {target!r} (whose models come from the model store)")
        return Target(target, working_dir), None
    where = bento_target(bento, tuning)
    os.environ[MODEL_STORE_ENV] = str(where.model_store)  # this process's and its dependencies' model store
    return where, None


def bento_target(bento: Bento, tuning: Tuning) -> Target:
    log.info("serving bento %s from %s", bento.tag, bento.path)
    models = bento.path / "models"
    if tuning.models_dir:
        models = _models_dir(bento, Path(tuning.models_dir).absolute(), tuning.models_wait_s)
    return Target(bento.info.service, str(bento.path / "src"), str(bento.path), model_store=str(models))


def followed_name(target: str) -> str:
    """The bento name that ``--follow`` follows: TARGET is NAME or NAME:latest."""
    name, _, version = target.partition(":")
    if version not in ("", "latest") or not name or "/" in name or name.endswith(".py"):
        raise ServeError(f"--follow serves NAME:latest from the bento store and moves to each new version of it: "
                         f"give a bento name (NAME or NAME:latest), not {target!r}")
    return name


def latest_target(name: str, tuning: Tuning) -> Target:
    """What NAME:latest of the bento store is now, to serve."""
    from ..bentos import BentoError, BentoStore

    try:
        return bento_target(BentoStore().get(f"{name}:latest"), tuning)
    except BentoError as exc:
        raise ServeError(str(exc)) from None


def _models_dir(bento: Bento, directory: Path, wait_s: float) -> Path:
    """`directory` once it exists (a KServe modelcar links it beside this server, maybe just after it starts),
    holding exactly the models the bento's manifest names: anything else stops the server, naming the model."""
    from ..bentos import BentoError

    deadline = time.monotonic() + wait_s
    if not directory.is_dir() and wait_s > 0:
        log.info("waiting up to %.0f s for the models directory %s (%s)", wait_s, directory, knob("models_wait_s"))
        while not directory.is_dir() and time.monotonic() < deadline:
            time.sleep(0.1)
    if not directory.is_dir():
        raise ServeError(f"the models directory {directory} of bento {bento.tag} does not exist (waited "
                         f"{wait_s:g} s, {knob('models_wait_s')})")
    try:
        bento.verify_models(directory)
    except BentoError as exc:
        raise ServeError(str(exc)) from None
    log.info("serving the models of %s from %s", bento.tag, directory)
    return directory


def load_target(where: Target) -> ServiceSpec:
    """load_service, and when serving a bento, each model reference bound to the exact model the build put in
    it for that attribute (an optimized version where the build optimized it), whatever tag the code names."""
    spec = load_service(where.target, where.working_dir)
    if where.bento_dir:
        from ..bentos import BentoStore

        packaged = {entry.attr: entry.tag for entry in BentoStore().get(where.bento_dir).info.models}
        for attr, ref in spec.model_refs().items():
            if attr in packaged:
                ref.tag = packaged[attr]
    if where.service is not None:
        services = separate_services(spec)
        if where.service not in services:
            raise ServiceDefinitionError(f"{where.target!r} has no separately-run dependency {where.service!r}")
        spec = services[where.service]
    return spec


