"""`pkg containerize --backend docker`: the bento's image built by a Docker API (dockerd, or podman's service).

The daemonless backend (`builders.containerize`) is the default and needs nothing running. This one exists for
teams whose pipeline already revolves around a daemon: it renders `templates/Dockerfile.template` and sends it,
with a build context, through the `docker` SDK to whatever `DOCKER_HOST` names.

Both backends agree by construction: the Dockerfile has the same layers in the same order (Python dependencies,
bento_like's runtime, one per model, code + manifest), and its ENV/WORKDIR/USER/EXPOSE/ENTRYPOINT/LABELs come
from `containerize.image_config`, the function the daemonless image's config comes from. The dependencies are
installed by the host exactly as for the daemonless image and COPYed from the context, so the Dockerfile has no
RUN step: the build needs no network and no Python of its own, only the base image. Both build for the platform
the bento was locked for.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import tempfile
from importlib import resources
from pathlib import Path
from string import Template
from typing import Any, Callable, Collection, Mapping, Sequence

from ..bentos import MANIFEST_FILE, Bento, BentoStore
from .containerize import (
    BASE_IMAGE_ENV,
    BENTO_DIR,
    SITE_PACKAGES,
    ContainerizeError,
    image_config,
    installed_dependencies,
    runtime_tree,
    shipped_manifests,
)
from .oci import default_cache_dir, source_date_epoch

DEFAULT_DOCKER_HOST = "unix:///var/run/docker.sock"


class DockerBackendError(ContainerizeError):
    """The docker backend cannot build this image as asked; the message says what to change."""


class DockerUnavailableError(DockerBackendError):
    """No Docker API answers where DOCKER_HOST points (or at the default socket)."""


def base_reference(bento: Bento, base: str | None = None) -> str:
    """The base as a Dockerfile FROM: `base`, else the bento's base_image, else $BENTO_LIKE_BASE_IMAGE; it must
    be a registry reference, since a daemon cannot read a local OCI layout or archive."""
    chosen = base or bento.info.base_image or os.environ.get(BASE_IMAGE_ENV)
    if not chosen:
        raise DockerBackendError(
            f"bento {bento.tag} names no base image: pass --base with a registry reference (host/repo:tag) to an "
            f"image with Python {bento.info.python.version} as python3, set base_image in the build config, or set "
            f"{BASE_IMAGE_ENV}"
        )
    if chosen.startswith(("oci:", "oci-archive:")):
        raise DockerBackendError(
            f"the docker backend builds FROM a registry reference, and {chosen} is a local OCI image: push it "
            f"(pkg push {chosen} REGISTRY/REPO:TAG) and pass --base REGISTRY/REPO:TAG, or use the default "
            f"--backend oci, which takes it as it is"
        )
    return chosen.removeprefix("docker://")


def render_dockerfile(bento: Bento, base: str | None = None) -> str:
    """The Dockerfile for `bento` on `base` (resolved as `base_reference` does), for the context of
    `build_context`."""
    info = bento.info
    config = image_config(info)
    models = [f"COPY models/{tag.replace(':', '/')}/ {BENTO_DIR}/models/{tag.replace(':', '/')}/"
              for tag in sorted({m.tag for m in info.models})]
    # As in the daemonless image: the config's labels, plus the org.opencontainers.image.* annotations.
    labels = {**config.labels,
              **{k: v for k, v in config.annotations.items() if k.startswith("org.opencontainers.image.")}}
    template = resources.files("bento_like.templates").joinpath("Dockerfile.template").read_text()
    return Template(template).substitute(
        bento=info.tag,
        platform=info.platform,
        base=base_reference(bento, base),
        site_packages=SITE_PACKAGES,
        bento_dir=BENTO_DIR,
        models="\n".join(models),
        labels=_instruction("LABEL", labels),
        env=_instruction("ENV", config.env),
        working_dir=config.working_dir,
        user=config.user,
        expose="EXPOSE " + " ".join(str(port) for port in config.exposed_ports) if config.exposed_ports else "",
        entrypoint=_json_array(config.entrypoint or []),
    )


def build_context(bento: Bento, directory: Path, *, cache_dir: Path | None = None,
                  progress: Callable[[str], None] = lambda line: None) -> Path:
    """Write what the Dockerfile COPYs into `directory` (created; must not exist or be empty).

    `site-packages/` (the locked dependencies, installed for the image's Python as for the daemonless image, and
    cached the same way), `runtime/` (bento_like without its builders), `models/NAME/VERSION/`, and `bento/` (code,
    manifest, lock, OpenAPI spec). Modes are those of the daemonless image (0755 for directories and executables,
    0644 otherwise), since COPY keeps the context's modes and the image runs as a non-root user.
    """
    info = bento.info
    directory = Path(directory)
    if directory.exists() and any(directory.iterdir()):
        raise DockerBackendError(f"{directory}: the build context must be written into an empty directory")
    directory.mkdir(parents=True, exist_ok=True)
    cache_dir = cache_dir or default_cache_dir()
    lock = bento.path / info.python.lock_file
    progress(f"dependencies: {lock} for Python {info.python.version} on {info.platform}")
    site = installed_dependencies(lock, info.python.version, info.platform, cache_dir, progress)
    _stage_tree(site, directory / "site-packages", exclude={".complete"})
    with tempfile.TemporaryDirectory(prefix="bento_like-runtime-") as scratch:
        _stage_tree(runtime_tree(Path(scratch) / "runtime"), directory / "runtime")
    for tag in sorted({m.tag for m in info.models}):
        name, version = tag.split(":")
        _stage_tree(bento.path / "models" / name / version, directory / "models" / name / version)
    code = directory / "bento"
    _stage_tree(bento.path / "src", code / "src")
    for relative in ("openapi.json", info.python.lock_file):
        _stage_file(bento.path / relative, code / relative)
    # As in the daemonless image: the manifests carry the build's epoch, not when the bento and models were made.
    for relative, data in shipped_manifests(bento, source_date_epoch()).items():
        target = (code if relative == MANIFEST_FILE else directory) / relative
        target.unlink(missing_ok=True)  # a hard link into the bento store: never write through it
        target.write_bytes(data)
        os.chmod(target, 0o644)
    return directory


def build_with_docker(ref: str, *, base: str | None = None, tag: str | None = None, store: BentoStore | None = None,
                      cache_dir: Path | None = None, progress: Callable[[str], None] = lambda line: None) -> str:
    """Build the bento `ref` through the Docker API at DOCKER_HOST; -> the image's reference (`NAME:TAG`).

    `tag` is a tag for the bento's name (default: its version) or a whole `REPO[:TAG]`. The daemon pulls the
    base itself, so a registry that needs TLS settings or credentials must be configured there.
    """
    bento = (store or BentoStore()).get(ref)
    bento.verify()
    base = base_reference(bento, base)
    dockerfile = render_dockerfile(bento, base)
    client = _connect()
    image = image_reference(bento, tag)
    with tempfile.TemporaryDirectory(prefix="bento_like-docker-") as tmp:
        context = build_context(bento, Path(tmp) / "context", cache_dir=cache_dir, progress=progress)
        (context / "Dockerfile").write_text(dockerfile)
        progress(f"image: building {image} on {base} through {_docker_host()}")
        _build(client, context, image, bento.info.platform, progress)
    image_id = client.images.get(image).id
    progress(f"image: {image} {image_id}")
    return image


def image_reference(bento: Bento, tag: str | None = None) -> str:
    """`NAME:TAG` in the daemon: a bare tag names the bento's image, as the daemonless layout's tags do."""
    if tag and (":" in tag or "/" in tag):
        return tag
    return f"{bento.info.name}:{tag or bento.info.version}"


# --- the Docker API -------------------------------------------------------------------------------------------------


def _docker_host() -> str:
    return os.environ.get("DOCKER_HOST") or DEFAULT_DOCKER_HOST


def _connect() -> Any:
    """A docker client that has answered a ping, or an error that says where no daemon was found."""
    try:
        import docker
    except ImportError:
        raise DockerBackendError(
            "the docker backend needs the docker Python package (pip install docker) and a Docker API to talk to; "
            "the default --backend oci needs neither"
        ) from None
    host = _docker_host()
    where = "from DOCKER_HOST" if os.environ.get("DOCKER_HOST") else "the default; DOCKER_HOST is not set"
    try:
        client = docker.from_env(timeout=30)
        client.ping()
    except docker.errors.DockerException as exc:
        raise DockerUnavailableError(
            f"no Docker daemon is reachable at {host} ({where}): {exc}. Start one and point DOCKER_HOST at it "
            f"(with podman: `podman system service --time=0 unix:///PATH/podman.sock`, then "
            f"DOCKER_HOST=unix:///PATH/podman.sock), or use the default --backend oci, which needs no daemon"
        ) from None
    return client


def _build(client: Any, context: Path, image: str, platform: str, progress: Callable[[str], None]) -> None:
    """Stream the daemon's build output to `progress`; a failed step becomes a DockerBackendError with its message."""
    # No RUN step needs a network; "none" also keeps podman from setting up its bridge (and firewall rules).
    stream = client.api.build(path=str(context), dockerfile="Dockerfile", tag=image, rm=True, forcerm=True,
                              decode=True, network_mode="none", platform=platform)
    recent: list[str] = []
    for chunk in stream:
        if "error" in chunk:
            detail = chunk.get("errorDetail", {}).get("message") or chunk["error"]
            tail = "\n".join(recent[-10:])
            raise DockerBackendError(f"the daemon at {_docker_host()} failed to build {image}: {detail.strip()}"
                                     + (f"\n{tail}" if tail else ""))
        text = chunk.get("stream") or chunk.get("status") or ""
        for line in text.splitlines():
            if line.strip():
                recent.append(line.rstrip())
                progress(line.rstrip())


