"""Model store vs plain torch.save/torch.load on a ~100 MB PyTorch module, in one run.

    python bench/store.py [--repeat 5] [--hidden 4096]

Save: `bl.models.save` (state dict + structure + sha256 of every file + manifest + atomic rename) against
`torch.save(module)`, each into a new file or store. Load: each load runs in a fresh interpreter (torch
already imported, not timed) so that peak RSS means something; the store's load is the default one, with every
file's digest verified. Files are in the page cache for both (they were just written). Medians of --repeat.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

_LOADER = r"""
import json, sys, time
import torch
import bento_like.models as models

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024  # MiB

kind, where, tag = sys.argv[1], sys.argv[2], sys.argv[3]
torch.set_num_threads(1)
x = torch.randn(8, 1024)
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # reset the peak to the current RSS: the peak below is the load's own
before = status("VmRSS")
start = time.perf_counter()
if kind == "torch":
    module = torch.load(where, weights_only=False)
else:
    module = models.ModelStore(where).get(tag).load("cpu", verify=(kind == "store"))
seconds = time.perf_counter() - start
peak = status("VmHWM") - before
with torch.no_grad():
    module(x)  # touches every weight: mapped pages count from here on
after_forward = status("VmRSS") - before
print(json.dumps({"seconds": seconds, "peak_mib": peak, "after_forward_mib": after_forward}))
"""


def build(hidden: int):  # type: ignore[no-untyped-def]
    import torch

    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(1024, hidden), torch.nn.ReLU(),
        torch.nn.Linear(hidden, hidden), torch.nn.ReLU(),
        torch.nn.Linear(hidden, 1024),
    )


def load_in_fresh_process(kind: str, where: Path, tag: str) -> dict[str, float]:
    result = subprocess.run(
        [sys.executable, "-c", _LOADER, kind, str(where), tag], capture_output=True, text=True, check=True
    )
    return json.loads(result.stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--hidden", type=int, default=4096, help="4096 gives 96 MiB of float32 weights")
    args = parser.parse_args()

    import torch

    import bento_like.models as models

    module = build(args.hidden)
    weights_mib = sum(p.numel() * p.element_size() for p in module.parameters()) / 2**20
    with tempfile.TemporaryDirectory(prefix="bench-store-") as scratch:
        work = Path(scratch)
        save_torch, save_store = [], []
        tag = ""
        for i in range(args.repeat):
            def plain(i: int = i) -> None:
                start = time.perf_counter()
                torch.save(module, work / f"plain-{i}.pt")
                save_torch.append(time.perf_counter() - start)

            def ours(i: int = i) -> str:
                start = time.perf_counter()
                saved = models.ModelStore(work / f"store-{i}").save("mlp", module)
                save_store.append(time.perf_counter() - start)
                return saved

            if i % 2:  # alternate which goes first, so write-back of the other's pages hits both alike
                tag = ours()
                plain()
            else:
                plain()
                tag = ours()

        loads: dict[str, list[dict[str, float]]] = {"torch": [], "store": [], "store-noverify": []}
        for i in range(args.repeat):  # interleaved, so drift hits all three alike
            loads["torch"].append(load_in_fresh_process("torch", work / f"plain-{i}.pt", ""))
            loads["store"].append(load_in_fresh_process("store", work / f"store-{i}", tag))
            loads["store-noverify"].append(load_in_fresh_process("store-noverify", work / f"store-{i}", tag))

    def median(kind: str, key: str) -> float:
        return statistics.median(run[key] for run in loads[kind])

    rows = [
        ("save (s)", statistics.median(save_torch), statistics.median(save_store)),
        ("load (s)", median("torch", "seconds"), median("store", "seconds")),
        ("load, verify=False (s)", median("torch", "seconds"), median("store-noverify", "seconds")),
        ("peak RSS during load (MiB)", median("torch", "peak_mib"), median("store", "peak_mib")),
        ("RSS after 1st forward (MiB)", median("torch", "after_forward_mib"), median("store", "after_forward_mib")),
    ]
    print(f"{weights_mib:.0f} MiB of float32 weights, torch {torch.__version__}, median of {args.repeat}")
    print(f"{'':30} {'torch.save/load':>16} {'bl.models':>12} {'ratio':>7}")
    for label, plain, ours in rows:
        print(f"{label:30} {plain:16.3f} {ours:12.3f} {ours / plain:7.2f}x")


if __name__ == "__main__":
    main()
