"""`pkg containerize --model-only`: a bento's models as a KServe "modelcar" image.

An InferenceService whose storageUri is `oci://REGISTRY/REPO:TAG` runs that image beside the predictor, in a pod
that shares its process namespace, with the arguments `sh -c "ln -sf /proc/$$/root/models /mnt/models && sleep
infinity"` (an init container first runs `sh -c '[ -d /models ] && [ "$(ls -A /models)" ]'`): the predictor
container then reads the image's `/models` at `/mnt/models`, through `/proc`. So the image holds the models under
`/models/<name>/<version>/` (the model store's layout, which `pkg serve BENTO --models /mnt/models` reads), and
needs `sh`, `ln`, `sleep` and `ls`: by default it is built on the bento's own base image, whose layers a node
already has from the serving image, so only the model layers are new. KServe's native mode (a Kubernetes
ImageVolume, `oci+native://`) mounts `/models` without running anything: `base="scratch"` is enough there.

It has no entrypoint (KServe gives arguments only) and runs as the serving image's user (10001), because the
predictor can follow `/proc/<pid>/root` only into a process of its own uid. Files are root's and world-readable,
so a pod that runs both containers as another uid (KServe's `uidModelcar`) reads them too.
"""

from __future__ import annotations

import gzip
import json
import os
import re
import tarfile
import tempfile
from pathlib import Path
from typing import Callable

from ..bentos import BentoStore
from .base import BaseImageError, default_base
from .containerize import BASE_IMAGE_ENV, ContainerizeError, model_layers, shipped_manifests, store_image_dir
from .oci import (
    DEFAULT_USER,
    BaseImage,
    ImageConfig,
    ImageResult,
    build_image,
    check_base_platform,
    default_cache_dir,
    open_base,
    source_date_epoch,
)

MODELCAR_ROOT = "/models"
"""Where a modelcar image holds the models: KServe links (or mounts) this directory at /mnt/models."""
SCRATCH = "scratch"
_SHELL = re.compile(r"^(?:\./)?(?:usr/)?bin/sh$")


def containerize_models(
    ref: str,
    *,
    base: str | None = None,
    output: str | os.PathLike[str] | None = None,
    archive: str | os.PathLike[str] | None = None,
    tag: str | None = None,
    store: BentoStore | None = None,
    cache_dir: Path | None = None,
    insecure_base: bool = False,
    progress: Callable[[str], None] = lambda line: None,
) -> ImageResult:
    """The modelcar image of the bento `ref`: one layer per model under /models, on `base` ("scratch": none).

    By default it goes into the bento's image layout under the tag `<version>-models`, beside the serving image.
    """
    bento = (store or BentoStore()).get(ref)
    bento.verify()
    info = bento.info
    if not info.models:
        raise ContainerizeError(f"bento {info.tag} has no models: a model-only image would hold nothing "
                                "(serve its image as it is, without a modelcar)")
    base_ref = base or info.base_image or os.environ.get(BASE_IMAGE_ENV) or default_base(info.python.version)
    cache_dir = cache_dir or default_cache_dir()
    base_image = None
    if base_ref != SCRATCH:
        base_image = BaseImage.parse(base_ref, insecure=insecure_base)
        progress(f"base: {base_ref}")
        check_shell(base_image, base_ref, info.platform, cache_dir / "layers")
    epoch = source_date_epoch()
    layers = model_layers(bento, shipped_manifests(bento, epoch), MODELCAR_ROOT)
    models = ",".join(sorted({m.tag for m in info.models}))
    config = ImageConfig(
        entrypoint=[],  # KServe gives the container arguments only: nothing may stand before them
        user=DEFAULT_USER,
        labels={f"dev.bento_like.label.{k}": v for k, v in info.labels.items()},
        annotations={
            "org.opencontainers.image.title": f"{info.name} models",
            "org.opencontainers.image.version": info.version,
            "org.opencontainers.image.source": info.labels.get("source", f"bento:{info.tag}"),
            "dev.bento_like.bento": info.tag,
            "dev.bento_like.models": models,
            "dev.bento_like.models_root": MODELCAR_ROOT,
        },
        platform=info.platform,
    )
    progress(f"image: {len(layers)} model layers on {base_ref}")
    return build_image(
        base_image,
        layers,
        config,
        Path(output) if output else store_image_dir(info.name),
        tag or f"{info.version}-models",
        archive=Path(archive) if archive else None,
        cache_dir=cache_dir / "layers",
        epoch=epoch,
        progress=progress,
    )


def check_shell(base: BaseImage, name: str, platform: str, cache_dir: Path) -> None:
    """A modelcar runs `sh -c ...`: a base for `platform` without /bin/sh would only fail in the pod."""
    from .registry import RegistryError

    ways = (f"pass --base with an image that has /bin/sh, ln and sleep (oci:DIR:TAG, oci-archive:FILE:TAG or a "
            f"registry reference), or --base {SCRATCH} for KServe's native OCI mode (an ImageVolume), which runs "
            "nothing")
    with tempfile.TemporaryDirectory(prefix="bento_like-base-") as scratch:
        try:
            layout, tag, _ = open_base(base, Path(scratch), cache_dir, platform)
        except (RegistryError, OSError, tarfile.TarError) as exc:  # unreachable, refused, unknown, unreadable
            reason = str(exc) or type(exc).__name__
            raise BaseImageError(f"base image {name} can't be had ({reason}); {ways}") from None
        _, manifest = layout.image_manifest(tag, platform)
        check_base_platform(json.loads(layout.read_blob(manifest["config"]["digest"])), platform, name)
        if not any(_has_shell(layout.blob_path(layer["digest"])) for layer in manifest["layers"]):
            raise BaseImageError(f"base image {name} has no /bin/sh, which KServe's modelcar runs; {ways}")


def _has_shell(blob: Path) -> bool:
    with open(blob, "rb") as raw:
        magic = raw.read(2)
    opener = gzip.open if magic == b"\x1f\x8b" else open
    with opener(blob, "rb") as stream, tarfile.open(fileobj=stream, mode="r|") as tar:  # type: ignore[operator]
        return any(_SHELL.match(member.name) and not member.isdir() for member in tar)
