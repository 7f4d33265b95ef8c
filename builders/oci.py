"""Daemonless, reproducible OCI images.

An image is a pure function of its inputs (as in ko and Jib): layers are tar streams with sorted entries, one fixed
mtime (0, or SOURCE_DATE_EPOCH), numeric owners and normalized modes, gzipped with a fixed level and a header that
carries neither a time nor a file name; JSON is written with sorted keys and no spaces. The same inputs therefore
give byte-identical blobs and the same manifest digest on any machine with the same zlib, which is what lets a
registry skip every unchanged layer on push.

Layers are ordered by how often they change (base, Python deps, models, code), and each built layer is cached by the
digest of its inputs, so a one-line code change recompresses one small layer and reuses the others' blobs.
No daemon is involved: the result is an OCI layout directory (and optionally its tar) that skopeo, umoci, podman or
registry.push_image take as it is.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Literal, Mapping, Sequence

from ._oci_layers import File, LayerResult, LayerSpec, Tree, build_layers
from ._oci_layout import (
    MEDIA_CONFIG,
    MEDIA_MANIFEST,
    REF_NAME,
    TO_OCI,
    ImageError,
    Layout,
    canonical_json,
    host_image_platform,
    link_or_copy,
    write_archive,
)

__all__ = [
    "DEFAULT_USER",
    "REF_NAME",
    "BaseImage",
    "File",
    "ImageConfig",
    "ImageError",
    "ImageResult",
    "LayerResult",
    "LayerSpec",
    "Layout",
    "PipError",
    "Tree",
    "build_image",
    "default_cache_dir",
    "manylinux_platforms",
    "pip_install",
    "source_date_epoch",
    "write_archive",
]

DEFAULT_USER = "10001:10001"


def default_cache_dir() -> Path:
    """$BENTO_LIKE_HOME/cache/oci (default ~/.bento_like/cache/oci): what the CLI passes as `cache_dir`."""
    return Path(os.environ.get("BENTO_LIKE_HOME") or "~/.bento_like").expanduser() / "cache" / "oci"


def source_date_epoch() -> int:
    """SOURCE_DATE_EPOCH when set (the reproducible-builds convention), else 0."""
    value = os.environ.get("SOURCE_DATE_EPOCH", "").strip()
    return int(value) if value else 0


@dataclass(frozen=True)
class BaseImage:
    """Where the base image comes from: a local OCI layout ("layout"), a tar of one ("archive"), or a registry."""

    location: str
    tag: str | None = None
    kind: Literal["layout", "archive", "registry"] = "layout"
    insecure: bool = False

    @classmethod
    def parse(cls, text: str, *, insecure: bool = False) -> BaseImage:
        """`oci:DIR[:TAG]`, `oci-archive:FILE[:TAG]` (skopeo's spelling), or a registry reference
        (`docker://host/repo:tag` or just `host/repo:tag`)."""
        for prefix, kind in (("oci:", "layout"), ("oci-archive:", "archive")):
            if text.startswith(prefix):
                location, _, tag = text[len(prefix):].partition(":")
                return cls(location, tag or None, kind)  # type: ignore[arg-type]
        return cls(text.removeprefix("docker://"), None, "registry", insecure)


@dataclass(frozen=True)
class ImageConfig:
    """The runtime half of an image: what runs, as whom, where, and what it is called.

    `created` is not a field: it comes from the build's epoch, so that rebuilding gives the same digest.
    Annotations named `org.opencontainers.image.*` are also written as labels, where `docker inspect` shows them.
    """

    entrypoint: Sequence[str] | None = None
    cmd: Sequence[str] | None = None
    env: Mapping[str, str] = field(default_factory=dict)
    exposed_ports: Sequence[int | str] = ()
    working_dir: str | None = None
    user: str | None = DEFAULT_USER
    labels: Mapping[str, str] = field(default_factory=dict)
    annotations: Mapping[str, str] = field(default_factory=dict)
    stop_signal: str | None = None
    platform: str | None = None  # None: the base's, or the host's without a base


@dataclass(frozen=True)
class ImageResult:
    """What build_image made: where, under which tag and digests, and how each layer was obtained."""

    layout: Path
    tag: str
    manifest_digest: str
    manifest_size: int
    config_digest: str
    layers: tuple[LayerResult, ...]
    archive: Path | None
    seconds: float

    @property
    def reference(self) -> str:
        """The skopeo/umoci spelling of this image: `oci:DIR:TAG`."""
        return f"oci:{self.layout}:{self.tag}"


def rfc3339(epoch: int) -> str:
    return datetime.fromtimestamp(epoch, tz=timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def open_base(base: BaseImage, scratch: Path, cache_dir: Path | None, platform: str) -> tuple[Layout, str | None, str]:
    """(layout holding the base, its tag, a name for annotations); registry bases are pulled into the cache."""
    if base.kind == "layout":
        return Layout(Path(base.location)), base.tag, f"oci:{base.location}"
    if base.kind == "archive":
        target = scratch / "base"
        with tarfile.open(base.location) as tar:
            if hasattr(tarfile, "data_filter"):
                tar.extractall(target, filter="data")
            else:  # Python < 3.11.4: no extraction filters; the archive is the user's own input
                tar.extractall(target)
        return Layout(target), base.tag, f"oci-archive:{base.location}"
    from .registry import Reference, pull_image

    reference = Reference.parse(base.location)
    target = (cache_dir or scratch) / "bases"
    tag = str(reference)
    pull_image(reference, target, tag=tag, platform=platform, insecure=base.insecure)
    return Layout(target), tag, str(reference)


def _merge_config(base_config: Mapping[str, Any], config: ImageConfig) -> dict[str, Any]:
    merged = dict(base_config)
    env: dict[str, str] = {}
    for item in merged.get("Env") or []:
        key, _, value = item.partition("=")
        env[key] = value
    env.update(config.env)
    if env:
        merged["Env"] = [f"{k}={v}" for k, v in env.items()]
    if config.entrypoint is not None:
        merged["Entrypoint"] = list(config.entrypoint)
        merged.pop("Cmd", None)  # as in Docker: a new entrypoint does not inherit the base's arguments
    if config.cmd is not None:
        merged["Cmd"] = list(config.cmd)
    if config.working_dir is not None:
        merged["WorkingDir"] = config.working_dir
    if config.user is not None:
        merged["User"] = config.user
    if config.stop_signal is not None:
        merged["StopSignal"] = config.stop_signal
    ports = dict(merged.get("ExposedPorts") or {})
    for port in config.exposed_ports:
        ports[str(port) if "/" in str(port) else f"{port}/tcp"] = {}
    if ports:
        merged["ExposedPorts"] = ports
    oci_labels = {k: v for k, v in config.annotations.items() if k.startswith("org.opencontainers.image.")}
    labels = {**(merged.get("Labels") or {}), **config.labels, **oci_labels}
    if labels:
        merged["Labels"] = labels
    return {k: v for k, v in merged.items() if v is not None}


def _reuse_base(base: BaseImage, layout: Layout, scratch: Path, cache_dir: Path | None,
                platform: str | None) -> tuple[list[LayerResult], dict[str, Any], dict[str, str]]:
    """Link the base's layers into layout: (their results, the base's config, annotations naming the base).
    With a `platform`, the base must be an image for it (or an index offering one)."""
    wanted = platform or host_image_platform()
    base_layout, base_tag, base_name = open_base(base, scratch, cache_dir, wanted)
    descriptor, manifest = base_layout.image_manifest(base_tag, wanted)
    base_config = json.loads(base_layout.read_blob(manifest["config"]["digest"]))
    if platform is not None:
        check_base_platform(base_config, platform, base_name)
    diff_ids = base_config.get("rootfs", {}).get("diff_ids", [])
    if len(diff_ids) != len(manifest["layers"]):
        raise ImageError(f"{base_name}: its config lists {len(diff_ids)} diff_ids for {len(manifest['layers'])} layers")
    results = []
    for layer, diff_id in zip(manifest["layers"], diff_ids):
        if not base_layout.has_blob(layer["digest"]):
            raise ImageError(f"{base_name}: layer {layer['digest']} is missing from {base_layout.root}")
        link_or_copy(base_layout.blob_path(layer["digest"]), layout.blob_path(layer["digest"]))
        media_type = TO_OCI.get(layer["mediaType"], layer["mediaType"])
        results.append(LayerResult("base", layer["digest"], diff_id, layer["size"], media_type, "base"))
    annotations = {"org.opencontainers.image.base.digest": descriptor["digest"]}
    if base.kind == "registry":  # a local path is no name for others, and would tie the digest to it
        annotations["org.opencontainers.image.base.name"] = base_name
    return results, base_config, annotations


def check_base_platform(base_config: Mapping[str, Any], platform: str, base_name: str) -> None:
    """A base for another machine would give an image whose python3 cannot load the dependencies' wheels."""
    os_name, _, rest = platform.partition("/")
    arch, _, variant = rest.partition("/")
    have_os, have_arch, have_variant = base_config.get("os"), base_config.get("architecture"), base_config.get("variant")
    if not have_arch:
        return
    if (have_os, have_arch) != (os_name, arch) or (variant and have_variant and have_variant != variant):
        have = "/".join(p for p in (have_os, have_arch, have_variant) if p)
        raise ImageError(f"the base {base_name} is an image for {have}, not {platform}: use a base built for "
                         f"{platform} (or an image index that offers it)")


