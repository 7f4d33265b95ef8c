"""`pkg build`: a service, its exact models, a locked environment and its API description, as one bento.

The bento's version is derived from its content (code, model digests, lock, API, config), so building twice
unchanged gives the same version and installs nothing new. The build config comes from ``bentofile.yaml`` or
``[tool.bento_like.build]`` in pyproject.toml, validated with msgspec: errors name the key.
"""

from __future__ import annotations

import ast
import dataclasses
import hashlib
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import msgspec
import yaml

from .. import __version__
from ..bentos import (
    MANIFEST_FILE,
    APIEntry,
    Bento,
    BentoError,
    BentoManifest,
    BentoStore,
    BuildInfo,
    DependencyEntry,
    FileEntry,
    ModelEntry,
    PythonEnv,
    check_name,
    encode_manifest,
    sha256_file,
)
from ..description import APIDescription, describe, openapi_document
from ..models import Model, ModelStore, default_store
from ..models._store import STAGING_DIR
from ..sdk.loader import load_service
from ..sdk.service import separate_services
from ._sources import SecretsError, copy_sources, select_sources
from .deploy.config import DeployConfig, as_manifest_section
from .lock import PLATFORMS, resolve, runtime_requirements

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

__all__ = ["BuildConfig", "BuildConfigError", "BuildResult", "SecretsError", "build_bento", "load_build_config"]

# What each framework's models need at serving time, beyond bento_like itself.
FRAMEWORK_REQUIREMENTS = {"torch": ("torch",), "onnx": ("onnxruntime",), "tensorrt": ("tensorrt",)}


class BuildConfigError(BentoError):
    """The build config is wrong; the message names the file and the key."""


