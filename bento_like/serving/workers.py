"""The process model of ``pkg serve``: one server process, N supervised workers sharing the port, or a reloader.

With ``--workers N`` the parent binds the port once, starts N worker processes that all accept on it, and
watches them: a worker that dies is restarted (with back-off if it keeps dying), and meanwhile every worker's
``/readyz`` answers 503 naming the missing worker. GPUs are split among workers through CUDA_VISIBLE_DEVICES.

Graceful stop, the same in one process and in each worker: on SIGTERM ``/readyz`` answers 503 at once;
requests are still served for ``drain_s``; then the listening socket takes no new connection (new SYNs are
dropped, so a client is refused, never reset), those the kernel already accepted are taken and served, and
the socket closes; in-flight requests finish (up to ``graceful_timeout``), the ``@on_shutdown`` hooks run and
the process exits 0. The parent forwards SIGTERM to every worker, closes its own copy of the socket (else the
kernel would go on accepting connections nobody takes), waits for them and exits 0.

Rolling reload, under a supervisor (``--workers N`` with N > 1, or ``--follow``): on SIGHUP (or a new version
of the followed bento) the supervisor starts a new generation of N workers on the same socket, each taking
connections only once ready; when all are ready it retires the old generation (SIGUSR1: close its own copy of
the socket, turn its kept-open connections over, finish what it holds, exit 0). A new worker that exits or is
not ready within ``reload_timeout_s`` aborts the reload: the new generation is stopped, the old one serves on.

Where each part lives: serving/targets.py resolves what is served (a service target or a bento), server.py runs
one server process (uvicorn on our protocol, the drain), supervisor.py the workers and their generations; this
module chooses among them.

Dependencies that run as their own servers (``bl.depends`` of a service that declares resources, workers or
instances) are started by ``serve`` before the caller and stopped after it: serving/dependencies.py.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path
from typing import Any

import msgspec

from ..models._store import MODEL_STORE_ENV
from ..sdk.api import ServiceDefinitionError
from ..sdk.service import ServiceSpec
from .app import ServeOptions, create_app, run_deployment_hooks
from .dependencies import DependencyProcesses
from .tuning import Tuning, UpdateTuning, from_reloader, hand_to_reloaded
from .server import bind, configure_logging, uvicorn_server
from .supervisor import Supervisor
from .targets import ServeError, Target, followed_name, latest_target, load_target, resolve_bento

log = logging.getLogger("bento_like.serving")


def serve(
    target: str,
    *,
    host: str = "127.0.0.1",
    port: int = 3000,
    workers: int | None = None,
    reload: bool = False,
    log_level: str = "info",
    access_log: bool = False,
    working_dir: str | None = None,
    graceful_timeout: float = 30.0,
    options: ServeOptions | None = None,
    drain_delay: float | None = None,
    models: str | None = None,
    admin: bool | None = None,
    admin_token_file: str | None = None,
    watch_models: bool | None = None,
    swap_mode: str | None = None,
    follow: bool = False,
) -> None:
    working_dir = str(Path(working_dir or os.getcwd()).resolve())
    # The runtime's settings are read from the environment here, once, and sent to every worker.
    options = options or ServeOptions()
    tuning = options.tuning or Tuning.from_env()
    if drain_delay is not None:  # --drain-delay wins over BENTO_LIKE_DRAIN_S
        tuning = msgspec.structs.replace(tuning, http=msgspec.structs.replace(tuning.http, drain_s=float(drain_delay)))
    if models is not None:  # --models wins over BENTO_LIKE_MODELS_DIR
        tuning = msgspec.structs.replace(tuning, models_dir=models)
    tuning = _model_updates(tuning, admin, admin_token_file, watch_models, swap_mode)
    options = dataclasses.replace(options, tuning=tuning)
    configure_logging(log_level)
    followed = followed_name(target) if follow else None
    if followed is not None:
        if reload:
            raise ServeError("--follow moves to each new version of a bento, --reload restarts on a source change: "
                             "choose one")
        where, not_a_bento = latest_target(followed, tuning), None
        os.environ[MODEL_STORE_ENV] = str(where.model_store)  # this process's and its dependencies' model store
    else:
        where, not_a_bento = resolve_bento(target, working_dir, tuning)
    try:
        spec = load_target(where)
    except ServiceDefinitionError as exc:
        if not_a_bento is None or "no such module" not in str(exc):
            raise
        # `name:version` was meant as a bento more often than as module:Class: say what both lookups found
        raise ServiceDefinitionError(f"{target!r} is neither a bento ({not_a_bento}) nor a module ({exc})") from None
    server_args = _server_args(log_level, access_log, graceful_timeout, options.tuning)
    # Each separately-run dependency's port is bound now, so that every process is told every address.
    dependencies = DependencyProcesses(spec, where, log_level, server_args, graceful_timeout)
    options = dataclasses.replace(options, dependencies=dependencies.addresses)
    app = create_app(spec, options)  # fails fast, in the parent, on an API that cannot be served
    try:
        run_deployment_hooks(spec)
    except Exception as exc:
        log.error("the deployment hook of %s failed", spec.name, exc_info=True)
        raise ServeError(f"an @on_deployment hook of {spec.name} failed: {type(exc).__name__}: {exc}") from None
    workers = workers or spec.workers
    dependencies.start(options)
    try:
        _serve_caller(spec, where, app, options, host, port, workers, reload, server_args, graceful_timeout,
                      followed)
    finally:
        dependencies.stop()
    if dependencies.failure:
        raise ServeError(dependencies.failure)


WATCH_DEFAULT_S = 2.0


def _model_updates(tuning: Tuning, admin: bool | None, token_file: str | None, watch: bool | None,
                   swap_mode: str | None) -> Tuning:
    """The flags of model updates over their environment variables (flags win)."""
    updates = tuning.updates
    token = updates.admin_token
    if token_file is not None:
        try:
            token = Path(token_file).read_text().strip()
        except OSError as exc:
            raise ServeError(f"cannot read --admin-token-file {token_file}: {exc.strerror}") from None
    try:
        updates = UpdateTuning(
            admin=updates.admin if admin is None else admin,
            admin_token=token,
            watch_s=(updates.watch_s or WATCH_DEFAULT_S) if watch else updates.watch_s,
            swap_mode=swap_mode or updates.swap_mode,
        )
    except ValueError as exc:
        raise ServeError(f"--admin: {exc}".replace("admin needs", "it needs")) from None
    return msgspec.structs.replace(tuning, updates=updates)


def _server_args(log_level: str, access_log: bool, graceful_timeout: float, tuning: Tuning) -> dict[str, Any]:
    return dict(
        log_level=log_level,
        access_log=access_log,
        timeout_graceful_shutdown=graceful_timeout,
        timeout_keep_alive=tuning.http.keep_alive_s,
        log_config=None,
        server_header=False,
        ws="none",  # no API is a WebSocket; an upgraded connection would leave the protocol's deadlines behind
    )


def _serve_caller(spec: ServiceSpec, where: Target, app: Any, options: ServeOptions, host: str, port: int,
                  workers: int, reload: bool, server_args: dict[str, Any], graceful_timeout: float,
                  followed: str | None) -> None:
    if reload:
        bind(host, port).close()  # a port in use is one error line here, not uvicorn's exit 3
        _serve_with_reload(where, options, host, port, server_args)
    elif workers > 1 or followed is not None:
        Supervisor(spec, where, options, workers, host, port, server_args, graceful_timeout, follow=followed).run()
    else:
        sock = bind(host, port)
        log.info("serving %s on http://%s:%d", spec.name, *sock.getsockname()[:2])
        uvicorn_server(app, server_args).run(sockets=[sock])


class _ReloadSettings(msgspec.Struct):
    where: Target
    options: ServeOptions
    log_level: str


def _serve_with_reload(
    where: Target, options: ServeOptions, host: str, port: int, server_args: dict[str, Any]
) -> None:
    import uvicorn

    from .protocol import HttpProtocol

    hand_to_reloaded(msgspec.json.encode(_ReloadSettings(where, options, server_args["log_level"])))
    uvicorn.run(
        "bento_like.serving.workers:app_from_env",
        factory=True,
        reload=True,
        reload_dirs=[where.working_dir],
        reload_includes=["*.py"],
        host=host,
        port=port,
        http=HttpProtocol,  # the reloader pickles its config: the default protocol, not one made per server
        **server_args,
    )


def app_from_env():  # type: ignore[no-untyped-def]
    """Factory the reloaded process calls to build its app."""
    settings = msgspec.json.decode(from_reloader(), type=_ReloadSettings)
    configure_logging(settings.log_level)
    return create_app(load_target(settings.where), settings.options)


