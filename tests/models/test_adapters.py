"""Each framework adapter round-trips a real model: outputs before save equal outputs after load."""

from __future__ import annotations

import logging
import sys
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime
import pytest
import torch
from models_testlib import DataDependentNet, NearestCentroid, TiedNet, TinyNet
from onnx import TensorProto, helper, numpy_helper

import bento_like as bl
from bento_like.models import Adapter, AdapterError, ModelStoreError, Saved, _registry
from bento_like.models._onnx import choose_providers
from bento_like.models._torch import ClassNotImportableError


@pytest.fixture
def x() -> torch.Tensor:
    return torch.randn(5, 8, generator=torch.Generator().manual_seed(1))


@pytest.fixture
def tiny() -> TinyNet:
    torch.manual_seed(0)
    return TinyNet()


# torch -------------------------------------------------------------------------------------------------


def test_torch_eager_roundtrip(tiny: TinyNet, x: torch.Tensor) -> None:
    tiny.train()
    expected = tiny.eval()(x)
    tiny.train()
    model = bl.models.get(bl.models.save("tiny", tiny))
    assert model.info.framework == "torch"
    assert model.info.details == {"module_class": "models_testlib.TinyNet", "forms": ["eager"]}
    assert sorted(f.path for f in model.info.files) == ["module.pkl", "weights.pt"]
    loaded = model.load(device="cpu")
    assert type(loaded) is TinyNet and not loaded.training
    assert loaded.describe() == "TinyNet(8)"  # the user's own class, methods and all
    assert torch.equal(loaded(x), expected)
    assert torch.equal(loaded.offset, tiny.offset)  # non-persistent buffers travel in the structure
    assert tiny.training  # saving did not change the caller's module


def _mapped_file(address: int) -> str | None:
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split()
        low, high = (int(bound, 16) for bound in fields[0].split("-"))
        if low <= address < high:
            return fields[5] if len(fields) > 5 else None
    return None


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs /proc (Linux)")
def test_torch_weights_are_mapped_not_copied(tiny: TinyNet) -> None:
    model = bl.models.get(bl.models.save("tiny", tiny))
    loaded = model.load()
    weight = loaded.hidden.weight
    assert isinstance(weight, torch.nn.Parameter) and weight.requires_grad
    assert _mapped_file(weight.data_ptr()) == str(model.path / "weights.pt")
    assert _mapped_file(tiny.hidden.weight.data_ptr()) != str(model.path / "weights.pt")  # the control


def test_torch_tied_weights_stay_tied() -> None:
    torch.manual_seed(0)
    net = TiedNet()
    tokens = torch.tensor([[1, 2, 3, 10]])
    loaded = bl.models.get(bl.models.save("tied", net)).load()
    assert loaded.head.weight is loaded.embed.weight
    assert torch.equal(loaded(tokens), net(tokens))


def test_torch_exported_roundtrip_with_dynamic_batch(tiny: TinyNet, x: torch.Tensor) -> None:
    batch = torch.export.Dim("batch")
    tag = bl.models.save("tiny", tiny, example_inputs=(x,), dynamic_shapes=({0: batch},))
    model = bl.models.get(tag)
    assert model.info.details["forms"] == ["eager", "exported"]
    (signature,) = model.info.signatures
    assert [(s.name, s.dtype, s.shape) for s in signature.inputs] == [("x", "float32", [-1, 8])]
    assert [(s.dtype, s.shape) for s in signature.outputs] == [("float32", [-1, 3])]
    exported = model.load(form="exported")
    assert not isinstance(exported, TinyNet)
    other = torch.randn(11, 8)
    assert torch.equal(exported(x), tiny.eval()(x))
    assert torch.equal(exported(other), tiny(other))
    assert type(model.load()) is TinyNet  # auto prefers the eager form while the class imports