class PythonConfig(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    packages: list[str] = []
    requirements_txt: str | None = None
    version: str | None = None
    platform: str = "linux/amd64"


class ModelConfig(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    tag: str
    optimize: list[dict[str, Any]] = []
    quality: dict[str, Any] | None = None


class BuildConfig(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    service: str
    name: str | None = None
    include: list[str] = msgspec.field(default_factory=lambda: ["**"])
    exclude: list[str] = []
    python: PythonConfig = PythonConfig()
    labels: dict[str, str] = {}
    base_image: str | None = None
    models: list[ModelConfig] = []
    deploy: DeployConfig = DeployConfig()


def load_build_config(context: Path, file: Path | None = None) -> BuildConfig:
    """``file``, else ``context/bentofile.yaml``, else ``[tool.bento_like.build]`` in ``context/pyproject.toml``,
    else the defaults for the one ``@bl.service`` class defined at the top of ``context`` (see assumed_config)."""
    return _read_build_config(context, file)[0]


def _read_build_config(context: Path, file: Path | None) -> tuple[BuildConfig, bool]:
    """The config, and whether it was assumed (no file writes one)."""
    if file is None and (context / "bentofile.yaml").is_file():
        file = context / "bentofile.yaml"
    data = None
    if file is not None:
        try:
            data = yaml.safe_load(file.read_text())
        except (OSError, yaml.YAMLError) as exc:
            raise BuildConfigError(f"{file}: {exc}") from None
        where = str(file)
    elif (context / "pyproject.toml").is_file():
        try:
            data = tomllib.loads((context / "pyproject.toml").read_text()).get("tool", {}).get("bento_like", {}).get("build")
        except tomllib.TOMLDecodeError as exc:
            raise BuildConfigError(f"{context / 'pyproject.toml'}: {exc}") from None
        where = f"{context / 'pyproject.toml'} [tool.bento_like.build]"
    if file is None and data is None:
        return assumed_config(context), True
    if not isinstance(data, dict):
        raise BuildConfigError(f"{where}: expected a mapping of keys such as service, include, python")
    try:
        return _checked(msgspec.convert(data, BuildConfig), where), False
    except msgspec.ValidationError as exc:
        raise BuildConfigError(f"{where}: {_config_problem(str(exc))}") from None


def _config_problem(text: str) -> str:
    """msgspec's message as `key: problem`: `python.packages: Expected `array`, got `str``."""
    message, sep, path = text.rpartition(" - at `")
    if not sep:  # at the top level msgspec names no path
        message, path = text, ""
    key = path.rstrip("`").removeprefix("$").lstrip(".")
    for prefix in ("Object contains unknown field", "Object missing required field"):
        if message.startswith(prefix):
            field = message.split("`")[1]
            parent = key.split(".")[0].split("[")[0]
            key = f"{key}.{field}" if key else field
            if prefix.endswith("unknown field"):
                known = {"": BuildConfig, "python": PythonConfig, "models": ModelConfig, "deploy": DeployConfig}.get(parent)
                message = "unknown key" + (f"; the keys are {', '.join(known.__struct_fields__)}" if known else "")
            else:
                message = "required, missing"
                if field == "service":
                    message += " (the service class, as file.py:Class or module:Class)"
    return f"{key or 'top level'}: {message}"


def assumed_config(context: Path) -> BuildConfig:
    """The build config of a folder without one: the defaults, for the one class that a Python file at the
    folder's top decorates with ``@service`` (read, not imported: only the build imports the service)."""
    found, unreadable = [], []
    for path in sorted(context.glob("*.py")):
        try:
            tree = ast.parse(path.read_bytes(), filename=str(path))
        except (SyntaxError, ValueError) as exc:
            unreadable.append(f"{path.name} ({type(exc).__name__}: {getattr(exc, 'msg', exc)}, line {getattr(exc, 'lineno', '?')})")
            continue
        found += [f"{path.name}:{node.name}" for node in tree.body
                  if isinstance(node, ast.ClassDef) and any(_is_service(d) for d in node.decorator_list)]
    if len(found) == 1:
        return BuildConfig(service=found[0])
    what = (f"{len(found)} @service classes ({', '.join(found)}): say which" if found
            else "no @service class in a .py file at its top")
    if unreadable:
        what += f" (unreadable: {', '.join(unreadable)})"
    raise BuildConfigError(
        f"{context} has no bentofile.yaml, no [tool.bento_like.build] in a pyproject.toml, and {what}. "
        f"Write a bentofile.yaml with `service: FILE.py:CLASS` (docs/build.md)"
    )


def _is_service(decorator: ast.expr) -> bool:
    target = decorator.func if isinstance(decorator, ast.Call) else decorator
    return (isinstance(target, ast.Name) and target.id == "service") or (
        isinstance(target, ast.Attribute) and target.attr == "service")


def _checked(cfg: BuildConfig, where: str) -> BuildConfig:
    if cfg.python.platform not in PLATFORMS:
        raise BuildConfigError(
            f"{where}: python.platform: {cfg.python.platform!r} is not supported; use one of {', '.join(PLATFORMS)}"
        )
    return cfg


@dataclass
class BuildResult:
    bento: Bento
    created: bool  # False when the same version already existed
    seconds: float
    warnings: tuple[str, ...] = ()  # what the user should look at: likely secrets shipped, private modes, size


def build_bento(
    context: str | os.PathLike[str],
    config: BuildConfig | None = None,
    *,
    config_file: str | os.PathLike[str] | None = None,
    store: BentoStore | None = None,
    model_store: ModelStore | None = None,
    refresh_lock: bool = False,
    allow_secrets: bool = False,
    progress: Callable[[str], None] = lambda line: None,
) -> BuildResult:
    """Build the service in `context` into a bento. Likely secrets that would ship raise SecretsError unless
    `allow_secrets`; what deserves a look anyway (private file modes, a large src/) is in the result's warnings."""
    started = time.perf_counter()
    context = Path(context).resolve()
    if config is not None:
        cfg = _checked(config, "build config")
    else:
        cfg, assumed = _read_build_config(context, Path(config_file) if config_file else None)
        if assumed:
            progress(f"no bentofile.yaml: building with the defaults for `service: {cfg.service}` (write a "
                     "bentofile.yaml to change them)")
    store = store or BentoStore()
    model_store = model_store or default_store()
    spec = load_service(cfg.service, context)
    name = check_name(cfg.name or spec.name.lower().replace("_", "-"))
    sources = select_sources(context, cfg.include, cfg.exclude, allow_secrets=allow_secrets)
    if not any(f.endswith(".py") for f in sources.files):
        raise BuildConfigError(f"include/exclude select no Python file from {context}")
    staged = store.staging()
    try:
        progress(f"service {spec.name} from {cfg.service}")
        copy_sources(context, sources.files, staged / "src")
        files = sources.files
        for note in sources.notes:
            progress(note)
        progress(f"source: {len(files)} files")
        models = _copy_models(spec, cfg, model_store, staged / "models", progress, context)
        python_version = cfg.python.version or f"{sys.version_info.major}.{sys.version_info.minor}"
        requirements = _requirements(context, cfg, models)
        progress(f"locking {len(requirements)} requirements for {cfg.python.platform}, Python {python_version}")
        lock = resolve(
            requirements,
            python_version=python_version,
            platform=cfg.python.platform,
            cache_dir=store.root.parent / "cache" / "locks",
            refresh=refresh_lock,
        )
        (staged / "env").mkdir()
        (staged / "env" / "requirements.lock.txt").write_text(lock.text)
        descriptions = describe(spec)  # what the server derives its routes, codecs and document from too
        openapi = openapi_document(spec.name, __version__, descriptions)
        (staged / "openapi.json").write_bytes(json.dumps(openapi, sort_keys=True, indent=1).encode())
        entries = tuple(_file_entries(staged, ["openapi.json", "env/requirements.lock.txt"] + [f"src/{f}" for f in files]))
        draft = BentoManifest(
            name=name,
            version="0",
            service=cfg.service,
            service_name=spec.name,
            apis=_manifest_apis(descriptions),
            models=tuple(models),
            resources=dataclasses.asdict(spec.resources),
            traffic=dataclasses.asdict(spec.traffic),
            dependencies=_dependency_entries(spec),
            labels=dict(sorted(cfg.labels.items())),
            python=PythonEnv(version=python_version, requirements=tuple(requirements)),
            platform=cfg.python.platform,
            base_image=cfg.base_image,
            files=entries,
            deploy=as_manifest_section(cfg.deploy),
            build=BuildInfo(bento_like_version=__version__, python_version=sys.version.split()[0], created_at=""),
        )
        version = _content_version(draft)
        manifest = msgspec.structs.replace(
            draft, version=version, build=msgspec.structs.replace(draft.build, created_at=_now())
        )
        (staged / MANIFEST_FILE).write_bytes(encode_manifest(manifest))
        existed = (store.root / name / version).exists()
        bento = store.install(staged, manifest)
    finally:
        shutil.rmtree(staged, ignore_errors=True)
    progress(f"bento {bento.tag} {'already existed' if existed else 'built'} at {bento.path}")
    return BuildResult(bento=bento, created=not existed, seconds=time.perf_counter() - started,
                       warnings=tuple(sources.warnings))


def _now() -> str:
    epoch = os.environ.get("SOURCE_DATE_EPOCH")
    moment = datetime.fromtimestamp(float(epoch) if epoch else time.time(), tz=timezone.utc)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _dependency_entries(spec: Any) -> tuple[DependencyEntry, ...]:
    return tuple(
        DependencyEntry(name=dep.name, service=key, workers=dep.workers, instances=dep.instances,
                        resources=dataclasses.asdict(dep.resources), traffic=dataclasses.asdict(dep.traffic))
        for key, dep in separate_services(spec).items()
    )


def _content_version(draft: BentoManifest) -> str:
    """A digest of everything the bento holds except when it was built."""
    data = msgspec.to_builtins(draft)
    data.pop("version")
    data.pop("build")
    for key in ("dependencies", "deploy"):  # absent before bentos recorded them: their versions stay the same
        if not data[key]:
            data.pop(key)
    data["bento_like_version"] = draft.build.bento_like_version
    return hashlib.sha256(msgspec.json.encode(data, order="sorted")).hexdigest()[:16]


def _copy_models(
    spec: Any, cfg: BuildConfig, model_store: ModelStore, dest: Path, progress: Callable[[str], None], context: Path
) -> list[ModelEntry]:
    """Exactly the models the service references (and its dependencies), each once; a reference with
    optimization passes (declared in `bl.model(..., optimize=...)` or under `models:` in the build config)
    contributes its optimized version, which must pass its quality gate."""
    entries: list[ModelEntry] = []
    copied: set[str] = set()
    optimized: dict[tuple[str, str], Model] = {}
    for attr, ref in sorted(spec.model_refs().items()):
        model = ref.resolve(model_store)
        model.verify()
        source_tag: str | None = None
        passes, quality = _optimization(ref, model.name, model.version, cfg)
        if passes:
            key = (model.tag, json.dumps([passes, quality], sort_keys=True, default=repr))
            if key not in optimized:
                optimized[key] = _optimize(model.tag, passes, quality, model_store, dest, context, progress, attr)
            source_tag, model = model.tag, optimized[key]
            copied.add(model.tag)  # saved straight into the bento's store
        size = sum(f.size for f in model.info.files)
        if model.tag not in copied:
            shutil.copytree(model.path, dest / model.name / model.version)
            copied.add(model.tag)
        progress(f"model {model.tag} ({model.info.framework}, {size / 1e6:.1f} MB) for {attr}")
        requires = tuple(
            f"{lib}=={model.info.library_versions[lib]}" if lib in model.info.library_versions else lib
            for lib in FRAMEWORK_REQUIREMENTS.get(model.info.framework, ())
        )
        entries.append(
            ModelEntry(attr=attr, tag=model.tag, framework=model.info.framework, digest=model.info.digest, size=size,
                       requires=requires, source=source_tag)
        )
    return entries


def _optimization(ref: Any, name: str, version: str, cfg: BuildConfig) -> tuple[list[Any], Any]:
    """The passes and gate for one reference: a `models:` entry of the build config naming this model (by
    name, name:latest or name:version) overrides what the service declared."""
    from ..models import parse_tag

    passes, quality = list(ref.options.get("optimize") or []), ref.options.get("quality")
    for entry in cfg.models:
        entry_name, entry_version = parse_tag(entry.tag)
        if entry_name == name and entry_version in ("latest", version):
            passes, quality = list(entry.optimize), entry.quality
    return passes, quality


def _optimize(tag: str, passes: list[Any], quality: Any, model_store: ModelStore, dest: Path, context: Path,
              progress: Callable[[str], None], attr: str) -> Model:
    """Optimize `tag` into the bento's own store (the user's store keeps only the pass cache's entries)."""
    from .optimize import OptimizeError, optimize_model

    try:
        result = optimize_model(tag, passes, quality, store=model_store, save_to=ModelStore(dest), base_dir=context,
                                log=progress)
    except OptimizeError as exc:
        raise BentoError(f"model {tag} (for {attr}): {exc}") from exc
    finally:
        shutil.rmtree(dest / STAGING_DIR, ignore_errors=True)  # the save's scratch space is not part of the bento
    progress(result.table())
    return result.model


def _requirements(context: Path, cfg: BuildConfig, models: list[ModelEntry]) -> list[str]:
    wanted = list(runtime_requirements())
    for model in models:
        wanted.extend(model.requires)
    wanted.extend(cfg.python.packages)
    if cfg.python.requirements_txt:
        file = context / cfg.python.requirements_txt
        if not file.is_file():
            raise BuildConfigError(f"python.requirements_txt: {file} does not exist")
        for line in file.read_text().splitlines():
            line = line.split("#", 1)[0].strip()
            if line:
                wanted.append(line)
    return sorted(set(wanted))


def _file_entries(root: Path, paths: list[str]) -> list[FileEntry]:
    return [FileEntry(path=p, size=(root / p).stat().st_size, sha256=sha256_file(root / p)) for p in sorted(paths)]


def _manifest_apis(descriptions: list[APIDescription]) -> tuple[APIEntry, ...]:
    """The manifest's API entries, by route: what the runtime and tools read without importing the service."""
    return tuple(
        APIEntry(
            name=api.name,
            route=api.route,
            inputs={p.name: p.kind for p in api.params},
            output=api.output_kind,
            batchable=api.config.batchable,
            max_batch_size=api.config.max_batch_size,
            max_latency_ms=api.config.max_latency_ms,
        )
        for api in sorted(descriptions, key=lambda d: d.route)
    )
