"""`pkg models pull`: the models of a modelcar image in a registry, into the local model store.

A modelcar (`pkg containerize --model-only`, builders/modelcar.py) holds each model in a layer of its own, under
`/models/<name>/<version>/`, on top of its base's layers, and its manifest names the models
(`dev.bento_like.models`). So a pull reads the manifest, fetches only the layers of the models the store lacks
(never the base's), and adds each through the store's own checks (ModelStore.import_layer): no path outside
/models, no links or special files, only the files the model's manifest lists, at their sizes and digests, the
manifest's digest that of its content and a digest-like version derived from it. Each model is staged and renamed
into the store in one step, so a half-pulled or refused model never appears there.

A pulled model's creation time is the moment it entered the store (images carry the build's epoch there, for
reproducible digests), so `name:latest` is the newest pulled: what `pkg serve --watch-models` follows.
An image index is resolved to its image for `platform` (the host's by default), as a container runtime would.
"""

from __future__ import annotations

import logging
import re
import tempfile
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Callable

import msgspec

from ..models import InvalidTagError, ModelStore, ModelStoreError, default_store, parse_tag
from ._oci_layout import ImageError, Layout, host_image_platform
from .modelcar import MODELCAR_ROOT
from .registry import Credentials, ProgressCallback, Reference, RegistryClient, RegistryError, load_credentials

log = logging.getLogger("bento_like.models_pull")

MODELS_ANNOTATION = "dev.bento_like.models"
ROOT_ANNOTATION = "dev.bento_like.models_root"
# A version of this form is derived from the content (models/_manifest.py): the same tag is the same model, so
# a store that has it needs nothing from the layer. Another version is fetched and compared by digest.
_CONTENT_VERSION = re.compile(r"[0-9a-f]{16}")


class ModelcarError(ImageError):
    """The image is not a modelcar, or one of its models is refused; the message names the image and why."""


class _Descriptor(msgspec.Struct):
    digest: str
    size: int
    mediaType: str = ""  # noqa: N815 - the OCI field's name


class _Manifest(msgspec.Struct):
    layers: list[_Descriptor]
    annotations: dict[str, str] = {}


@dataclass
class ModelsPullReport:
    reference: str
    digest: str
    """The digest the reference named when pulled (an index's own, for an index)."""
    added: list[str] = field(default_factory=list)
    existing: list[str] = field(default_factory=list)
    bytes_downloaded: int = 0
    seconds: float = 0.0


def pull_models(reference: str | Reference, store: ModelStore | None = None, *, insecure: bool = False,
                credentials: Credentials | None = None, trust: bool = False, platform: str | None = None,
                progress: ProgressCallback | None = None, **options: object) -> ModelsPullReport:
    """Add the models of the modelcar `reference` that `store` (default: the default store) lacks.

    Models unpickled at load (pickle, torch) run code when served: they need `trust`, as with import_model.
    `options` go to RegistryClient (retries, backoff, timeout, transport)."""
    ref = reference if isinstance(reference, Reference) else Reference.parse(reference)
    credentials = credentials or load_credentials(ref.registry)
    with RegistryClient(ref.registry, credentials=credentials, insecure=insecure, **options) as client:  # type: ignore[arg-type]
        return _pull(client, ref, ref.reference, store or default_store(), trust=trust,
                     platform=platform or host_image_platform(), progress=progress)


def watch_models(reference: str | Reference, store: ModelStore | None = None, *, interval: float,
                 stop: threading.Event, insecure: bool = False, credentials: Credentials | None = None,
                 trust: bool = False, platform: str | None = None,
                 report: Callable[[str], None] = lambda line: None) -> None:
    """Pull `reference` now and again whenever its digest changes, polled every `interval` s until `stop` is set.

    `report` gets one line per model added and one per failure. A registry that cannot be reached (or refuses)
    is tried again at the next poll; an image that is refused is not pulled again until the tag moves on."""
    ref = reference if isinstance(reference, Reference) else Reference.parse(reference)
    credentials = credentials or load_credentials(ref.registry)
    store = store or default_store()
    platform = platform or host_image_platform()
    pulled = None
    with RegistryClient(ref.registry, credentials=credentials, insecure=insecure, retries=1) as client:
        while not stop.is_set():
            try:
                digest = client.manifest_digest(ref.repository, ref.reference)
                if digest != pulled:
                    pulled = digest  # pulled by its digest: a tag that moves meanwhile is seen at the next poll
                    done = _pull(client, ref, digest, store, trust=trust, platform=platform)
                    for tag in done.added:
                        report(f"added {tag} from {ref}@{digest}")
                    if not done.added:
                        report(f"{ref}@{digest}: nothing new ({', '.join(done.existing)} already there)")
            except (ImageError, ModelStoreError) as exc:
                report(f"refused {ref}@{pulled}: {exc}; waiting for the tag to move on")
            except RegistryError as exc:
                pulled = None  # down, or went down mid-pull: the same digest is pulled at the next poll
                report(f"{ref}: {exc}; trying again in {interval:g} s")
            stop.wait(interval)


