"""The model store's TensorRT adapter: engines are stored like any model and load only where TensorRT runs."""

from __future__ import annotations

from pathlib import Path

import pytest

import bento_like.models as models
from bento_like.models import AdapterError, Signature, TensorSpec, TrustRequiredError
from bento_like.models._tensorrt import unavailable_reason

SIGNATURE = Signature(name="run", inputs=[TensorSpec(name="x", dtype="float32", shape=[-1, 4])])


def test_engine_bytes_and_files_are_stored_with_signature_and_build(tmp_path: Path) -> None:
    tag = models.save("eng", b"\x00serialized", framework="tensorrt", signatures=[SIGNATURE], build={"precision": "fp16"})
    model = models.get(tag)
    assert (model.path / "model.engine").read_bytes() == b"\x00serialized"
    assert model.info.signatures == [SIGNATURE] and model.info.details == {"build": {"precision": "fp16"}}
    (tmp_path / "m.plan").write_bytes(b"plan")
    assert models.get(models.save("plan", tmp_path / "m.plan")).info.framework == "tensorrt"  # by suffix


@pytest.mark.skipif(unavailable_reason() is None, reason="TensorRT and a GPU are here: see bench/gpu_check.py")
def test_load_without_tensorrt_or_gpu_says_what_is_missing() -> None:
    tag = models.save("eng", b"engine", framework="tensorrt")
    with pytest.raises(AdapterError, match=r"cannot load a TensorRT engine here: TensorRT needs an NVIDIA GPU and the tensorrt Python package: .*not importable"):
        models.get(tag).load("cuda")
    with pytest.raises(AdapterError, match=r"device 'cpu' is not a CUDA device"):
        models.get(tag).load("cpu")


def test_an_engine_archive_needs_trust(tmp_path: Path) -> None:
    tag = models.save("eng", b"engine", framework="tensorrt")
    archive = models.export_model(tag, tmp_path / "eng.tar")
    models.delete(tag)
    with pytest.raises(TrustRequiredError):
        models.import_model(archive)
    assert models.import_model(archive, trust=True) == tag
