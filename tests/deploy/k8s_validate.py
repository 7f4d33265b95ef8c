"""Strict validation of rendered Kubernetes manifests, offline: what a cluster would refuse, found without one.

Built-in kinds go through kubernetes-validate in strict mode (an unknown field fails) for the oldest Kubernetes we
support and the newest it bundles; custom resources go through the JSON schemas of their CRDs in schemas/. A kind
with neither is itself a problem: nothing passes unchecked. A few API-server rules that no schema carries (object
names, label syntax, KEDA's required Prometheus trigger keys) are checked here too, because a renderer easily
breaks them.
"""

from __future__ import annotations

import functools
import importlib.resources
import json
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import pytest

try:
    import jsonschema
    import kubernetes_validate
    import referencing
except ImportError:  # CI installs it; elsewhere the validating tests skip and say what to install
    kubernetes_validate = None

SCHEMAS = Path(__file__).resolve().parent / "schemas"

OLDEST = "1.29.0"
# The newest Kubernetes whose schemas the installed kubernetes-validate bundles (validate() skips without it).
NEWEST: str = kubernetes_validate.latest_version() if kubernetes_validate else "unknown"

# Custom resources `pkg deploy` renders, with the stored schema of each (schemas/README.md says where from).
CRD_SCHEMAS: dict[tuple[str, str], str] = {
    ("serving.kserve.io/v1beta1", "InferenceService"): "inferenceservice_v1beta1.json",
    ("keda.sh/v1alpha1", "ScaledObject"): "scaledobject_v1alpha1.json",
    ("monitoring.coreos.com/v1", "ServiceMonitor"): "servicemonitor_v1.json",
    ("monitoring.coreos.com/v1", "PrometheusRule"): "prometheusrule_v1.json",
}
# Built-in kinds `pkg deploy` renders; kubernetes-validate carries their schemas (a test checks it does).
BUILT_IN_KINDS: frozenset[tuple[str, str]] = frozenset({
    ("apps/v1", "Deployment"),
    ("v1", "Service"),
    ("policy/v1", "PodDisruptionBudget"),
    ("autoscaling/v2", "HorizontalPodAutoscaler"),
})
# Every (apiVersion, kind) a rendered manifest may hold with a schema checked here; callers assert coverage with it.
KINDS_WITH_SCHEMA: frozenset[tuple[str, str]] = BUILT_IN_KINDS | frozenset(CRD_SCHEMAS)

KUSTOMIZATION = ("kustomize.config.k8s.io/v1beta1", "Kustomization")

# The API server's name rules (k8s.io/apimachinery validation): most kinds take a DNS-1123 subdomain; a Service,
# and KServe's InferenceService, a DNS-1035 label, which must start with a letter.
_DNS1123_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
_DNS1035_LABEL = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?")
_LABEL_KINDS = {"Service", "InferenceService"}
_LABEL_NAME = re.compile(r"([A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?)?")
# KEDA's Prometheus scaler refuses a trigger without these; its CRD schema lets any metadata key through.
_PROMETHEUS_TRIGGER_KEYS = ("serverAddress", "query", "threshold")


def validate(documents: Sequence[Any], versions: tuple[str, ...] = (OLDEST, NEWEST)) -> list[str]:
    """One line per problem in `documents` (parsed YAML documents), [] when a cluster would accept them all.

    Built-in kinds are checked against each Kubernetes version in `versions`, custom resources against their
    stored schema (and their metadata against each version's ObjectMeta). Every failure is reported.
    """
    if kubernetes_validate is None:
        pytest.skip("manifest validation needs kubernetes-validate: pip install kubernetes-validate")
    problems: list[str] = []
    for document in documents:
        if document is not None:  # an empty YAML document (a trailing `---`): kubectl skips it too
            problems.extend(_document_problems(document, versions))
    return problems