def test_torch_without_the_class_falls_back_to_the_exported_program(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, x: torch.Tensor, caplog: pytest.LogCaptureFixture
) -> None:
    package = tmp_path / "userpkg"
    package.mkdir()
    (package / "user_net.py").write_text(
        textwrap.dedent(
            """
            import torch
            class UserNet(torch.nn.Module):
                def __init__(self):
                    super().__init__()
                    self.linear = torch.nn.Linear(8, 2)
                def forward(self, x):
                    return torch.tanh(self.linear(x))
            """
        )
    )
    monkeypatch.syspath_prepend(str(package))
    import user_net

    torch.manual_seed(0)
    net = user_net.UserNet()
    expected = net(x)
    with_program = bl.models.save("user", net, example_inputs=(x,))
    eager_only = bl.models.save("user-eager", net)
    # The class is gone, as on a machine that has the model but not the training code.
    monkeypatch.delitem(sys.modules, "user_net")
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p != str(package)])

    with caplog.at_level(logging.WARNING, logger="bento_like.models._torch"):
        loaded = bl.models.get(with_program).load()
    assert "loading the exported program instead" in caplog.text
    assert torch.equal(loaded(x), expected)
    with pytest.raises(ClassNotImportableError, match="user_net"):
        bl.models.get(with_program).load(form="eager")
    with pytest.raises(ClassNotImportableError, match="save the model with example_inputs="):
        bl.models.get(eager_only).load()
    with pytest.raises(ModelStoreError, match="has no exported program"):
        bl.models.get(eager_only).load(form="exported")


def test_torch_module_that_cannot_export_is_saved_eager_only(x: torch.Tensor) -> None:
    torch.manual_seed(0)
    net = DataDependentNet()
    example = torch.ones(2, 4)
    with pytest.warns(UserWarning, match="torch.export could not export DataDependentNet"):
        tag = bl.models.save("dd", net, example_inputs=example)
    model = bl.models.get(tag)
    assert model.info.details["forms"] == ["eager"]
    assert [(s.name, s.shape) for s in model.info.signatures[0].inputs] == [("x", [2, 4])]
    loaded = model.load()
    assert torch.equal(loaded(example), net(example)) and torch.equal(loaded(-example), net(-example))


def test_torch_load_rejects_unknown_form(tiny: TinyNet) -> None:
    with pytest.raises(ValueError, match="form must be one of"):
        bl.models.get(bl.models.save("tiny", tiny)).load(form="compiled")


# onnx --------------------------------------------------------------------------------------------------


def _onnx_model() -> onnx.ModelProto:
    weight = np.random.default_rng(0).standard_normal((4, 3)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"]), helper.make_node("Relu", ["y"], ["z"])],
        "linear_relu",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("z", TensorProto.FLOAT, ["batch", 3])],
        [numpy_helper.from_array(weight, "w")],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(proto)
    return proto


def _run(session: Any, inputs: np.ndarray) -> np.ndarray:
    return session.run(None, {"x": inputs})[0]


