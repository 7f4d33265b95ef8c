"""The rendered Deployment run for real: a bento built, containerized on a Debian + python3 base, pushed to the
local registry, rendered by pkg deploy (which checks the registry holds that bento's image), and its pod
template run by `podman kube play --network host`. /readyz reaches 200, a prediction answers, the exec liveness
probe passes through `podman healthcheck run`, and the pod's security context holds (non-root, read-only root,
/tmp writable).

podman stands in for a kubelet (REFERENCE.md): host networking needs the container's `ports` left out, only the
liveness probe becomes a health check, and catatonit plus raised ulimits (CONTAINERS_CONF) are needed.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import httpx
import pytest
import yaml

import bento_like as bl
from bento_like.builders.bento import build_bento
from bento_like.builders.containerize import containerize
from bento_like.builders.deploy import DeployError, render_bento
from bento_like.builders.registry import push_image

from live_server import free_port

SERVICE = '''
import numpy as np
import bento_like as bl


@bl.service(name="Doubler", resources={"cpu": "500m", "memory": "512Mi"}, traffic={"timeout": 15})
class Doubler:
    weights = bl.model("doubler-weights:latest")

    @bl.api
    def predict(self, x: np.ndarray) -> np.ndarray:
        return x * self.weights["scale"]
'''

pytestmark = pytest.mark.slow


def _podman(root: Path, env: dict[str, str], *args: str, check: bool = True,
            timeout: float = 300) -> subprocess.CompletedProcess[str]:
    base = ["podman", "--root", str(root / "storage"), "--runroot", str(root / "run"), "--tmpdir", str(root / "tmp"),
            "--storage-driver", "vfs", "--runtime", "runc", "--cgroup-manager", "cgroupfs", "--events-backend", "file"]
    return subprocess.run([*base, *args], env=env, capture_output=True, text=True, check=check, timeout=timeout)


def test_rendered_pod_template_runs_under_podman_kube_play(tmp_path: Path, home: Path, python_base_layout,
                                                            registry) -> None:
    for binary in ("podman", "runc", "catatonit"):
        if shutil.which(binary) is None and not Path(f"/usr/libexec/podman/{binary}").exists():
            pytest.skip(f"needs {binary} (apt-get install podman runc catatonit)")
    if os.geteuid() != 0:
        pytest.skip("podman with runc and private vfs storage needs root here")

    bl.models.save("doubler-weights", {"scale": 2.0}, framework="pickle")
    project = tmp_path / "proj"
    project.mkdir()
    (project / "service.py").write_text(SERVICE)
    base = f"oci:{python_base_layout.layout}:{python_base_layout.tag}"
    (project / "bentofile.yaml").write_text(f"service: service.py:Doubler\nbase_image: '{base}'\n"
                                            "deploy:\n  probe: exec\n  autoscale: none\n  drain_s: 1\n")
    tag = build_bento(project).bento.tag
    image = containerize(tag, output=tmp_path / "image")
    reference = f"{registry.host}/deploy/doubler:v1"
    push_image(image.layout, reference, source_tag=image.tag)

    with pytest.raises(DeployError, match="Push it first"):  # a tag the registry does not hold
        render_bento(tag, f"{registry.host}/deploy/doubler:v2")
    port = free_port()
    rendered = render_bento(tag, reference, port=port)  # checks the registry holds this bento's image
    assert rendered.image == f"{reference}@{image.manifest_digest}"
    deployment = next(d for d in rendered.documents if d["kind"] == "Deployment")
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    assert container["livenessProbe"]["exec"]["command"][:4] == ["python3", "-m", "bento_like", "probe"]
    del container["ports"]  # host networking: podman would otherwise try to publish them
    manifest = tmp_path / "deployment.yaml"
    manifest.write_text(yaml.safe_dump(deployment, sort_keys=False))

    # short: podman refuses a runroot over 50 characters (conmon's attach socket lives there)
    root = Path(tempfile.mkdtemp(prefix="bento-kube-"))
    conf = root / "containers.conf"
    conf.write_text('[containers]\ndefault_ulimits = ["nofile=20000:20000", "nproc=4096:4096"]\n')
    registries = root / "registries.conf"
    registries.write_text(f'unqualified-search-registries = []\n\n[[registry]]\nlocation = "{registry.host}"\n'
                          "insecure = true\n")
    env = {**os.environ, "CONTAINERS_CONF": str(conf), "CONTAINERS_REGISTRIES_CONF": str(registries)}
    try:
        played = _podman(root, env, "kube", "play", "--network", "host", "--tls-verify=false", str(manifest),
                         check=False, timeout=600)
        assert played.returncode == 0, played.stdout + played.stderr
        names = _podman(root, env, "ps", "--format", "{{.Names}}").stdout.split()
        server = next(n for n in names if n.endswith("-bento"))
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        status = None
        while time.monotonic() < deadline:
            try:
                status = httpx.get(url + "/readyz", timeout=5).status_code
            except httpx.HTTPError:
                status = None
            if status == 200:
                break
            time.sleep(0.5)
        logs = _podman(root, env, "logs", server, check=False)
        assert status == 200, f"/readyz never answered 200 (last: {status}):\n{logs.stdout}{logs.stderr}"
        r = httpx.post(url + "/predict", json={"x": [1.0, 2.5]}, timeout=30)
        assert r.status_code == 200 and r.json() == [2.0, 5.0], r.text

        health = _podman(root, env, "healthcheck", "run", server, check=False)
        assert health.returncode == 0, health.stdout + health.stderr  # the rendered exec liveness probe
        who = _podman(root, env, "exec", server, "python3", "-c", "import os; print(os.getuid())").stdout.strip()
        assert who == "10001"
        write = _podman(root, env, "exec", server, "python3", "-c",
                        "open('/tmp/ok', 'w').write('x'); open('/home/bento/bento/x', 'w')", check=False)
        assert write.returncode != 0 and "Read-only file system" in write.stderr, write.stderr
    finally:
        _podman(root, env, "kube", "down", str(manifest), check=False, timeout=120)
        _podman(root, env, "system", "reset", "--force", check=False, timeout=300)
        shutil.rmtree(root, ignore_errors=True)
