"""The README's image section, followed as a newcomer follows it: the quickstart served and asked for a
prediction, then the section's commands read from README.md and run in bash (build, containerize, push), then
the pushed image pulled back, run with runc and asked for the same prediction.

Two substitutions, both for the test's own isolation: the session's registry (a free port) stands in for the one
the README starts on 127.0.0.1:5000, and the base that `pkg base create --python 3.11` made for the session (the
python_base_layout fixture runs that very command) is put where the README's command leaves it, not made again.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from live_server import free_port

REPO = Path(__file__).resolve().parents[2]
SECTION = "### The quickstart as an image"

pytestmark = pytest.mark.slow


def readme_commands() -> list[str]:
    """The bash block of the README's section, one command per line, comments dropped."""
    text = (REPO / "README.md").read_text()
    assert SECTION in text, f"README.md lost its section {SECTION!r}"
    block = text.split(SECTION, 1)[1].split("```bash\n", 1)[1].split("```", 1)[0]
    return [line.split("  #")[0].strip() for line in block.splitlines() if line.strip()]


def _link_or_copy(source: str, target: str) -> None:
    try:
        os.link(source, target)
    except OSError:  # another filesystem
        shutil.copy2(source, target)


def test_readme_image_section_from_base_to_prediction(python_base_layout, registry, run_image,
                                                      tmp_path: Path) -> None:
    commands = readme_commands()
    assert commands[0].startswith("mkdir -p /tmp/registry") and commands[1].startswith("docker-registry serve")
    assert commands[2] == "pkg base create --python 3.11"
    followed = [c.replace("127.0.0.1:5000", registry.host) for c in commands[3:]]
    assert any(c.startswith("pkg containerize ") for c in followed) and followed[0] == "cd examples/quickstart"

    home = tmp_path / "home"  # a newcomer's home: no bento_like state at all
    made = home / ".bento_like" / "images" / "base"
    shutil.copytree(python_base_layout.layout, made, copy_function=_link_or_copy)
    env = {k: v for k, v in os.environ.items() if not k.startswith("BENTO_LIKE_")}
    env.update(HOME=str(home), PIP_CACHE_DIR=os.environ.get("PIP_CACHE_DIR", str(Path.home() / ".cache" / "pip")))
    scripts = Path(sys.executable).parent
    env["PATH"] = f"{scripts}{os.pathsep}{env.get('PATH', '')}"  # `pkg`, as pip installed it
    assert shutil.which("pkg", path=env["PATH"]), "the pkg console script is not installed"
    # the README's quickstart first: `cd examples/quickstart && pkg serve service.py:Demo`, asked for a prediction
    port = free_port()
    serving = subprocess.Popen(["pkg", "serve", "service.py:Demo", "--port", str(port)], cwd=REPO / "examples" /
                               "quickstart", env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        assert _predict(port, 60)[0] > 0.9
    finally:
        serving.terminate()
        assert serving.wait(30) == 0
    result = subprocess.run(["bash", "-euo", "pipefail", "-c", "\n".join(followed)], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    assert "no bentofile.yaml: building with the defaults for `service: service.py:Demo`" in result.stdout

    # what went to the registry is what was built; its code layer holds only the service's files
    layout = home / ".bento_like" / "images" / "demo"
    index = json.loads((layout / "index.json").read_text())
    manifest = json.loads((layout / "blobs" / "sha256" / index["manifests"][-1]["digest"].split(":")[1]).read_text())
    code = manifest["layers"][-1]
    assert code["size"] < 100_000, code
    pulled = tmp_path / "pulled"
    subprocess.run(["skopeo", "copy", "--src-tls-verify=false", f"docker://{registry.host}/demo:v1",
                    f"oci:{pulled}:v1"], check=True, capture_output=True)
    remote = json.loads((pulled / "index.json").read_text())["manifests"][0]["digest"]
    assert remote == index["manifests"][-1]["digest"]

    port = free_port()
    run_image(str(pulled), "v1", env={"BENTO_LIKE_PORT": str(port)})
    probabilities = _predict(port, 90)
    assert abs(sum(probabilities) - 1) < 1e-3 and probabilities[0] > 0.9  # a setosa, as the README says


def _predict(port: int, within: float) -> list[float]:
    """The README's prediction (a setosa's measurements) once the server on `port` is ready."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2).status_code == 200:
                break
        except httpx.TransportError:
            pass
        time.sleep(0.25)
    answer = httpx.post(f"http://127.0.0.1:{port}/predict", json={"x": [[5.1, 3.5, 1.4, 0.2]]}, timeout=10)
    assert answer.status_code == 200, answer.text
    return answer.json()[0]
