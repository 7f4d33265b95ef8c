"""`pkg containerize`: a bento as an OCI image, written directly, with no Docker daemon.

Layers, ordered by how often they change (so a code change rebuilds and pushes one small layer):

1. the base image's layers, verbatim (a Python of the bento's version must be on it as ``python3``);
2. the locked Python dependencies, installed for the image's platform and Python;
3. bento_like's runtime (the package without its builders: no exporter, quantizer or TensorRT builder);
4. one layer per model, content-addressed: two images holding the same model share the blob;
5. the code, the manifest, the lock and the OpenAPI spec.

The image is for the platform the bento was locked for (its manifest's ``platform``), and is a function of the
bento's version and the build's epoch (SOURCE_DATE_EPOCH, else 0): the manifests it ships carry that epoch as
their creation time, not the moment the bento or its models were made.
The image serves the bento on 0.0.0.0:3000 as user 10001, exactly like ``pkg serve <bento>``.

``without_models`` leaves out the model layers: that image serves the models another image brings (a KServe
modelcar, builders/modelcar.py), from ``MODELCAR_MOUNT``, which its environment names as the models directory.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import msgspec

from ..bentos import MANIFEST_FILE, Bento, BentoError, BentoManifest, BentoStore, encode_manifest
from .base import BaseImageError, check_base, default_base, ways_out
from .cache import touch
from .oci import (
    DEFAULT_USER,
    BaseImage,
    File,
    ImageConfig,
    ImageResult,
    LayerSpec,
    Tree,
    build_image,
    default_cache_dir,
    pip_install,
    source_date_epoch,
)

BENTO_DIR = "/home/bento/bento"
SITE_PACKAGES = "/opt/bento/site-packages"
PORT = 3000
BASE_IMAGE_ENV = "BENTO_LIKE_BASE_IMAGE"
MODELCAR_MOUNT = "/mnt/models"
"""Where KServe shows a predictor container the ``/models`` of its storageUri's image (its modelcar)."""
MODELS_DIR_ENV = "BENTO_LIKE_MODELS_DIR"


class ContainerizeError(BentoError):
    """The image cannot be made from this bento as asked; the message says what to change."""


def image_config(bento_info: BentoManifest, port: int = PORT, models_dir: str | None = None) -> ImageConfig:
    """What the image runs, as whom, on which platform, with which labels; shared with the Dockerfile backend.
    `models_dir`: where the served models are, for an image that does not carry them."""
    info = bento_info
    env = {
        "PYTHONPATH": SITE_PACKAGES,
        "PYTHONUNBUFFERED": "1",
        "PYTHONDONTWRITEBYTECODE": "1",
        "HOME": "/tmp",
        "BENTO_LIKE_HOME": "/tmp/bento_like",
        "BENTO_LIKE_PORT": str(port),
    }
    if models_dir is not None:
        env[MODELS_DIR_ENV] = models_dir
    return ImageConfig(
        entrypoint=["python3", "-m", "bento_like", "serve", BENTO_DIR, "--host", "0.0.0.0"],
        env=env,
        exposed_ports=[port],
        working_dir=BENTO_DIR,
        user=DEFAULT_USER,
        labels={f"dev.bento_like.label.{k}": v for k, v in info.labels.items()},
        annotations={
            "org.opencontainers.image.title": info.name,
            "org.opencontainers.image.version": info.version,
            "org.opencontainers.image.source": info.labels.get("source", f"bento:{info.tag}"),
            "dev.bento_like.bento": info.tag,
            "dev.bento_like.service": info.service_name,
        },
        platform=info.platform,
    )


def shipped_manifests(bento: Bento, epoch: int) -> dict[str, bytes]:
    """The bento's and its models' manifests as the image carries them (paths relative to the bento), with
    `epoch` as their creation time: when the bento and the models were made is not part of their content, so it
    must not change the image's digest either."""
    from ..models import ModelStore

    moment = datetime.fromtimestamp(epoch, tz=timezone.utc)
    info = bento.info
    build = msgspec.structs.replace(info.build, created_at=moment.strftime("%Y-%m-%dT%H:%M:%S.%fZ"))
    files = {MANIFEST_FILE: encode_manifest(msgspec.structs.replace(info, build=build))}
    models = ModelStore(bento.path / "models")
    for tag in sorted({m.tag for m in info.models}):
        model = models.get(tag)
        files[f"models/{tag.replace(':', '/')}/manifest.yaml"] = msgspec.yaml.encode(
            msgspec.structs.replace(model.info, created_at=moment))
    return files


def model_layers(bento: Bento, manifests: dict[str, bytes], models_root: str) -> list[LayerSpec]:
    """One layer per model of the bento, in the model store's layout under `models_root` in the image
    (`<models_root>/<name>/<version>/`), with its manifest as `manifests` (shipped_manifests) gives it."""
    layers = []
    for model in sorted({m.tag for m in bento.info.models}):
        relative = model.replace(":", "/")
        # The later source wins: the model's files, then its manifest with the image's epoch.
        sources = (Tree(bento.path / "models" / relative, f"{models_root}/{relative}"),
                   File(f"{models_root}/{relative}/manifest.yaml", manifests[f"models/{relative}/manifest.yaml"]))
        layers.append(LayerSpec(f"model {model}", sources))
    return layers


