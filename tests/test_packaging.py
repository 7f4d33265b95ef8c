"""Packaging: what a user installs is what the repository holds, and ``import bento_like`` stays light.

An editable install hides packaging mistakes (a package missing from pyproject's list still imports from the
source tree). So besides checking that list against the tree, these tests build an sdist and a wheel from it,
install the wheel with its dependencies into a new venv in a temporary folder, and use only that venv:
``pkg --help``, the import layout, the templates shipped as package data, and a real ``pkg serve`` of the
quickstart answering a prediction and exiting 0 on SIGTERM. Last, ``import bento_like`` must load no ML
framework or docker client and take under 150 ms.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import httpx
import pytest

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

REPO = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
SETUPTOOLS = PYPROJECT["tool"]["setuptools"]
PACKAGE_DIRS: dict[str, str] = SETUPTOOLS["package-dir"]  # package name -> directory in the repository
HEAVY = ("torch", "onnxruntime", "tensorrt", "triton", "docker")
IMPORT_BUDGET_MS = 150


def _repo_packages() -> dict[str, Path]:
    """Every package in the source tree, by the name it installs under.

    Under a code root, any folder holding Python files is a package (one without ``__init__.py`` would be a
    namespace package, still left out of the wheel unless listed). Under ``templates/``, folders are package
    data unless they have an ``__init__.py``.
    """
    found: dict[str, Path] = {}
    for name, folder in PACKAGE_DIRS.items():
        root = REPO / folder
        is_data = name == "bento_like.templates"
        for path in [root, *sorted(p for p in root.rglob("*") if p.is_dir())]:
            if "__pycache__" in path.parts or path.name.endswith(".egg-info"):
                continue
            marker = (path / "__init__.py").is_file() if is_data else any(path.glob("*.py"))
            if not marker:
                continue
            relative = path.relative_to(root).parts
            found[".".join((name, *relative))] = path
    return found


def test_every_package_in_the_tree_is_listed_in_pyproject() -> None:
    listed = set(SETUPTOOLS["packages"])
    in_tree = _repo_packages()
    missing = sorted(set(in_tree) - listed)
    assert not missing, (
        f"packages in the source tree but not in pyproject.toml's [tool.setuptools] packages: {missing}; "
        "add them, or the wheel ships without them"
    )
    stale = sorted(n for n in listed if n not in in_tree)
    assert not stale, f"pyproject.toml lists packages with no folder of Python files: {stale}"


def test_code_packages_have_an_init_file() -> None:
    without = sorted(str(p.relative_to(REPO)) for p in _repo_packages().values() if not (p / "__init__.py").is_file())
    assert not without, f"folders of Python modules without __init__.py (namespace packages by accident): {without}"


# --- the wheel, installed into a fresh venv outside the repository -------------------------------------------


class Installed:
    """A venv holding the wheel built from this repository, and how to run things in it away from the repo."""

    def __init__(self, root: Path, wheel: Path, venv: Path) -> None:
        self.root = root
        self.wheel = wheel
        self.venv = venv
        self.bin = venv / "bin"
        self.python = self.bin / "python"
        self.work = root / "work"  # the cwd of everything run from the venv: outside the repository
        self.work.mkdir()
        # Nothing from the test process may leak in: no PYTHONPATH pointing at the source tree.
        self.env = {k: v for k, v in os.environ.items() if k not in {"PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV"}}
        self.env["PATH"] = f"{self.bin}{os.pathsep}{self.env.get('PATH', '')}"

    def run(self, *args: str | Path, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(a) for a in args], cwd=self.work, env=self.env, capture_output=True, text=True, timeout=timeout
        )


def _source_copy(dest: Path) -> Path:
    """What a build reads, copied out of the repository so that building leaves no build/ or egg-info in it."""
    dest.mkdir()
    for name in ("pyproject.toml", "README.md", *(p.name for p in REPO.glob("LICENSE*"))):
        shutil.copy2(REPO / name, dest / name)
    junk = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info", "build", "dist")
    for folder in sorted(set(PACKAGE_DIRS.values())):
        shutil.copytree(REPO / folder, dest / folder, ignore=junk)
    return dest


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Installed:
    root = tmp_path_factory.mktemp("packaging")
    assert REPO not in root.parents, f"the temporary folder {root} must lie outside the repository"
    source = _source_copy(root / "source")
    dist = root / "dist"
    started = time.monotonic()
    # sdist first, then the wheel from the unpacked sdist: a file missing from the sdist fails here too.
    build = subprocess.run(
        [sys.executable, "-m", "build", "--outdir", str(dist), str(source)],
        capture_output=True, text=True, timeout=300,
    )
    assert build.returncode == 0, f"python -m build failed:\n{build.stdout}\n{build.stderr}"
    (wheel,) = dist.glob("bento_like-*.whl")
    built = time.monotonic()
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    install = subprocess.run(
        [str(venv / "bin" / "python"), "-m", "pip", "install", "--disable-pip-version-check", "-q", str(wheel)],
        capture_output=True, text=True, timeout=600, cwd=root,
    )
    assert install.returncode == 0, f"installing the wheel failed:\n{install.stdout}\n{install.stderr}"
    print(f"\nbuilt sdist+wheel in {built - started:.1f} s, venv with dependencies in {time.monotonic() - built:.1f} s")
    return Installed(root, wheel, venv)


def test_wheel_holds_every_package_and_the_templates(installed: Installed) -> None:
    names = zipfile.ZipFile(installed.wheel).namelist()
    top_level = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert top_level == {"bento_like"}, f"the wheel installs top-level names besides bento_like: {top_level}"
    for package in SETUPTOOLS["packages"]:
        init = package.replace(".", "/") + "/__init__.py"
        assert init in names, f"{init} is not in the wheel"
    templates = REPO / PACKAGE_DIRS["bento_like.templates"]
    for path in templates.rglob("*"):
        if path.is_file() and "__pycache__" not in path.parts and path.suffix != ".pyc":
            member = "bento_like/templates/" + path.relative_to(templates).as_posix()
            assert member in names, f"template {path.relative_to(REPO)} is not shipped in the wheel as {member}"


def test_pkg_help_runs_from_the_venv(installed: Installed) -> None:
    result = installed.run(installed.bin / "pkg", "--help")
    assert result.returncode == 0, result.stderr
    assert "serve" in result.stdout


def test_import_layout_in_the_venv(installed: Installed) -> None:
    probe = """
