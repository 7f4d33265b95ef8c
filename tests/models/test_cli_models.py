"""`pkg models ...`: each subcommand against a real store, in table and JSON form."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from click.testing import CliRunner
from models_testlib import NearestCentroid

import bento_like as bl
from bento_like.cli.models import models_group


def run(*args: str, input: str | None = None) -> tuple[int, str]:
    result = CliRunner().invoke(models_group, list(args), input=input)
    return result.exit_code, result.output


def save(tmp_path: Path, name: str, data: bytes, **labels: str) -> str:
    source = tmp_path / f"{name}-{len(data)}.bin"
    source.write_bytes(data)
    return bl.models.save(name, source, labels=labels, metadata={"acc": 0.5})


def test_list_table_and_json(tmp_path: Path) -> None:
    assert run("list") == (0, "no models\n")
    a = save(tmp_path, "a", b"x" * 2048, team="fraud")
    b = save(tmp_path, "b", b"y")
    code, out = run("list")
    lines = out.splitlines()
    assert code == 0 and lines[0].split() == ["TAG", "FRAMEWORK", "SIZE", "CREATED", "LABELS"]
    assert lines[1].startswith(a) and "2.0 KiB" in lines[1] and lines[1].endswith("team=fraud")
    assert lines[2].startswith(b) and "1 B" in lines[2]
    code, out = run("list", "--output", "json", "--label", "team=fraud")
    (doc,) = json.loads(out)
    assert code == 0 and doc["tag"] == a and doc["labels"] == {"team": "fraud"} and doc["framework"] == "files"
    assert Path(doc["path"]) == bl.models.get(a).path
    assert json.loads(run("list", "b", "-o", "json")[1])[0]["tag"] == b


def test_list_rejects_a_malformed_label() -> None:
    code, out = run("list", "--label", "team")
    assert code == 2 and "'team' is not KEY=VALUE" in out


def test_get_table_and_json(tmp_path: Path) -> None:
    tag = save(tmp_path, "a", b"data")
    code, out = run("get", "a")
    assert code == 0
    assert f"tag:        {tag}" in out and "framework:  files" in out and 'metadata:   {"acc": 0.5}' in out
    code, out = run("get", tag, "-o", "json")
    doc = json.loads(out)
    assert code == 0 and doc["tag"] == tag and doc["files"][0]["path"].startswith("files/")
    assert doc["digest"].startswith("sha256:") and doc["metadata"] == {"acc": 0.5}


def test_unknown_tag_is_a_clean_error(tmp_path: Path) -> None:
    tag = save(tmp_path, "a", b"data")
    code, out = run("get", "a:0000")
    assert code == 1 and out.startswith("Error: no model 'a:0000'") and tag in out
    code, out = run("get", "Bad Name")
    assert code == 1 and "invalid model name" in out


def test_delete_asks_unless_yes(tmp_path: Path) -> None:
    one = save(tmp_path, "a", b"1")
    two = save(tmp_path, "a", b"22")
    code, out = run("delete", one, input="n\n")
    assert code == 1 and "Aborted" in out and len(bl.models.list()) == 2
    code, out = run("delete", one, "a:latest", "--yes")
    assert code == 0 and out.splitlines() == [f"deleted {one}", f"deleted {two}"]
    assert bl.models.list() == []


def test_export_then_import(tmp_path: Path) -> None:
    tag = save(tmp_path, "a", b"data")
    archive = tmp_path / "a.tar"
    assert run("export", tag, str(archive)) == (0, f"{archive}\n")
    bl.models.delete(tag)
    assert run("import", str(archive), "-o", "json") == (0, json.dumps({"tag": tag}) + "\n")
    assert bl.models.get(tag).load().read_bytes() == b"data"


def test_import_of_pickles_needs_trust(tmp_path: Path) -> None:
    tag = bl.models.save("nc", NearestCentroid().fit(np.eye(2), np.array([0, 1])))
    archive = tmp_path / "nc.tar.gz"
    assert run("export", tag, str(archive))[0] == 0
    bl.models.delete(tag)
    code, out = run("import", str(archive))
    assert code == 1 and "--trust" in out and bl.models.list() == []
    assert run("import", str(archive), "--trust") == (0, f"{tag}\n")