def _image_config(base_config: Mapping[str, Any], config: ImageConfig, layers: Sequence[LayerResult],
                  created: str) -> dict[str, Any]:
    """The base's config, extended: new platform if asked, merged runtime config, diff_ids and history."""
    merged = {k: v for k, v in base_config.items() if k not in ("container", "container_config", "id", "parent")}
    if config.platform:
        os_name, _, arch = config.platform.partition("/")
        arch, _, variant = arch.partition("/")
        if variant or merged.get("architecture") != arch:  # the base's own variant (arm64's v8) still holds
            merged.pop("variant", None)
        merged.update(os=os_name, architecture=arch)
        if variant:
            merged["variant"] = variant
    elif not merged.get("architecture"):
        merged.update(os="linux", architecture=host_image_platform().split("/")[1])
    merged["created"] = created
    merged["config"] = _merge_config(base_config.get("config") or {}, config)
    merged["rootfs"] = {"type": "layers", "diff_ids": [layer.diff_id for layer in layers]}
    merged["history"] = [*(base_config.get("history") or []),
                         *({"created": created, "created_by": f"bento_like build: {layer.comment}"}
                           for layer in layers if layer.source != "base")]
    return merged


def build_image(base: BaseImage | None, layers: Sequence[LayerSpec], config: ImageConfig, out: Path, tag: str, *,
                archive: Path | None = None, cache_dir: Path | None = None, epoch: int | None = None,
                compress_level: int = 6, progress: Callable[[str], None] | None = None) -> ImageResult:
    """Build an image into the OCI layout `out` (created if missing; other tags there are kept) under `tag`.

    The base's layers are reused verbatim; each spec in `layers` becomes one gzipped layer on top, in order.
    `cache_dir` (e.g. default_cache_dir()) keeps built layers by the digest of their inputs: a layer whose files
    did not change is linked from the cache instead of being compressed again, and registry bases are pulled
    there once. `archive`, when given, also gets a tar of the image's layout (`oci-archive:` for skopeo).
    `epoch` defaults to SOURCE_DATE_EPOCH, else 0, and is every entry's mtime and the image's `created`.
    `progress` gets a line as each layer starts and ends.
    """
    started = time.perf_counter()
    epoch = source_date_epoch() if epoch is None else epoch
    created = rfc3339(epoch)
    layout = Layout.init(Path(out))
    results: list[LayerResult] = []
    base_config: dict[str, Any] = {}
    annotations: dict[str, str] = {}
    if base is not None:
        with tempfile.TemporaryDirectory(prefix="bento_like-base-") as scratch:
            results, base_config, annotations = _reuse_base(base, layout, Path(scratch), cache_dir,
                                                            config.platform)
    results += build_layers(layers, layout, cache_dir, epoch, compress_level, progress)
    config_digest, config_size = layout.write_blob(canonical_json(_image_config(base_config, config, results,
                                                                                created)))
    manifest = {
        "schemaVersion": 2,
        "mediaType": MEDIA_MANIFEST,
        "config": {"mediaType": MEDIA_CONFIG, "digest": config_digest, "size": config_size},
        "layers": [{"mediaType": r.media_type, "digest": r.digest, "size": r.size} for r in results],
        "annotations": {**annotations, **config.annotations, "org.opencontainers.image.created": created},
    }
    manifest_digest, manifest_size = layout.write_blob(canonical_json(manifest))
    layout.set_tag(tag, {"mediaType": MEDIA_MANIFEST, "digest": manifest_digest, "size": manifest_size})
    if archive is not None:
        write_archive(layout, tag, Path(archive))
    return ImageResult(layout.root, tag, manifest_digest, manifest_size, config_digest, tuple(results),
                       Path(archive) if archive is not None else None, time.perf_counter() - started)


