"""``pkg deploy``: from a pushed image to what Kubernetes or KServe needs to run it (docs/deploy.md).

``render_bento`` checks the image (it must be in its registry and hold this bento), decides every value from the
bento's manifest and its ``deploy:`` section, and writes a kustomize tree; ``apply`` hands an overlay to
``kubectl apply -k``. Nothing here talks to a cluster itself.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from ...bentos import Bento, BentoStore
from ..containerize import MODELCAR_MOUNT, MODELS_DIR_ENV
from .config import DeployConfig, DeployConfigError, parse_config
from .render import BENTO_ANNOTATION, DeployError, Rendered, config_of, render

__all__ = [
    "BENTO_ANNOTATION", "ApplyPlan", "DeployConfig", "DeployConfigError", "DeployError", "Rendered", "apply",
    "apply_plan", "built_objects", "kubeconfig_present", "measure_startup", "parse_config", "render_bento",
]

BENTO_IMAGE_ANNOTATION = "dev.bento_like.bento"  # what pkg containerize writes into the image's manifest
MODELCAR_MODELS_ENV = {MODELS_DIR_ENV: MODELCAR_MOUNT}  # where KServe shows the modelcar's /models


def render_bento(ref: str, image: str, *, verify_image: bool = True, insecure: bool = False,
                 measure: bool = False, store: BentoStore | None = None,
                 progress: Callable[[str], None] = lambda line: None, **flags: Any) -> Rendered:
    """Render bento ``ref`` deployed from ``image``; ``flags`` are DeployConfig fields that win over the bento's
    own deploy section."""
    bento = (store or BentoStore()).get(ref)
    config = config_of(bento.info, **flags)
    digest = None
    if verify_image:
        digest = _check_image(bento, image, insecure)
        progress(f"image {image}: {digest}, built from {bento.info.tag}")
        if config.model_image:
            _check_image(bento, config.model_image.removeprefix("oci://"), insecure, models_only=True)
    measured = None
    if measure and config.startup_s is None:
        progress(f"measuring how long {bento.info.tag} takes to become ready here ...")
        measured = measure_startup(bento)
    return render(bento, image, config, digest=digest, measured_startup_s=measured, models_env=MODELCAR_MODELS_ENV)


def _check_image(bento: Bento, image: str, insecure: bool, models_only: bool = False) -> str:
    """The digest of ``image`` in its registry, after checking that it was built from this bento."""
    from ..registry import RegistryError, inspect_image

    try:
        remote = inspect_image(image, insecure=insecure, retries=1)
    except RegistryError as exc:
        push = ("pkg containerize " + bento.info.tag + " --model-only --push " + image if models_only
                else f"pkg push {bento.info.tag} {image}")
        raise DeployError(f"image {image} cannot be used: {exc}. Push it first ({push}), or pass "
                          "--no-verify-image to render for an image you will push later") from None
    built_from = remote.annotations.get(BENTO_IMAGE_ANNOTATION)
    if built_from is not None and built_from != bento.info.tag:
        raise DeployError(f"image {image} holds bento {built_from}, not {bento.info.tag}: render the bento it "
                          "holds, or push this one under another tag")
    return remote.digest


def measure_startup(bento: Bento, timeout_s: float = 900.0) -> float:
    """Seconds from starting ``pkg serve <bento>`` here to its /readyz answering 200 (models loaded, warm-ups
    run). The server runs as a process of its own and is stopped afterwards."""
    import httpx

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    started = time.monotonic()
    proc = subprocess.Popen(
        [sys.executable, "-m", "bento_like", "serve", str(bento.path), "--port", str(port), "--log-level", "warning"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True,
    )
    try:
        with httpx.Client(timeout=2.0) as http:
            while time.monotonic() - started < timeout_s:
                if proc.poll() is not None:
                    err = proc.stderr.read().decode(errors="replace")[-2000:] if proc.stderr else ""
                    raise DeployError(f"pkg serve {bento.info.tag} exited with {proc.returncode} before it was "
                                      f"ready:\n{err}")
                try:
                    if http.get(f"http://127.0.0.1:{port}/readyz").status_code == 200:
                        return time.monotonic() - started
                except httpx.HTTPError:
                    pass
                time.sleep(0.2)
        raise DeployError(f"pkg serve {bento.info.tag} was not ready within {timeout_s:g} s: set deploy.startup_s")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


@dataclass(frozen=True)
class ApplyPlan:
    overlay: Path
    command: list[str]


def apply_plan(path: Path, version: str | None = None, context: str | None = None,
               namespace: str | None = None) -> ApplyPlan:
    """The overlay to apply (``path`` is an overlay, or a render's directory with ``version`` or one overlay)
    and the kubectl command that applies it."""
    if (path / "kustomization.yaml").is_file() and path.parent.name == "overlays":
        overlay = path
    else:
        overlays = sorted(p.name for p in (path / "overlays").glob("*") if (p / "kustomization.yaml").is_file())
        if version is not None:
            if version not in overlays:
                raise DeployError(f"{path} has no overlay for version {version}; it has: {', '.join(overlays) or 'none'}")
            overlay = path / "overlays" / version
        elif len(overlays) == 1:
            overlay = path / "overlays" / overlays[0]
        elif not overlays:
            raise DeployError(f"{path} holds no rendered overlay: run pkg deploy render ... -o {path} first")
        else:
            raise DeployError(f"{path} holds several versions ({', '.join(overlays)}): say which with --version")
    command = ["kubectl"]
    if context:
        command += ["--context", context]
    if namespace:
        command += ["--namespace", namespace]
    return ApplyPlan(overlay, command + ["apply", "-k", str(overlay)])


def kubeconfig_present(environ: dict[str, str] | None = None) -> bool:
    env = os.environ if environ is None else environ
    if env.get("KUBECONFIG"):
        return any(Path(p).is_file() for p in env["KUBECONFIG"].split(os.pathsep) if p)
    if env.get("KUBERNETES_SERVICE_HOST"):  # in a pod, kubectl uses its service account
        return True
    return (Path(env.get("HOME") or Path.home()) / ".kube" / "config").is_file()


def apply(plan: ApplyPlan) -> int:
    """Run kubectl as the plan says, its output going to ours; its exit code."""
    if shutil.which("kubectl") is None:
        raise DeployError("kubectl is not installed: install it, or apply the overlay with your own tooling")
    if not kubeconfig_present():
        raise DeployError("no kubeconfig (KUBECONFIG, ~/.kube/config or a pod's service account): kubectl would "
                          f"not know which cluster to apply {plan.overlay} to; see it with --dry-run")
    return subprocess.run(plan.command).returncode


def built_objects(overlay: Path) -> str:
    """What kubectl would apply: ``kubectl kustomize`` of the overlay (offline)."""
    if shutil.which("kubectl") is None:
        raise DeployError("kubectl is not installed: it builds the overlay (kubectl kustomize)")
    proc = subprocess.run(["kubectl", "kustomize", str(overlay)], capture_output=True, text=True, timeout=60)
    if proc.returncode != 0:
        raise DeployError(f"kubectl kustomize {overlay} failed: {proc.stderr.strip()}")
    return proc.stdout