# --- the build context ----------------------------------------------------------------------------------------------


def _stage_tree(src: Path, dest: Path, exclude: Collection[str] = ()) -> None:
    """Copy `src` to `dest` with the image's modes; files that already have them are hard-linked (models can be
    gigabytes), the others copied, so nothing in the bento store is ever chmod-ed."""
    dest.mkdir(parents=True, exist_ok=True)
    os.chmod(dest, 0o755)
    for entry in sorted(os.scandir(src), key=lambda e: e.name):
        if entry.name in exclude:
            continue
        target = dest / entry.name
        if entry.is_symlink():
            os.symlink(os.readlink(entry.path), target)
        elif entry.is_dir():
            _stage_tree(Path(entry.path), target)
        elif entry.is_file():
            _stage_file(Path(entry.path), target)
        else:
            raise DockerBackendError(f"{entry.path}: not a file, directory or symlink; an image cannot hold it")


def _stage_file(src: Path, dest: Path) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    mode = stat.S_IMODE(src.stat().st_mode)
    wanted = 0o755 if mode & 0o111 else 0o644
    if mode == wanted:
        try:
            os.link(src, dest)
            return
        except OSError:
            pass  # another filesystem: copy
    shutil.copyfile(src, dest)
    os.chmod(dest, wanted)


# --- Dockerfile spelling --------------------------------------------------------------------------------------------


def _quoted(value: str) -> str:
    """A double-quoted Dockerfile word: `"`, `\\` and `$` escaped, so a label is never expanded as a variable."""
    if "\n" in value or "\r" in value:
        raise DockerBackendError(f"{value!r}: a label or environment value cannot span lines in a Dockerfile")
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"').replace("$", "\\$") + '"'


def _instruction(name: str, pairs: Mapping[str, str]) -> str:
    """One LABEL or ENV instruction with a `key=value` pair per line; empty when there are none."""
    if not pairs:
        return ""
    items = [f"{_quoted(k) if name == 'LABEL' else k}={_quoted(v)}" for k, v in pairs.items()]
    return f"{name} " + " \\\n    ".join(items)


def _json_array(items: Sequence[str]) -> str:
    """Exec form (ENTRYPOINT ["python3", ...]): no shell, no variable expansion."""
    return json.dumps(list(items))
