"""``pkg``: the one command line of bento_like. Each command parses its options and calls one library function."""

from __future__ import annotations

import re

import click

from .. import __version__

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmg]i?b?|b)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "b": 1, "k": 1000, "m": 1000**2, "g": 1000**3, "ki": 1024, "mi": 1024**2, "gi": 1024**3}


class ByteSize(click.ParamType):
    name = "size"

    def convert(self, value, param, ctx):  # type: ignore[no-untyped-def]
        if isinstance(value, int):
            return value
        match = _SIZE.match(str(value))
        if not match:
            self.fail(f"{value!r} is not a size such as 1048576, 10MB or 64MiB", param, ctx)
        number, unit = match.groups()
        unit = (unit or "").lower().rstrip("b")
        return int(float(number) * _UNITS[unit])


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="pkg")
def cli() -> None:
    """bento_like: serve a model service, build it into a bento, ship it as an OCI image."""


@cli.command()
@click.argument("target")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on (0.0.0.0 for all).")
@click.option("--port", default=3000, show_default=True, type=click.IntRange(0, 65535), envvar="BENTO_LIKE_PORT",
              help="Port to listen on; BENTO_LIKE_PORT overrides the default (and an image's).")
@click.option("--workers", type=click.IntRange(1), default=None, help="Processes sharing the port [service's own, or 1].")
@click.option("--reload", is_flag=True, help="Restart when a .py file under the working directory changes.")
@click.option("--follow", is_flag=True,
              help="TARGET is a bento NAME: serve NAME:latest and move to each new version stored, without downtime.")
@click.option(
    "--log-level",
    default="info",
    show_default=True,
    type=click.Choice(["critical", "error", "warning", "info", "debug"], case_sensitive=False),
)
@click.option("--access-log", is_flag=True, help="Log every request (costs throughput).")
@click.option("--timeout", type=click.FloatRange(min=0, min_open=True), help="Seconds a request may run [service's traffic.timeout].")
@click.option("--max-concurrency", type=click.IntRange(1), help="Requests handled at once before 429 [service's].")
@click.option("--max-body-size", type=ByteSize(), help="Largest request body, e.g. 10MB [service's, or 64MiB].")
@click.option("--max-queue", type=click.IntRange(1), help="Requests waiting per API before 429 [service's, or 1024].")
@click.option("--working-dir", type=click.Path(file_okay=False, exists=True), help="Where TARGET is resolved [cwd].")
@click.option("--graceful-timeout", default=30.0, show_default=True, help="Seconds in-flight requests get on SIGTERM.")
@click.option(
    "--drain-delay",
    type=click.FloatRange(min=0),
    default=None,
    help="Seconds to keep serving after SIGTERM while /readyz answers 503, for a load balancer to notice "
    "[$BENTO_LIKE_DRAIN_S, or 0; 5 is usual under Kubernetes].",
)
@click.option(
    "--models",
    type=click.Path(file_okay=False),
    default=None,
    help="Serve the bento with the models in this directory (the model store's layout, e.g. a KServe modelcar's "
    "/mnt/models), checked against its manifest [$BENTO_LIKE_MODELS_DIR, or the bento's own].",
)
@click.option("--admin", is_flag=True, default=None,
              help="Serve the repository API (/v2/repository/...: load, unload, index models while serving), "
              "behind the bearer token in $BENTO_LIKE_ADMIN_TOKEN or --admin-token-file.")
@click.option("--admin-token-file", type=click.Path(dir_okay=False, exists=True), default=None,
              help="A file holding the repository API's bearer token.")
@click.option("--watch-models", is_flag=True, default=None,
              help="Swap in a new model version when a reference's tag (name:latest) resolves to one in the store "
              "[polled every $BENTO_LIKE_WATCH_MODELS_S, or 2 s].")
@click.option("--swap-mode", type=click.Choice(["beside", "replace"]), default=None,
              help="Load a new model version beside the serving one (default), or release the old one first "
              "(less memory; each instance pauses while it loads) [$BENTO_LIKE_SWAP_MODE].")
def serve(target: str, **opts) -> None:  # type: ignore[no-untyped-def]
    """Serve TARGET: a service as file.py:Class or module:Class, or a bento (name:version or its directory).

    SIGHUP reloads the code without downtime under --workers N (N > 1) or --follow (docs/serving.md)."""
    from ..sdk.api import ServiceDefinitionError
    from ..serving import ServeOptions, serve as run
    from ..serving.tuning import SettingsError
    from ..serving.targets import ServeError

    try:
        run(
            target,
            host=opts["host"],
            port=opts["port"],
            workers=opts["workers"],
            reload=opts["reload"],
            log_level=opts["log_level"].lower(),
            access_log=opts["access_log"],
            working_dir=opts["working_dir"],
            graceful_timeout=opts["graceful_timeout"],
            drain_delay=opts["drain_delay"],
            models=opts["models"],
            admin=opts["admin"],
            admin_token_file=opts["admin_token_file"],
            watch_models=opts["watch_models"],
            swap_mode=opts["swap_mode"],
            follow=opts["follow"],
            options=ServeOptions(
                timeout=opts["timeout"],
                max_concurrency=opts["max_concurrency"],
                max_body_size=opts["max_body_size"],
                max_queue=opts["max_queue"],
            ),
        )
    except (ServiceDefinitionError, SettingsError, ServeError) as exc:
        raise click.ClickException(str(exc)) from None


@cli.command(context_settings={"ignore_unknown_options": True, "help_option_names": []})
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def probe(args: tuple[str, ...]) -> None:
    """Exit 0 if URL (default /readyz on $BENTO_LIKE_PORT) answers 2xx: an exec probe.

    In an image, `python -m bento_like probe [URL] [--timeout S]` does the same without loading the CLI."""
    from ..probe import main as run

    raise SystemExit(run(list(args)))


def _add_groups() -> None:
    from . import bentos, deploy, images
    from .cache import cache_group
    from .models import models_group
    from .optimize import optimize_command

    cli.add_command(models_group, name="models")
    cli.add_command(cache_group, name="cache")
    cli.add_command(optimize_command, name="optimize")
    for command in bentos.COMMANDS + images.COMMANDS + deploy.COMMANDS:
        cli.add_command(command)


_add_groups()


def main() -> None:
    cli()


if __name__ == "__main__":
    main()