# --- Python packages for the image's interpreter ------------------------------------------------------------------


class PipError(ImageError):
    """pip could not install the requirements for the image's platform (often: no wheel for it)."""


def manylinux_platforms(arch: str = "x86_64", glibc: str = "2.36") -> list[str]:
    """Every manylinux tag a glibc `glibc` system on `arch` runs, newest first: pip 23 does not expand
    `manylinux_2_X` by itself, so each one is passed as its own `--platform`."""
    major, minor = (int(p) for p in glibc.split(".")[:2])
    if major != 2:
        raise ImageError(f"glibc {glibc}: only glibc 2.x is known")
    tags = [f"manylinux_2_{m}_{arch}" for m in range(minor, 4, -1)]
    legacy = {17: "manylinux2014", 12: "manylinux2010", 5: "manylinux1"}
    for floor, name in legacy.items():
        if minor >= floor and (arch in ("x86_64", "i686") or name == "manylinux2014"):
            tags.append(f"{name}_{arch}")
    return tags


def pip_install(requirements: Path | Sequence[str], target: Path, *, python_version: str = "3.11",
                platform: str = "linux/amd64", glibc: str = "2.36", implementation: str = "cp",
                interpreter: str = "/usr/bin/env python3", extra_args: Sequence[str] = (),
                python: str = sys.executable, timeout: float | None = None) -> Path:
    """Install requirements into `target` for the image's Python and platform, not the host's.

    Wheels only (`--only-binary=:all:`: nothing compiles for the wrong machine), no byte-code (pyc files carry
    times and would break reproducibility; the image compiles on first import or not at all), and console
    scripts get `interpreter` as their shebang instead of the host's Python. `requirements` is a requirements
    file (ideally locked, with hashes) or a list of requirement strings.
    """
    target = Path(target)
    if target.exists() and any(target.iterdir()):
        raise PipError(f"{target}: pip's --target must be an empty directory")
    target.mkdir(parents=True, exist_ok=True)
    arch = {"amd64": "x86_64", "arm64": "aarch64"}.get(platform.split("/")[1], platform.split("/")[1])
    command = [python, "-m", "pip", "install", "--target", str(target), "--python-version", python_version,
               "--implementation", implementation, "--only-binary=:all:", "--no-compile",
               "--disable-pip-version-check", "--no-input", "--no-warn-script-location", "--progress-bar", "off"]
    for tag in manylinux_platforms(arch, glibc):
        command += ["--platform", tag]
    command += list(extra_args)
    command += ["-r", str(requirements)] if isinstance(requirements, (str, Path)) else list(requirements)
    env = {**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1", "PYTHONDONTWRITEBYTECODE": "1"}
    proc = subprocess.run(command, capture_output=True, text=True, env=env, timeout=timeout)
    if proc.returncode != 0:
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-15:])
        raise PipError(f"pip could not install for python {python_version} on {platform} (glibc {glibc}):\n{tail}")
    _fix_shebangs(target / "bin", interpreter)
    return target


def _fix_shebangs(bin_dir: Path, interpreter: str) -> None:
    if not bin_dir.is_dir():
        return
    for script in sorted(bin_dir.iterdir()):
        if not script.is_file() or script.is_symlink():
            continue
        data = script.read_bytes()
        if data.startswith(b"#!") and b"python" in data.split(b"\n", 1)[0]:
            rest = data.split(b"\n", 1)[1] if b"\n" in data else b""
            script.write_bytes(b"#!" + interpreter.encode() + b"\n" + rest)
