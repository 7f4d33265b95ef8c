"""`bl.model(...)`: declared on a class, discoverable without running it, loaded per instance."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

import bento_like as bl
from bento_like.models import InvalidTagError, ModelNotFoundError, ModelStore
from bento_like.sdk.model_ref import ModelRef, model_refs


@pytest.fixture(autouse=True)
def _private_home(home: Path) -> Path:
    return home


def save_text(tmp_path: Path, name: str, text: str) -> str:
    source = tmp_path / f"{name}.txt"
    source.write_text(text)
    return bl.models.save(name, source)


class Base:
    encoder = bl.model("enc:latest")
    vocab = bl.model("vocab", optimize=["int8"], quality=0.99)


class Child(Base):
    vocab = None  # a subclass hides a reference by rebinding the name
    head = bl.model("head:v1")


def test_reference_on_the_class_is_the_declaration() -> None:
    ref = Base.vocab
    assert isinstance(ref, ModelRef)
    assert (ref.tag, ref.options, ref.name) == ("vocab", {"optimize": ["int8"], "quality": 0.99}, "vocab")
    assert repr(ref) == "model('vocab', optimize=['int8'], quality=0.99)"


def test_model_refs_walks_the_mro_without_instantiating() -> None:
    class Exploding(Child):
        def __init__(self) -> None:
            raise AssertionError("discovery must not instantiate the service")

    assert model_refs(Base) == {"encoder": Base.encoder, "vocab": Base.__dict__["vocab"]}
    assert model_refs(Exploding) == {"encoder": Base.encoder, "head": Child.head}
    assert model_refs(object) == {}


def test_bad_tag_fails_at_declaration() -> None:
    with pytest.raises(InvalidTagError):
        bl.model("Not A Tag")


def test_instance_loads_lazily_on_cpu_and_caches(tmp_path: Path) -> None:
    save_text(tmp_path, "enc", "first")

    class Svc:
        encoder = bl.model("enc:latest")

    svc = Svc()
    assert "encoder" not in vars(svc)
    path = svc.encoder
    assert path.read_text() == "first"
    assert vars(svc)["encoder"] is path and svc.encoder is path  # loaded once per instance


def test_runtime_style_construction_uses_its_own_load(tmp_path: Path) -> None:
    save_text(tmp_path, "enc", "weights")

    class Svc:
        encoder = bl.model("enc")

        def __init__(self) -> None:
            self.seen = self.encoder.read_text()

    obj = Svc.__new__(Svc)
    for name, ref in model_refs(Svc).items():
        obj.__dict__[name] = ref.load("cpu")
    Svc.__init__(obj)
    assert obj.seen == "weights"


def test_latest_is_resolved_when_loaded_not_when_declared(tmp_path: Path) -> None:
    class Svc:
        encoder = bl.model("enc:latest")

    with pytest.raises(ModelNotFoundError):
        Svc.encoder.resolve()
    first = save_text(tmp_path, "enc", "one")
    assert Svc.encoder.resolve().tag == first
    second = save_text(tmp_path, "enc", "two")
    assert Svc.encoder.resolve().tag == second
    assert Svc().encoder.read_text() == "two"


def test_resolve_against_another_store(tmp_path: Path) -> None:
    store = ModelStore(tmp_path / "bento" / "models")
    source = tmp_path / "a.txt"
    source.write_text("packed")
    tag = store.save("enc", source)
    ref = bl.model("enc:latest")
    assert ref.resolve(store).tag == tag
    assert ref.load("cpu", store=store).read_text() == "packed"


def test_slots_only_instances_get_a_clear_error() -> None:
    class Slotted:
        __slots__ = ()
        encoder = bl.model("enc")

    with pytest.raises(TypeError, match="needs instances with a __dict__"):
        _ = Slotted().encoder


def test_declaring_imports_no_framework() -> None:
    code = (
        "import sys, bento_like as bl\n"
        "class S:\n    m = bl.model('mlp:latest')\n"
        "from bento_like.sdk.model_ref import model_refs\n"
        "assert list(model_refs(S)) == ['m']\n"
        "print(sorted(m for m in ('torch', 'onnxruntime', 'cloudpickle', 'bento_like.serving') if m in sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_bento_model_gives_the_stored_version_and_its_files(tmp_path: Path) -> None:
    tag = save_text(tmp_path, "notes", "hello")

    class Svc:
        notes = bl.models.BentoModel("notes:latest")

    assert Svc.notes in model_refs(Svc).values()  # packaged by a build like any reference
    stored = Svc().notes
    assert stored.tag == tag and Path(stored.path_of("notes.txt")).read_text() == "hello"
    with pytest.raises(ValueError, match="outside"):
        stored.path_of("../../etc/passwd")


def _fake_hf_cache(root: Path, model_id: str, commit: str = "abc123") -> Path:
    repo = root / ("models--" + model_id.replace("/", "--"))
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}")
    return snapshot


def test_hugging_face_model_resolves_from_the_local_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    snapshot = _fake_hf_cache(tmp_path / "hub", "org/tiny")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))

    class Svc:
        model_dir = bl.models.HuggingFaceModel("org/tiny")
        pinned = bl.models.HuggingFaceModel("org/tiny", revision="abc123")
        absent = bl.models.HuggingFaceModel("org/absent")

    svc = Svc()
    assert svc.model_dir == str(snapshot) and svc.pinned == str(snapshot)
    with pytest.raises(FileNotFoundError) as info:
        svc.absent
    assert "'org/absent'" in str(info.value) and "nothing is downloaded" in str(info.value)


def test_hugging_face_model_prefers_the_model_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_hf_cache(tmp_path / "hub", "Org/Tiny")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    snapshot = tmp_path / "snapshot"
    snapshot.mkdir()
    (snapshot / "config.json").write_text('{"from": "store"}')
    bl.models.save("org--tiny", snapshot)

    class Svc:
        model_dir = bl.models.HuggingFaceModel("Org/Tiny")

    assert (Path(Svc().model_dir) / "config.json").read_text() == '{"from": "store"}'

