"""/docs as a person sees it: headless Chromium loads the page of a served service, runs its scripts, and the
rendered DOM must show every API's operation and no error. A screenshot is kept as a test artifact.

Skipped where Debian's ``chromium`` is missing (CI installs it: .ci/run)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import httpx
import pytest

SERVICES = Path(__file__).parent / "services"
REPO = Path(__file__).resolve().parents[2]
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
ARTIFACTS = Path(os.environ.get("BENTO_LIKE_TEST_ARTIFACTS", REPO / "test-artifacts"))
# Chromium reaches for Google's services on its own; none of that is the page's doing, and none may leave.
_QUIET = ["--no-first-run", "--disable-background-networking", "--disable-component-update", "--disable-sync",
          "--disable-default-apps", "--disable-extensions", "--metrics-recording-only", "--no-default-browser-check"]

# In CI a missing browser is a broken setup, not a reason to skip the one test of what a person sees.
pytestmark = pytest.mark.skipif(CHROMIUM is None and not os.environ.get("CI"),
                                reason="needs Debian's chromium (apt-get install chromium)")


def _chromium(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    profile = tmp_path / "chromium-profile"
    command = [CHROMIUM, "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
               f"--user-data-dir={profile}", *_QUIET, "--window-size=1280,2400",
               # the page's own scripts fetch /openapi.json and render it: give them time, in virtual time
               "--virtual-time-budget=15000", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=120)


# Every kind of input, then the documents of the later features: Pydantic schemas, a GET API's query parameters
# and plain-text streams (parity), the routes of tasks, and images, DataFrames, tensors and paths.
TARGETS = ["every_input.py:EveryInput", "parity.py:Parity", "tasks.py:Tasks", "io_types.py:IOTypes"]


@pytest.mark.parametrize("target", TARGETS)
def test_docs_renders_every_api_of_the_openapi_document(start_server, tmp_path: Path, target: str) -> None:
    assert CHROMIUM is not None, "CI must install chromium (.ci/run)"
    server = start_server(target, cwd=SERVICES)
    document = httpx.get(server.url + "/openapi.json", timeout=10).json()
    assert document["openapi"].startswith("3.1")
    routes = {path: next(iter(ops)).upper() for path, ops in document["paths"].items()}
    assert len(routes) >= 5, routes

    result = _chromium(tmp_path, "--dump-dom", server.url + "/docs")
    dom = result.stdout
    assert result.returncode == 0 and "<html" in dom, result.stderr[-2000:]
    assert "Unable to render this definition" not in dom
    assert not re.search(r'class="[^"]*\berrors-wrapper\b', dom), "Swagger UI shows errors"
    rendered = set(re.findall(r'data-path="([^"]+)"', dom))
    assert rendered == set(routes), f"operations rendered {sorted(rendered)}, the document has {sorted(routes)}"
    for path, method in routes.items():
        assert re.search(rf'opblock-summary-method">{method}<', dom), method
    assert document["info"]["title"] in dom

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shot = ARTIFACTS / f"docs-page-{target.split('.')[0]}.png"
    shot.unlink(missing_ok=True)
    result = _chromium(tmp_path, f"--screenshot={shot}", server.url + "/docs")
    assert result.returncode == 0 and shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", result.stderr[-2000:]
