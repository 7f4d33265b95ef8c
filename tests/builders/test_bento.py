"""`pkg build` and the bento store, end to end: real model store, real pip resolution, real `pkg serve`."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import httpx
import pytest
from click.testing import CliRunner

import bento_like as bl
from bento_like.bentos import BentoError, BentoStore
from bento_like.builders.bento import BuildConfigError, build_bento, load_build_config
from bento_like.builders.lock import LockError
from bento_like.cli.main import cli

SERVICE = '''
import numpy as np

import bento_like as bl


@bl.service(name="scaler")
class Scaler:
    weights = bl.model("weights:latest")
    offset = bl.model("offset:latest")

    @bl.api
    def predict(self, x: np.ndarray) -> np.ndarray:
        return x * self.weights["scale"] + self.offset["shift"]
'''


@pytest.fixture
def project(tmp_path: Path, home: Path) -> Path:
    """A service referencing two stored models, with a third stored model it does not use."""
    bl.models.save("weights", {"scale": 3.0}, framework="pickle")
    bl.models.save("offset", {"shift": 1.0}, framework="pickle")
    bl.models.save("unused", {"big": list(range(1000))}, framework="pickle")
    root = tmp_path / "proj"
    root.mkdir()
    (root / "service.py").write_text(SERVICE)
    (root / "notes.txt").write_text("shipped too\n")
    (root / "__pycache__").mkdir()
    (root / "__pycache__" / "junk.pyc").write_bytes(b"x")
    (root / "bentofile.yaml").write_text("service: service.py:Scaler\nlabels: {team: fraud}\n")
    return root


def test_build_packages_code_exact_models_lock_and_api(project: Path) -> None:
    result = build_bento(project)
    bento = result.bento
    info = bento.info
    assert result.created and bento.path.is_dir()
    assert info.name == "scaler" and info.service == "service.py:Scaler" and info.labels == {"team": "fraud"}
    assert sorted(m.tag.split(":")[0] for m in info.models) == ["offset", "weights"]
    assert sorted(p.name for p in (bento.path / "models").iterdir()) == ["offset", "weights"]
    sources = sorted(f.path for f in info.files if f.path.startswith("src/"))
    assert sources == ["src/notes.txt", "src/service.py"]
    lock = (bento.path / "env" / "requirements.lock.txt").read_text()
    for package in ("msgspec==", "starlette==", "uvicorn==", "numpy=="):
        assert package in lock
    assert all("--hash=sha256:" in line for line in lock.splitlines() if not line.startswith("#"))
    assert "torch" not in lock  # no torch model, no torch
    spec = json.loads((bento.path / "openapi.json").read_text())
    assert "/predict" in spec["paths"]
    assert [a.name for a in info.apis] == ["predict"]
    bento.verify()


def test_same_inputs_same_version_and_a_code_change_makes_a_new_one(project: Path) -> None:
    first = build_bento(project)
    again = build_bento(project)
    assert again.bento.tag == first.bento.tag and not again.created
    (project / "service.py").write_text(SERVICE + "\n# a comment\n")
    changed = build_bento(project)
    assert changed.created and changed.bento.info.version != first.bento.info.version
    assert [b.tag for b in BentoStore().list("scaler")][0] == changed.bento.tag


def test_config_errors_name_the_key(tmp_path: Path) -> None:
    (tmp_path / "bentofile.yaml").write_text("service: s.py:S\npython:\n  packages: numpy\n")
    with pytest.raises(BuildConfigError, match=r"bentofile.yaml: python.packages: Expected `array`, got `str`"):
        load_build_config(tmp_path)
    (tmp_path / "bentofile.yaml").write_text("service: s.py:S\nlables: {}\n")
    with pytest.raises(BuildConfigError, match=r"bentofile.yaml: lables: unknown key; the keys are service, name, include"):
        load_build_config(tmp_path)
    (tmp_path / "bentofile.yaml").unlink()
    (tmp_path / "pyproject.toml").write_text('[tool.bento_like.build]\nservice = "s.py:S"\ninclude = ["*.py"]\n')
    assert load_build_config(tmp_path).include == ["*.py"]
    (tmp_path / "pyproject.toml").write_text('[project]\nname = "x"\n')
    with pytest.raises(BuildConfigError, match="no \\[tool.bento_like.build\\]"):
        load_build_config(tmp_path)


def test_config_errors_read_cleanly(tmp_path: Path) -> None:
    (tmp_path / "bentofile.yaml").write_text("name: x\n")
    with pytest.raises(BuildConfigError) as caught:
        load_build_config(tmp_path)
    assert str(caught.value) == (f"{tmp_path / 'bentofile.yaml'}: service: required, missing (the service class, "
                                 "as file.py:Class or module:Class)")
    (tmp_path / "bentofile.yaml").write_text("service: s.py:S\npython: {pakages: [numpy]}\n")
    with pytest.raises(BuildConfigError, match=r"python.pakages: unknown key; the keys are packages, requirements_txt"):
        load_build_config(tmp_path)
    (tmp_path / "bentofile.yaml").write_text("service: s.py:S\nmodels: [{optimize: []}]\n")
    with pytest.raises(BuildConfigError, match=r"models\[0\].tag: required, missing$"):
        load_build_config(tmp_path)


def test_a_folder_without_a_build_config_builds_its_one_service(project: Path) -> None:
    (project / "bentofile.yaml").unlink()
    (project / "helpers.py").write_text("class NotAService:\n    pass\n")
    result = CliRunner().invoke(cli, ["build", str(project)])
    assert result.exit_code == 0, result.output
    assert ("no bentofile.yaml: building with the defaults for `service: service.py:Scaler` (write a bentofile.yaml "
            "to change them)") in result.output
    assert BentoStore().get("scaler:latest").info.service == "service.py:Scaler"


@pytest.mark.parametrize("files, problem", [
    ({}, "no @service class in a .py file at its top"),
    ({"a.py": "import bento_like as bl\n@bl.service\nclass A: ...\n",
      "b.py": "from bento_like import service\n@service(name='b')\nclass B: ...\n"},
     "2 @service classes (a.py:A, b.py:B): say which"),
    ({"broken.py": "@bl.service\nclass A(:\n"}, "(unreadable: broken.py (SyntaxError: invalid syntax, line 2))"),
])
def test_without_a_build_config_the_service_must_be_unambiguous(tmp_path: Path, files: dict, problem: str) -> None:
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    result = CliRunner().invoke(cli, ["build", str(tmp_path)])
    assert result.exit_code == 1 and result.output.count("\n") == 1, result.output
    assert result.output.startswith(f"Error: {tmp_path} has no bentofile.yaml, no [tool.bento_like.build] in a "
                                    "pyproject.toml, and ") and problem in result.output, result.output


def test_unresolvable_requirement_fails_the_build(project: Path) -> None:
    (project / "bentofile.yaml").write_text(
        "service: service.py:Scaler\npython:\n  packages: ['bento-like-no-such-package-anywhere==9.9.9']\n"
    )
    with pytest.raises(LockError, match="bento-like-no-such-package-anywhere"):
        build_bento(project)
    assert BentoStore().list() == []


def test_missing_model_fails_the_build_naming_it(project: Path) -> None:
    bl.models.delete("offset:latest")
    with pytest.raises(bl.models.ModelNotFoundError, match="offset"):
        build_bento(project)


def test_serve_a_bento_uses_its_own_models(project: Path, start_server) -> None:
    tag = build_bento(project).bento.tag
    bl.models.delete("weights:latest")  # the user's store no longer has it; the bento does
    server = start_server(tag, cwd=project.parent)
    r = httpx.post(server.url + "/predict", json={"x": [1.0, 2.0]})
    assert r.status_code == 200
    assert r.json() == [4.0, 7.0]


def test_cli_build_list_get_export_import_delete(project: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    built = runner.invoke(cli, ["build", str(project), "-o", "json"])
    assert built.exit_code == 0, built.output
    tag = json.loads(built.output)["tag"]
    listed = json.loads(runner.invoke(cli, ["list", "-o", "json"]).output)
    assert [b["tag"] for b in listed] == [tag]
    got = json.loads(runner.invoke(cli, ["get", tag, "-o", "json"]).output)
    assert got["service"] == "service.py:Scaler"
    archive = tmp_path / "scaler.tar.gz"
    assert runner.invoke(cli, ["export", tag, str(archive)]).exit_code == 0
    assert runner.invoke(cli, ["delete", tag, "-y"]).exit_code == 0
    assert runner.invoke(cli, ["list", "-o", "json"]).output.strip() == "[]"
    imported = runner.invoke(cli, ["import", str(archive)])
    assert imported.exit_code == 0 and imported.output.strip() == tag
    BentoStore().get(tag).verify()
    missing = runner.invoke(cli, ["get", "nope:1"])
    assert missing.exit_code == 1 and "no bento 'nope:1'" in missing.output


def _tar(entries: list[tuple[str, bytes]], links: list[tuple[str, str]] = ()) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in entries:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        for name, target in links:
            info = tarfile.TarInfo(name)
            info.type = tarfile.SYMTYPE
            info.linkname = target
            tar.addfile(info)
    return buf.getvalue()


def test_hostile_bento_archives_are_refused_and_leave_the_store_untouched(project: Path, tmp_path: Path) -> None:
    store = BentoStore()
    good = store.export(build_bento(project).bento.tag, tmp_path / "good.tar")
    with tarfile.open(good) as tar:
        members = [(m.name, tar.extractfile(m).read()) for m in tar if m.isfile()]
    prefix = members[0][0].split("/bento.yaml")[0]
    store.delete(prefix.replace("/", ":"))
    cases = {
        "traversal": _tar(members + [("../../evil.txt", b"x")]),
        "absolute": _tar(members + [("/tmp/evil.txt", b"x")]),
        "link": _tar(members, links=[(f"{prefix}/src/link", "/etc/passwd")]),
        "tampered": _tar([(n, d + b"#" if n.endswith("service.py") else d) for n, d in members]),
        "stray": _tar(members + [(f"{prefix}/src/extra.py", b"print(1)")]),
        "missing model": _tar([(n, d) for n, d in members if "/models/weights/" not in n]),
    }
    for case, data in cases.items():
        path = tmp_path / f"{case.replace(' ', '_')}.tar"
        path.write_bytes(data)
        with pytest.raises(BentoError):
            store.import_(path)
        assert store.list() == [], case
        assert not any((store.root / ".staging").iterdir()), case
