"""Reading manifests we may not have written (model and bento manifests, from a store or an archive).

PyYAML expands aliases as it builds the document (msgspec.yaml reads through it too), so a kilobyte of nested
anchors becomes billions of items, and deep nesting exhausts the stack. A manifest needs neither: only a file
under the size limit is parsed, and its values are built from the parser's events, refusing anchors, aliases
and deep nesting as they come.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml

MAX_MANIFEST_ENV = "BENTO_LIKE_MAX_MANIFEST_MB"
DEFAULT_MAX_MANIFEST_MB = 16
"""Far above any real manifest: one listing 10,000 files of four chunks each is 4 MiB."""
MAX_DEPTH = 64
# Values allowed per byte of the size limit: a dense real manifest (small files, no chunks) has one per ~17
# bytes, while `[{},{},...]` has one per 3, which would take ~0.5 GB at 16 MiB.
_BYTES_PER_VALUE = 16

_MiB = 2**20
_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
_OPENING = (yaml.MappingStartEvent, yaml.SequenceStartEvent)
_CLOSING = (yaml.MappingEndEvent, yaml.SequenceEndEvent)
_COLLECTION_TAGS = {yaml.MappingStartEvent: "tag:yaml.org,2002:map", yaml.SequenceStartEvent: "tag:yaml.org,2002:seq"}
_RESOLVER = yaml.resolver.Resolver()
_CONSTRUCTOR = yaml.constructor.SafeConstructor()
_NO_KEY = object()


class RefusedYAMLError(ValueError):
    """The file is over the size limit or not valid YAML, or holds what only an attack needs: anchors or
    aliases, tags on collections, nesting past MAX_DEPTH, more values than its size allows."""


def max_manifest_bytes() -> int:
    """The limit, from $BENTO_LIKE_MAX_MANIFEST_MB (whole MiB, 1 to 1024) or the default; read at each call."""
    raw = os.environ.get(MAX_MANIFEST_ENV, "").strip()
    if not raw:
        return DEFAULT_MAX_MANIFEST_MB * _MiB
    if not (raw.isascii() and raw.isdigit()) or not 1 <= int(raw) <= 1024:
        raise RefusedYAMLError(f"{MAX_MANIFEST_ENV}={raw!r}: expected a whole number of MiB from 1 to 1024")
    return int(raw) * _MiB


def check_size(size: int, source: object) -> None:
    limit = max_manifest_bytes()
    if size > limit:
        raise RefusedYAMLError(
            f"{source} is {size} bytes, over the {limit // _MiB} MiB limit for a manifest ({MAX_MANIFEST_ENV})"
        )


def read_manifest_bytes(path: Path) -> bytes:
    """The file's bytes, refused unread past the limit (FileNotFoundError passes through)."""
    with open(path, "rb") as f:
        check_size(os.fstat(f.fileno()).st_size, path)
        data = f.read(max_manifest_bytes() + 1)
    check_size(len(data), path)  # it grew since the stat
    return data


def load(data: bytes, source: object) -> Any:
    """The document in data, as plain Python values; RefusedYAMLError names source and what is wrong."""
    check_size(len(data), source)
    try:
        return _build(data, source)
    except RefusedYAMLError:
        raise
    except (yaml.YAMLError, ValueError, LookupError, AttributeError) as exc:  # what PyYAML's builders raise
        raise RefusedYAMLError(f"{source}: not valid YAML: {exc}") from None


def _build(data: bytes, source: object) -> Any:
    """Python values straight from the parser's events, as yaml.safe_load would make them for a document
    without anchors, aliases or tags on collections. No node graph is built: PyYAML's takes ~700 bytes a
    node, so even a size-capped file could take gigabytes."""
    most = max_manifest_bytes() // _BYTES_PER_VALUE
    values = 0
    root: Any = None
    stack: list[list[Any] | dict[Any, Any]] = []
    keys: list[Any] = []  # per open mapping: the key awaiting its value, or _NO_KEY
    documents = 0
    for event in yaml.parse(data, Loader=_Loader):
        line = event.start_mark.line + 1 if event.start_mark else "?"
        if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None) is not None:
            raise RefusedYAMLError(f"{source}: YAML anchors and aliases are not allowed in a manifest (line {line})")
        if isinstance(event, yaml.DocumentStartEvent):
            documents += 1
            if documents > 1:
                raise RefusedYAMLError(f"{source}: holds more than one YAML document (line {line})")
            continue
        if isinstance(event, _CLOSING):
            stack.pop()
            if isinstance(event, yaml.MappingEndEvent):
                keys.pop()
            continue
        if isinstance(event, yaml.ScalarEvent):
            value = _scalar(event)
        elif isinstance(event, _OPENING):
            if event.tag not in (None, "!", _COLLECTION_TAGS[type(event)]):
                raise RefusedYAMLError(f"{source}: the tag {event.tag!r} is not allowed in a manifest (line {line})")
            if len(stack) >= MAX_DEPTH:
                raise RefusedYAMLError(f"{source}: nested more than {MAX_DEPTH} deep (line {line})")
            value = {} if isinstance(event, yaml.MappingStartEvent) else []
        else:
            continue  # stream start and end, document end
        values += 1
        if values > most:
            raise RefusedYAMLError(
                f"{source}: holds more than {most} values, the most for the manifest size limit ({MAX_MANIFEST_ENV})"
            )
        if not stack:
            root = value
        elif isinstance(stack[-1], list):
            stack[-1].append(value)
        elif keys[-1] is _NO_KEY:
            if isinstance(value, (list, dict)):
                raise RefusedYAMLError(f"{source}: a mapping key must be a plain value (line {line})")
            keys[-1] = value
        else:
            stack[-1][keys[-1]] = value
            keys[-1] = _NO_KEY
        if isinstance(value, (list, dict)):
            stack.append(value)
            if isinstance(value, dict):
                keys.append(_NO_KEY)
    return root


def _scalar(event: yaml.ScalarEvent) -> Any:
    """The value SafeLoader makes of one scalar: its explicit tag, else the type its plain text resolves to."""
    tag = event.tag
    if tag in (None, "!"):
        tag = _RESOLVER.resolve(yaml.ScalarNode, event.value, event.implicit)
    node = yaml.ScalarNode(tag, event.value, event.start_mark, event.end_mark, event.style)
    construct = yaml.SafeLoader.yaml_constructors.get(tag, yaml.SafeLoader.yaml_constructors[None])
    return construct(_CONSTRUCTOR, node)