def _pull(client: RegistryClient, ref: Reference, reference: str, store: ModelStore, *, trust: bool, platform: str,
          progress: ProgressCallback | None = None) -> ModelsPullReport:
    started = time.perf_counter()
    where = f"{ref.registry}/{ref.repository}@{reference}" if reference.startswith("sha256:") else str(ref)
    top_digest = reference if reference.startswith("sha256:") else None
    if top_digest is None:
        top_digest = client.manifest_digest(ref.repository, reference)
        reference = top_digest  # what follows reads exactly the manifest whose digest the report gives
    _, data = client.image_manifest(ref.repository, reference, platform)
    try:
        manifest = msgspec.json.decode(data, type=_Manifest)
    except msgspec.DecodeError as exc:
        raise ModelcarError(f"{where}: not a valid image manifest: {exc}") from None
    report = ModelsPullReport(where, top_digest)
    store.root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".pull-", dir=store.root) as scratch:  # beside the store: same disk
        layout = Layout.init(scratch)
        for tag, layer in _model_layers(manifest, where):
            name, version = tag.split(":")
            if (store.root / name / version).is_dir() and _CONTENT_VERSION.fullmatch(version):
                report.existing.append(tag)
                continue
            blob = client.fetch_blob(ref.repository, layer.digest, layer.size, layout, progress)
            report.bytes_downloaded += layer.size
            existed = (store.root / name / version).is_dir()
            try:
                store.import_layer(blob, root=MODELCAR_ROOT.strip("/"), tag=tag, trust=trust,
                                   where=f"{where} layer {layer.digest[:19]} ({tag})",
                                   created_at=datetime.now(timezone.utc))
            except ModelStoreError as exc:
                raise ModelcarError(str(exc)) from exc
            (report.existing if existed else report.added).append(tag)
            blob.unlink()  # a model's layer is not needed once it is in the store
    report.seconds = time.perf_counter() - started
    log.info("pulled %s (%s): added %s, already there %s", where, top_digest, report.added, report.existing)
    return report


def _model_layers(manifest: _Manifest, where: str) -> list[tuple[str, _Descriptor]]:
    """(tag, layer) of each model: the image's top layers, one per model in the order the annotation lists
    them (containerize_models builds them so); each layer is checked to hold the model it is paired with."""
    listed = manifest.annotations.get(MODELS_ANNOTATION)
    if not listed:
        raise ModelcarError(f"{where} is not a modelcar: its manifest has no {MODELS_ANNOTATION} annotation "
                            f"naming the models under {MODELCAR_ROOT} (build one with pkg containerize --model-only)")
    root = manifest.annotations.get(ROOT_ANNOTATION, MODELCAR_ROOT)
    if root != MODELCAR_ROOT:
        raise ModelcarError(f"{where}: holds its models under {root!r}, not {MODELCAR_ROOT}")
    tags = listed.split(",")
    for tag in tags:
        try:
            name, version = parse_tag(tag)
        except InvalidTagError as exc:
            raise ModelcarError(f"{where}: {MODELS_ANNOTATION} names {tag!r}, not a model tag: {exc}") from None
        if tag != f"{name}:{version}" or version == "latest":  # parse_tag reads a missing version as "latest"
            raise ModelcarError(f"{where}: {MODELS_ANNOTATION} names {tag!r}, not name:version")
    if len(set(tags)) != len(tags) or len(tags) > len(manifest.layers):
        raise ModelcarError(f"{where}: {MODELS_ANNOTATION} names {len(tags)} models ({listed}) but the image has "
                            f"{len(manifest.layers)} layers: not one layer per model")
    return list(zip(tags, manifest.layers[len(manifest.layers) - len(tags):]))
