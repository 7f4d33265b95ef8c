"""The process model of ``pkg serve``: one uvicorn server, N worker processes sharing the port, or a reloader.

Graceful stop is uvicorn's: on SIGTERM it stops accepting, lets in-flight requests finish (up to
``graceful_timeout``), runs the lifespan shutdown (our ``@on_shutdown`` hooks) and exits 0.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import threading
from dataclasses import asdict
from pathlib import Path

from ..sdk.loader import load_service
from .app import ServeOptions, create_app

_ENV = "BENTO_LIKE_SERVE"


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
) -> None:
    import uvicorn

    working_dir = str(Path(working_dir or os.getcwd()).resolve())
    options = options or ServeOptions()
    _configure_logging(log_level)
    spec = load_service(target, working_dir)  # fail fast, in the parent, on a broken service
    workers = workers or spec.workers
    common = dict(
        host=host,
        port=port,
        log_level=log_level,
        access_log=access_log,
        timeout_graceful_shutdown=graceful_timeout,
        log_config=None,
        server_header=False,
    )
    if workers > 1 or reload:
        os.environ[_ENV] = json.dumps(
            {"target": target, "working_dir": working_dir, "options": asdict(options), "workers": workers > 1}
        )
        reload_args = {"reload": True, "reload_dirs": [working_dir], "reload_includes": ["*.py"]} if reload else {}
        uvicorn.run(
            "bento_like.serving.workers:app_from_env",
            factory=True,
            workers=None if reload else workers,
            **reload_args,
            **common,
        )
        return
    app = create_app(spec, options)
    _Server(uvicorn.Config(app, **common)).run()


def _server_class():  # type: ignore[no-untyped-def]
    import uvicorn

    class Server(uvicorn.Server):
        """uvicorn's server, except that a SIGTERM/SIGINT it handled gracefully ends the process with 0.

        uvicorn re-raises the signal after its graceful shutdown, so the process dies "by signal"; an
        orchestrator (and a user's shell) should see a clean exit when every request was answered.
        """

        @contextlib.contextmanager
        def capture_signals(self):  # type: ignore[no-untyped-def]
            if threading.current_thread() is not threading.main_thread():
                yield
                return
            previous = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
            try:
                yield
            finally:
                for sig, handler in previous.items():
                    signal.signal(sig, handler)

    return Server


def _Server(config):  # type: ignore[no-untyped-def]
    return _server_class()(config)


def app_from_env():  # type: ignore[no-untyped-def]
    """Factory each worker process (or the reloaded process) calls to build its own app."""
    settings = json.loads(os.environ[_ENV])
    _configure_logging(os.environ.get("BENTO_LIKE_LOG_LEVEL", "info"))
    options = ServeOptions(**settings["options"])
    if settings["workers"]:
        options.worker_id = str(os.getpid())
    return create_app(load_service(settings["target"], settings["working_dir"]), options)


def _configure_logging(level: str) -> None:
    os.environ["BENTO_LIKE_LOG_LEVEL"] = level
    logging.basicConfig(
        level=level.upper(),
        format="%(asctime)s %(levelname)s %(name)s [%(process)d] %(message)s",
    )
    logging.getLogger("bento_like").setLevel(level.upper())
