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
