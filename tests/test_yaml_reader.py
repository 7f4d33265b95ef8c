"""bento_like._yaml: manifests read as yaml.safe_load reads them, minus what only an attack needs (anchors,
aliases, tags on collections, deep nesting, sheer count), each refused with the file and line named."""

from __future__ import annotations

import pytest
import yaml

from bento_like import _yaml

SAMPLES = [
    b"a: [1, 2.5, -3, 0x1f, 1e3, .inf, null, ~, true, no, 'yes', \"x\", 2024-01-01, 2024-01-01T10:00:00Z]\n"
    b"b: {c: {d: []}, e: {}}\n'1': x\n? 2\n: y\n",
    b"- a\n- b: 1\n  c: [x]\n",
    b"",
    b"plain",
    b"x: !!str 123\ny: !!binary aGVsbG8=\n",
    b"a: |\n  text\n  more\nb: >\n  fold\n",
]


@pytest.mark.parametrize("data", SAMPLES)
def test_reads_what_safe_load_reads(data: bytes) -> None:
    assert _yaml.load(data, "m.yaml") == yaml.safe_load(data)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"a: &x 1\nb: 2\n", r"m.yaml: YAML anchors and aliases are not allowed in a manifest \(line 1\)"),
        (b"a: 1\nb: *x\n", "anchors and aliases"),
        (b"a: !!set {x: null}\n", "the tag 'tag:yaml.org,2002:set' is not allowed"),
        (b"a: !!python/object:os.system {}\n", "the tag 'tag:yaml.org,2002:python/object:os.system' is not allowed"),
        (b"b: !!python/name:os.system ''\n", "could not determine a constructor"),
        (b"? [a]\n: 1\n", "a mapping key must be a plain value"),
        (b"a: 1\n---\nb: 2\n", r"holds more than one YAML document \(line 2\)"),
        (b"a: " + b"[" * 65 + b"]" * 65, "nested more than 64 deep"),
        (b"a: [", "not valid YAML"),
    ],
)
def test_refuses(data: bytes, message: str) -> None:
    with pytest.raises(_yaml.RefusedYAMLError, match=message):
        _yaml.load(data, "m.yaml")


def test_the_number_of_values_is_capped_by_the_size_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(_yaml.MAX_MANIFEST_ENV, "1")
    data = b"x: [" + b"{}," * 70_000 + b"]\n"  # 210 KB, within the 1 MiB limit
    with pytest.raises(_yaml.RefusedYAMLError, match="holds more than 65536 values"):
        _yaml.load(data, "m.yaml")
    assert len(_yaml.load(b"x: [" + b"{}," * 60_000 + b"]\n", "m.yaml")["x"]) == 60_000
