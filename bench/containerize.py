"""Image builds: first build, rebuild after a one-line code change, size by layer, digest equality.

The bento serves a 784-4096-4096-10 MLP as an ONNX model (about 80 MB), so its lock carries onnxruntime and
numpy but not torch. The base is Debian bookworm + python3 from debootstrap (built once and cached under
~/.cache/bento_like-bench), or ``--base REF``.

    python bench/containerize.py [--base oci:DIR:TAG]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SERVICE = '''
from typing import Annotated
import numpy as np
import bento_like as bl


@bl.service(name="mlp-onnx")
class MLP:
    session = bl.model("mlp-onnx:latest")

    @bl.api(batchable=True, max_batch_size=64, max_latency_ms=60)
    def predict(self, x: Annotated[np.ndarray, bl.Shape(-1, 784), bl.DType("float32")]) -> np.ndarray:
        return self.session.run(None, {"x": x})[0]
'''


def onnx_mlp(path: Path) -> Path:
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    sizes = [784, 4096, 4096, 10]
    nodes, inits, last = [], [], "x"
    for i, (n_in, n_out) in enumerate(zip(sizes, sizes[1:])):
        w = (rng.standard_normal((n_in, n_out)) / np.sqrt(n_in)).astype(np.float32)
        inits += [numpy_helper.from_array(w, f"w{i}"), numpy_helper.from_array(np.zeros(n_out, np.float32), f"b{i}")]
        nodes += [helper.make_node("MatMul", [last, f"w{i}"], [f"m{i}"]), helper.make_node("Add", [f"m{i}", f"b{i}"], [f"a{i}"])]
        last = f"a{i}"
        if i < len(sizes) - 2:
            nodes.append(helper.make_node("Relu", [last], [f"r{i}"]))
            last = f"r{i}"
    graph = helper.make_graph(
        nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 784])],
        [helper.make_tensor_value_info(last, TensorProto.FLOAT, ["batch", 10])], inits,
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


def debootstrap_base(cache: Path) -> str:
    from bento_like.builders.oci import ImageConfig, LayerSpec, build_image

    layout = cache / "python-base"
    if not (layout / "index.json").exists():
        rootfs = cache / "rootfs"
        shutil.rmtree(rootfs, ignore_errors=True)
        subprocess.run(["debootstrap", "--variant=minbase", "--include=python3", "bookworm", str(rootfs)], check=True,
                       capture_output=True)
        layer = LayerSpec.directory(rootfs, "/", preserve=True, comment="debian bookworm minbase + python3",
                                    exclude=("dev/*", "var/cache/apt/archives/*.deb", "var/cache/apt/*.bin", "var/lib/apt/lists/*"))
        build_image(None, [layer], ImageConfig(cmd=["python3"], user=None,
                    env={"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"}), layout, "python3")
        shutil.rmtree(rootfs)
    return f"oci:{layout}:python3"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", help="base image reference (default: a cached debootstrap bookworm + python3)")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-containerize-"))
    os.environ["BENTO_LIKE_HOME"] = str(work / "home")
    import bento_like as bl
    from bento_like.builders.bento import build_bento
    from bento_like.builders.containerize import containerize

    base = args.base or debootstrap_base(Path("~/.cache/bento_like-bench").expanduser())
    bl.models.save("mlp-onnx", onnx_mlp(work / "mlp.onnx"), framework="onnx")
    project = work / "project"
    project.mkdir()
    (project / "service.py").write_text(SERVICE)
    (project / "bentofile.yaml").write_text(f"service: service.py:MLP\nbase_image: '{base}'\n")

    started = time.perf_counter()
    first_bento = build_bento(project).bento
    build_s = time.perf_counter() - started
    first = containerize(first_bento.tag, output=work / "images", cache_dir=work / "cache")
    (project / "service.py").write_text(SERVICE + "\n# a one-line change\n")
    started = time.perf_counter()
    second_bento = build_bento(project).bento
    rebuild_bento_s = time.perf_counter() - started
    second = containerize(second_bento.tag, output=work / "images", cache_dir=work / "cache")
    fresh = containerize(first_bento.tag, output=work / "images-again", cache_dir=work / "cache-again")
    lock = (first_bento.path / "env" / "requirements.lock.txt").read_text()

    print(f"bento build: first {build_s:.1f} s, after the change {rebuild_bento_s:.1f} s; lock has torch: "
          f"{'torch==' in lock}, onnxruntime: {'onnxruntime==' in lock}")
    print(f"image build: first {first.seconds:.1f} s (pip install of the lock included), rebuild after a one-line "
          f"change {second.seconds:.2f} s = {second.seconds / first.seconds:.1%} of the first (target < 10%)")
    print(f"digest, same bento built twice with empty caches: {first.manifest_digest == fresh.manifest_digest} "
          f"({first.manifest_digest[:19]} / {fresh.manifest_digest[:19]})")
    print(f"{'layer':<34} {'MB':>9} {'first':>7} {'rebuild':>8}")
    for a, b in zip(first.layers, second.layers):
        print(f"{a.comment[:34]:<34} {a.size / 1e6:>9.2f} {a.source:>7} {b.source:>8}")
    print(f"total {sum(layer.size for layer in first.layers) / 1e6:.1f} MB compressed; "
          f"new blobs after the change: {sum(1 for a, b in zip(first.layers, second.layers) if a.digest != b.digest)}")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