import importlib.resources, importlib.util, json, bento_like, bento_like.builders, bento_like.kernels
templates = importlib.resources.files("bento_like.templates")
print(json.dumps({
    "bento_like": bento_like.__file__,
    "top_level": {n: importlib.util.find_spec(n) is not None for n in ("builders", "kernels", "templates")},
    "torch": importlib.util.find_spec("torch") is not None,
    "templates": sorted(p.name for p in templates.iterdir()),
    "readme": templates.joinpath("README.md").read_text()[:11],
}))
"""
    result = installed.run(installed.python, "-c", probe)
    assert result.returncode == 0, result.stderr
    found = json.loads(result.stdout)
    assert Path(found["bento_like"]).is_relative_to(installed.venv), f"bento_like imported from {found['bento_like']}"
    assert found["top_level"] == {"builders": False, "kernels": False, "templates": False}
    assert found["torch"] is False, "torch must not come with a plain install of bento_like"
    assert "README.md" in found["templates"] and found["readme"] == "# templates"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_venv_serves_the_quickstart_and_stops_cleanly_on_sigterm(installed: Installed) -> None:
    app_dir = installed.root / "quickstart"
    shutil.copytree(REPO / "examples" / "quickstart", app_dir, ignore=shutil.ignore_patterns("__pycache__"))
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    log_path = installed.root / "serve.log"
    with open(log_path, "wb") as log:
        server = subprocess.Popen(
            [str(installed.bin / "pkg"), "serve", "service.py:Demo", "--host", "127.0.0.1", "--port", str(port)],
            cwd=app_dir, env=installed.env, stdout=log, stderr=subprocess.STDOUT,
        )
    try:
        with httpx.Client(base_url=url, timeout=10, trust_env=False) as http:
            deadline = time.monotonic() + 60
            while True:
                assert server.poll() is None, f"pkg serve exited with {server.returncode}:\n{log_path.read_text()}"
                assert time.monotonic() < deadline, f"not ready after 60 s:\n{log_path.read_text()}"
                try:
                    if http.get("/readyz").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                time.sleep(0.1)
            response = http.post("/predict", json={"x": [[5.1, 3.5, 1.4, 0.2], [6.7, 3.0, 5.2, 2.3]]})
            assert response.status_code == 200, response.text
            setosa, virginica = response.json()
            assert setosa[0] > 0.9 and virginica[2] > 0.9, response.text
    finally:
        if server.poll() is None:
            server.send_signal(signal.SIGTERM)
        try:
            code = server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()
            code = server.wait()
    assert code == 0, f"pkg serve exited with {code} on SIGTERM, not 0:\n{log_path.read_text()}"


def test_quickstart_runner_works_from_an_installed_package(installed: Installed) -> None:
    """The README's first command, minus the install: examples/quickstart/run.py with the venv's python."""
    app_dir = installed.root / "runner"
    shutil.copytree(REPO / "examples" / "quickstart", app_dir, ignore=shutil.ignore_patterns("__pycache__"))
    result = installed.run(installed.python, app_dir / "run.py")
    assert result.returncode == 0, f"{result.stdout}\n{result.stderr}"
    assert "species: setosa, virginica" in result.stdout


# --- import bento_like stays light -----------------------------------------------------------------------------


def test_import_bento_like_loads_no_heavy_framework() -> None:
    probe = f"import sys, bento_like; print(','.join(m for m in {HEAVY!r} if m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, cwd=REPO)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "", f"import bento_like imported {result.stdout.strip()}"


_IMPORTTIME = re.compile(r"^import time:\s+\d+\s+\|\s+(\d+)\s+\|(\s*)bento_like\s*$")


def _import_time_ms() -> float:
    result = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", "import bento_like"],
        capture_output=True, text=True, timeout=60, cwd=REPO,
    )
    assert result.returncode == 0, result.stderr
    # The bento_like line with the least indentation is the top-level import; its cumulative column includes
    # everything that importing it pulled in.
    lines = [m for m in map(_IMPORTTIME.match, result.stderr.splitlines()) if m]
    assert lines, f"no bento_like line in -X importtime output:\n{result.stderr[-2000:]}"
    top = min(lines, key=lambda m: len(m.group(2)))
    return int(top.group(1)) / 1000


def test_import_bento_like_is_fast() -> None:
    # Best of five: the first run may compile .pyc files, and a busy CI machine adds noise to any single run.
    times = [_import_time_ms() for _ in range(5)]
    print(f"\nimport bento_like: {', '.join(f'{t:.1f}' for t in times)} ms (best {min(times):.1f} ms)")
    assert min(times) < IMPORT_BUDGET_MS, f"import bento_like takes {min(times):.1f} ms, over {IMPORT_BUDGET_MS} ms"