def runtime_tree(dest: Path) -> Path:
    """bento_like as the image needs it: the package minus its builders, plus the kernels (a GPU runtime uses
    them); no byte-code, so the layer depends only on the sources."""
    import bento_like
    import bento_like.kernels

    package = Path(bento_like.__file__).parent
    shutil.rmtree(dest, ignore_errors=True)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "builders", "kernels", "templates")
    shutil.copytree(package, dest / "bento_like", ignore=ignore)
    shutil.copytree(Path(bento_like.kernels.__file__).parent, dest / "bento_like" / "kernels", ignore=ignore)
    return dest


def installed_dependencies(lock: Path, python_version: str, platform: str, cache_dir: Path,
                           progress: Callable[[str], None] = lambda line: None) -> Path:
    """The locked packages installed for the image, cached by the lock's content: pip runs once per lock."""
    key = hashlib.sha256(lock.read_bytes() + f"{python_version} {platform}".encode()).hexdigest()[:24]
    target = cache_dir / "site-packages" / key
    if (target / ".complete").exists():
        touch(target / ".complete")  # used now: `pkg cache prune` removes the least recently used first
        progress("dependencies: cached")
    else:
        count = sum(1 for line in lock.read_text().splitlines() if line.strip() and not line.lstrip().startswith("#")
                    and not line.lstrip().startswith("--"))
        progress(f"dependencies: pip installs {count} packages (downloads the first time; a minute or more)")
        started = time.perf_counter()
        partial = target.with_name(f"{key}.partial-{os.getpid()}")
        shutil.rmtree(partial, ignore_errors=True)
        pip_install(lock, partial, python_version=python_version, platform=platform, extra_args=["--no-deps"])
        (partial / ".complete").write_text("")
        shutil.rmtree(target, ignore_errors=True)
        os.replace(partial, target)
        size = sum(f.stat().st_size for f in target.rglob("*") if f.is_file())
        progress(f"dependencies: {size / 1e6:.0f} MB installed in {time.perf_counter() - started:.0f} s")
    return target


def containerize(
    ref: str,
    *,
    base: str | None = None,
    output: str | os.PathLike[str] | None = None,
    archive: str | os.PathLike[str] | None = None,
    tag: str | None = None,
    store: BentoStore | None = None,
    cache_dir: Path | None = None,
    insecure_base: bool = False,
    without_models: bool = False,
    progress: Callable[[str], None] = lambda line: None,
) -> ImageResult:
    """The bento's serving image; `without_models` leaves its models out (tagged `<version>-without-models` by
    default) for them to come from a modelcar at MODELCAR_MOUNT."""
    bento = (store or BentoStore()).get(ref)
    bento.verify()
    info = bento.info
    base_ref = base or info.base_image or os.environ.get(BASE_IMAGE_ENV) or default_base(info.python.version)
    base_image = BaseImage.parse(base_ref, insecure=insecure_base)
    if base_image.kind != "registry" and not Path(base_image.location).exists():
        what = "OCI layout directory" if base_image.kind == "layout" else "OCI archive"
        raise BaseImageError(f"base image {base_ref}: the {what} {base_image.location} does not exist; "
                             f"{ways_out(info.python.version)}")
    cache_dir = cache_dir or default_cache_dir()
    # Before the dependencies are installed (minutes, hundreds of MB): the base is there, for the bento's
    # platform, with its Python.
    progress(f"base: {base_ref}")
    check_base(base_image, info.python.version, info.platform, cache_dir / "layers")
    out = Path(output) if output else store_image_dir(info.name)
    tag = tag or (f"{info.version}-without-models" if without_models else info.version)
    epoch = source_date_epoch()
    manifests = shipped_manifests(bento, epoch)
    progress(f"dependencies: {bento.path / info.python.lock_file} for Python {info.python.version} "
             f"on {info.platform}")
    site = installed_dependencies(bento.path / info.python.lock_file, info.python.version, info.platform, cache_dir,
                                  progress)
    runtime = runtime_tree(cache_dir / "runtime" / f"build-{os.getpid()}")
    try:
        layers = [
            LayerSpec.directory(site, SITE_PACKAGES, comment="python dependencies", exclude=(".complete",)),
            LayerSpec.directory(runtime, SITE_PACKAGES, comment="bento_like runtime"),
        ]
        if not without_models:
            layers += model_layers(bento, manifests, f"{BENTO_DIR}/models")
        code = LayerSpec.directory(bento.path / "src", f"{BENTO_DIR}/src", comment="code")
        code += LayerSpec.files(
            {
                f"{BENTO_DIR}/{MANIFEST_FILE}": manifests[MANIFEST_FILE],
                f"{BENTO_DIR}/openapi.json": bento.path / "openapi.json",
                f"{BENTO_DIR}/{info.python.lock_file}": bento.path / info.python.lock_file,
            },
            comment="manifest",
        )
        layers.append(code)
        progress(f"image: {len(layers)} layers on {base_ref}")
        return build_image(
            base_image,
            layers,
            image_config(info, models_dir=MODELCAR_MOUNT if without_models else None),
            out,
            tag,
            archive=Path(archive) if archive else None,
            cache_dir=cache_dir / "layers",
            epoch=epoch,
            progress=progress,
        )
    finally:
        shutil.rmtree(runtime, ignore_errors=True)


def store_image_dir(name: str) -> Path:
    """Where images go when no --output is given: one OCI layout per bento name, a tag per version."""
    return BentoStore().root.parent / "images" / name