def _document_problems(document: Any, versions: tuple[str, ...]) -> list[str]:
    if not isinstance(document, dict):
        return [f"a document is {type(document).__name__}, not a mapping: {document!r:.80}"]
    api_version, kind = document.get("apiVersion"), document.get("kind")
    metadata = document.get("metadata")
    name = metadata.get("name") if isinstance(metadata, dict) else None
    where = f"{kind or '?'}/{name or '?'}"
    if not isinstance(api_version, str) or not isinstance(kind, str):
        return [f"{where}: apiVersion and kind must both be strings (got {api_version!r}, {kind!r})"]
    if (api_version, kind) == KUSTOMIZATION:
        return [f"{where}: a kustomization is read by kustomize, not sent to a cluster; validate what "
                "`kubectl kustomize DIR` renders from it instead (that also refuses its unknown fields)"]
    problems = [f"{where}: {problem}" for problem in _api_server_rules(kind, metadata)]
    if (api_version, kind) in CRD_SCHEMAS:
        problems += [f"{where}: {p}" for p in _crd_problems(document, api_version, kind, versions)]
    else:
        problems += [f"{where}: {p}" for p in _built_in_problems(document, api_version, kind, versions)]
    return problems


def _built_in_problems(
    document: dict, api_version: str, kind: str, versions: tuple[str, ...], checking: str = ""
) -> Iterable[str]:
    for version in versions:
        try:
            used = kubernetes_validate.validate(document, version, strict=True)
        except kubernetes_validate.ValidationError as error:
            # Its validate() stops at the first failure, which may be a consequence ('spec' missing) rather than
            # the cause ('sepc' unknown): list them all from the same bundled schema where it can be found.
            every = _built_in_validator(error.version, api_version, kind)
            for each in sorted(every.iter_errors(document), key=_path_order) if every else [error]:
                yield from _describe(each, f"{checking}k8s {version}")
        except kubernetes_validate.SchemaNotFoundError:
            yield (f"no schema for {kind} ({api_version}) in Kubernetes {version} nor among the stored CRD schemas "
                   f"({', '.join(sorted(CRD_SCHEMAS.values()))}); a cluster without its CRD refuses it")
        except kubernetes_validate.utils.VersionNotSupportedError:
            yield f"kubernetes-validate {kubernetes_validate.__version__} has no schemas for Kubernetes {version}"
        else:
            # It falls back to an older schema set for a version it lacks; that would not be the version asked for.
            if used != _major_minor(version):
                yield f"kubernetes-validate checked against Kubernetes {used}, not {version}"


@functools.cache
def _built_in_validator(major_minor: str, api_version: str, kind: str) -> jsonschema.protocols.Validator | None:
    """The strict schema kubernetes-validate checked the kind against (its file layout), or None if not found."""
    bundled = importlib.resources.files("kubernetes_validate") / "kubernetes-json-schema"
    group_version = re.sub(r"^([^./]*)(?:\.[^/]*)?/", r"\1-", api_version)  # rbac.authorization.k8s.io/v1 -> rbac-v1
    for directory in bundled.iterdir():
        if re.fullmatch(rf"v{re.escape(major_minor)}\.\d+-local-strict", directory.name):
            schema, definitions = directory / f"{kind.lower()}-{group_version}.json", directory / "_definitions.json"
            if schema.is_file() and definitions.is_file():
                contents = [json.loads(path.read_text()) for path in (schema, definitions)]
                resources = [referencing.Resource.from_contents(content) for content in contents]
                registry = referencing.Registry().with_resources((r.id(), r) for r in resources)
                return jsonschema.Draft202012Validator(contents[0], registry=registry)
    return None


def _path_order(error: jsonschema.ValidationError) -> list[str]:
    return [str(part) for part in error.absolute_path]