def test_onnx_roundtrip_from_proto_and_from_path(tmp_path: Path) -> None:
    proto = _onnx_model()
    inputs = np.random.default_rng(1).standard_normal((6, 4)).astype(np.float32)
    expected = _run(onnxruntime.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"]), inputs)
    tag = bl.models.save("lin", proto)
    model = bl.models.get(tag)
    (signature,) = model.info.signatures
    assert [(s.name, s.dtype, s.shape) for s in signature.inputs] == [("x", "float32", [-1, 4])]
    assert [(s.name, s.dtype, s.shape) for s in signature.outputs] == [("z", "float32", [-1, 3])]
    session = model.load(device="cpu")
    assert isinstance(session, onnxruntime.InferenceSession)
    assert session.get_providers() == ["CPUExecutionProvider"]
    np.testing.assert_array_equal(_run(session, inputs), expected)
    path = tmp_path / "lin.onnx"
    onnx.save(proto, path)
    assert bl.models.save("lin", path) == tag  # the same bytes, the same version


def test_onnx_path_with_external_data(tmp_path: Path) -> None:
    proto = _onnx_model()
    inputs = np.ones((2, 4), dtype=np.float32)
    expected = _run(onnxruntime.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"]), inputs)
    path = tmp_path / "ext.onnx"
    onnx.save_model(proto, path, save_as_external_data=True, location="ext.data", size_threshold=0)
    model = bl.models.get(bl.models.save("ext", path))
    assert sorted(f.path for f in model.info.files) == ["ext.data", "model.onnx"]
    np.testing.assert_array_equal(_run(model.load(), inputs), expected)


def test_onnx_on_a_cuda_device_without_cuda_runs_on_cpu(caplog: pytest.LogCaptureFixture) -> None:
    model = bl.models.get(bl.models.save("lin", _onnx_model()))
    expected = "CUDAExecutionProvider" in onnxruntime.get_available_providers()
    with caplog.at_level(logging.WARNING):
        session = model.load(device="cuda")
    assert ("CUDAExecutionProvider" in session.get_providers()) == expected
    if not expected:
        assert "no CUDA provider" in caplog.text


def test_provider_choice() -> None:
    both = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert choose_providers("cpu", both) == ["CPUExecutionProvider"]
    assert choose_providers("cuda:1", both) == [("CUDAExecutionProvider", {"device_id": 1}), "CPUExecutionProvider"]
    assert choose_providers("cuda", both)[0] == ("CUDAExecutionProvider", {"device_id": 0})
    assert choose_providers("cuda", ["CPUExecutionProvider"]) == ["CPUExecutionProvider"]


# pickle and files --------------------------------------------------------------------------------------


def test_pickle_roundtrip_of_an_estimator() -> None:
    rng = np.random.default_rng(0)
    features, classes = rng.standard_normal((40, 3)), np.arange(40) % 3
    estimator = NearestCentroid().fit(features, classes)
    queries = rng.standard_normal((10, 3))
    model = bl.models.get(bl.models.save("nc", estimator))
    assert model.info.framework == "pickle"
    assert model.info.details == {"object_type": "models_testlib.NearestCentroid"}
    np.testing.assert_array_equal(model.load().predict(queries), estimator.predict(queries))


def test_pickle_of_a_function_defined_on_the_fly() -> None:
    scale = 3

    def tokenizer(text: str) -> list[str]:
        return [word * scale for word in text.split()]

    loaded = bl.models.get(bl.models.save("tok", tokenizer, framework="pickle")).load()
    assert loaded("a b") == ["aaa", "bbb"]


def test_unpicklable_object_says_so() -> None:
    session = onnxruntime.InferenceSession(_onnx_model().SerializeToString(), providers=["CPUExecutionProvider"])
    with pytest.raises(AdapterError, match="cannot pickle"):
        bl.models.save("sess", session)


def test_files_roundtrip_for_a_directory(tmp_path: Path) -> None:
    source = tmp_path / "tokenizer"
    (source / "sub").mkdir(parents=True)
    (source / "vocab.txt").write_text("a\nb\n")
    (source / "sub" / "merges.bin").write_bytes(bytes(range(256)))
    model = bl.models.get(bl.models.save("tok", source))
    loaded = model.load()
    assert loaded == model.path / "files" / "tokenizer"
    assert (loaded / "vocab.txt").read_text() == "a\nb\n"
    assert (loaded / "sub" / "merges.bin").read_bytes() == bytes(range(256))


def test_files_missing_path_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ModelStoreError, match="no such file or directory"):
        bl.models.save("m", str(tmp_path / "typo.txt"))


# the registry ------------------------------------------------------------------------------------------


class Text:
    def __init__(self, body: str) -> None:
        self.body = body


class TextAdapter(Adapter):
    framework = "text"

    def can_save(self, obj: Any) -> bool:
        return isinstance(obj, Text)

    def save(self, obj: Text, dest: Path, *, encoding: str = "utf-8") -> Saved:
        (dest / "body.txt").write_text(obj.body, encoding=encoding)
        return Saved(details={"encoding": encoding})

    def load(self, model: Any, device: str) -> Text:
        return Text((model.path / "body.txt").read_text(encoding=model.info.details["encoding"]))

    def runs_code_on_load(self, info: Any) -> bool:
        return False


def test_a_registered_adapter_saves_and_loads(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_registry, "_adapters", dict(_registry._adapters))
    monkeypatch.setattr(_registry, "_user_order", [])
    bl.models.register_adapter(TextAdapter())
    model = bl.models.get(bl.models.save("doc", Text("héllo"), encoding="utf-16"))
    assert (model.info.framework, model.info.details) == ("text", {"encoding": "utf-16"})
    assert model.load().body == "héllo"
    with pytest.raises(AdapterError, match="already registered"):
        bl.models.register_adapter(TextAdapter())


def test_unknown_framework_lists_registered_ones(tmp_path: Path) -> None:
    with pytest.raises(AdapterError, match="no adapter for framework 'tensorflow' .*files, onnx, pickle, tensorrt, torch"):
        bl.models.save("m", tmp_path, framework="tensorflow")