def _crd_problems(document: dict, api_version: str, kind: str, versions: tuple[str, ...]) -> Iterable[str]:
    schema_file = CRD_SCHEMAS[(api_version, kind)]
    try:
        for error in sorted(_crd_validator(schema_file).iter_errors(document), key=_path_order):
            yield from _describe(error, schema_file)
    except re.error as error:  # a schema pattern Python's re cannot read: say so rather than pass
        yield f"{schema_file} holds a pattern Python cannot compile ({error}); this document cannot be checked"
    if kind == "ScaledObject":
        yield from _keda_trigger_problems(document)
    # The stored schemas take any object as metadata; Kubernetes checks it as ObjectMeta, so check it as one.
    stand_in = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": document.get("metadata", {})}
    yield from _built_in_problems(stand_in, "v1", "ConfigMap", versions, checking="ObjectMeta, ")


@functools.cache
def _crd_validator(schema_file: str) -> jsonschema.protocols.Validator:
    schema = json.loads((SCHEMAS / schema_file).read_text())
    # The catalog leaves the top level open; the API server refuses unknown top-level fields (strict field
    # validation, kubectl's default), so close it here without touching the stored file.
    schema = {**schema, "additionalProperties": False}
    return jsonschema.Draft202012Validator(schema)


def _keda_trigger_problems(document: dict) -> Iterable[str]:
    triggers = (document.get("spec") or {}).get("triggers") or []
    for index, trigger in enumerate(triggers):
        if not isinstance(trigger, dict) or trigger.get("type") != "prometheus":
            continue
        metadata = trigger.get("metadata") if isinstance(trigger.get("metadata"), dict) else {}
        for key in _PROMETHEUS_TRIGGER_KEYS:
            if key not in metadata:
                yield (f"spec.triggers[{index}].metadata.{key}: required by KEDA's prometheus scaler "
                       f"(given: {', '.join(sorted(metadata)) or 'nothing'})")


def _api_server_rules(kind: str, metadata: Any) -> Iterable[str]:
    if not isinstance(metadata, dict) or not isinstance(metadata.get("name"), str) or not metadata["name"]:
        yield "metadata.name: required (the API server refuses an object without a name)"
        return
    name = metadata["name"]
    if kind in _LABEL_KINDS:
        if len(name) > 63 or not _DNS1035_LABEL.fullmatch(name):
            yield (f"metadata.name: {name!r} is not a DNS-1035 label, which a {kind} name must be "
                   "(lower-case letters, digits and '-', starting with a letter, at most 63 characters)")
    elif len(name) > 253 or not _DNS1123_SUBDOMAIN.fullmatch(name):
        yield (f"metadata.name: {name!r} is not a DNS-1123 subdomain (lower-case letters, digits, '-' and '.', "
               "starting and ending with a letter or digit)")
    labels = metadata.get("labels")
    for key, value in (labels.items() if isinstance(labels, dict) else ()):
        if isinstance(value, str) and (len(value) > 63 or not _LABEL_NAME.fullmatch(value)):
            yield (f"metadata.labels.{key}: {value!r} is not a valid label value (at most 63 of letters, digits, "
                   "'-', '_' and '.', starting and ending with a letter or digit)")


def _describe(error: jsonschema.ValidationError, against: str) -> Iterable[str]:
    path = list(error.absolute_path)
    if error.validator == "additionalProperties" and isinstance(error.instance, dict):
        # Name the unknown field itself, not the object that holds it.
        known = error.schema.get("properties", {})
        patterns = error.schema.get("patternProperties", {})
        extras = [k for k in error.instance if k not in known and not any(re.search(p, k) for p in patterns)]
        if extras:
            for key in extras:
                yield f"{_dotted([*path, key])}: unknown field ({against})"
            return
    yield f"{_dotted(path)}: {error.message} ({against})"


def _dotted(path: Sequence[Any]) -> str:
    text = ""
    for part in path:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text or "(top level)"


def _major_minor(version: str) -> str:
    return ".".join(version.removeprefix("v").split(".")[:2])
