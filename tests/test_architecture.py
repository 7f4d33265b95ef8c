"""The walls of ARCHITECTURE.md, checked over the installed package.

Every module of ``bento_like`` is parsed with ``ast`` (nothing is imported but the packages themselves), and every
import is collected: at module level, inside functions, under ``if TYPE_CHECKING``, relative ones resolved to
absolute names, and ``importlib.import_module("...")`` with a literal name. A wall is a rule over those names; a
failure names the importing module, the line and the wall. That ``import bento_like`` loads no ML framework is
tests/test_packaging.py's check.
"""

from __future__ import annotations

import ast
import importlib.util
import pkgutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest

import bento_like

# pyproject's package-dir installs these from the repository's top level. An editable install serves them through
# an import hook that pkgutil cannot list from bento_like.__path__, so they are looked up by name.
MAPPED_PACKAGES = ("bento_like.builders", "bento_like.kernels", "bento_like.templates")
WEB_FRAMEWORKS = ("starlette", "uvicorn", "httpx")


@dataclass(frozen=True)
class Import:
    importer: str
    path: Path
    line: int
    target: str  # absolute dotted name


def _module_files(package: str) -> dict[str, Path]:
    """The source file of ``package`` and of every module below it, by dotted name."""
    spec = importlib.util.find_spec(package)
    assert spec is not None and spec.origin is not None, f"{package} is not installed"
    found = {package: Path(spec.origin)}
    for info in pkgutil.iter_modules(spec.submodule_search_locations or []):
        name = f"{package}.{info.name}"
        if info.ispkg:
            found.update(_module_files(name))
            continue
        child = info.module_finder.find_spec(name, None)  # type: ignore[call-arg]
        if child is not None and child.origin is not None and child.origin.endswith(".py"):
            found[name] = Path(child.origin)
    return found


def _all_modules() -> dict[str, Path]:
    modules = {bento_like.__name__: Path(bento_like.__file__)}
    for info in pkgutil.iter_modules(bento_like.__path__):
        name = f"bento_like.{info.name}"
        modules.update(_module_files(name) if info.ispkg else {name: Path(importlib.util.find_spec(name).origin)})
    for package in MAPPED_PACKAGES:
        modules.update(_module_files(package))
    return modules


def _imports(module: str, path: Path) -> list[Import]:
    tree = ast.parse(path.read_text(), filename=str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: list[Import] = []
    for node in ast.walk(tree):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{parent}.{base}" if base else parent
            # `from .. import serving` imports a module as a name: keep both the package and package.name.
            targets = [base] + [f"{base}.{alias.name}" for alias in node.names if alias.name != "*"]
        elif isinstance(node, ast.Call) and _is_dynamic_import(node):
            targets = [node.args[0].value]  # type: ignore[attr-defined]
        found += [Import(module, path, node.lineno, target) for target in targets]
    return found


def _is_dynamic_import(node: ast.Call) -> bool:
    func = node.func
    name = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else None
    return (
        name in ("import_module", "__import__")
        and bool(node.args)
        and isinstance(node.args[0], ast.Constant)
        and isinstance(node.args[0].value, str)
    )


def _within(name: str, *packages: str) -> bool:
    return any(name == p or name.startswith(p + ".") for p in packages)


MODULES = _all_modules()
IMPORTS = [imp for module, path in sorted(MODULES.items()) for imp in _imports(module, path)]


@dataclass(frozen=True)
class Wall:
    text: str  # as ARCHITECTURE.md says it
    applies_to: Callable[[str], bool]  # which importing modules it binds
    forbidden: Callable[[str], bool]  # which imported names break it


WALLS = [
    Wall(
        "sdk never imports serving, builders or cli",
        lambda m: _within(m, "bento_like.sdk"),
        lambda t: _within(t, "bento_like.serving", "bento_like.builders", "bento_like.cli"),
    ),
    Wall(
        "serving never imports builders",
        lambda m: _within(m, "bento_like.serving"),
        lambda t: _within(t, "bento_like.builders"),
    ),
    Wall(
        "builders never imports serving",
        lambda m: _within(m, "bento_like.builders"),
        lambda t: _within(t, "bento_like.serving"),
    ),
    Wall(
        "kernels are leaves: they never import the rest of bento_like",
        lambda m: _within(m, "bento_like.kernels"),
        lambda t: _within(t, "bento_like") and not _within(t, "bento_like.kernels"),
    ),
    Wall(
        "nothing imports cli",
        lambda m: not _within(m, "bento_like.cli", "bento_like.__main__"),
        lambda t: _within(t, "bento_like.cli"),
    ),
    Wall(
        "the batching policy imports nothing of asyncio, pools or metrics: a simulator drives it with its own clock",
        lambda m: m in ("bento_like.serving.batching.policy", "bento_like.serving.batching.estimators"),
        lambda t: _within(t, "asyncio", "threading", "concurrent", "time")
        or (_within(t, "bento_like") and not _within(
            t, "bento_like.serving.tuning", "bento_like.serving.batching.policy", "bento_like.serving.batching.estimators"
        )),
    ),
    Wall(
        "the API description imports no web framework and nothing of serving, builders or cli",
        lambda m: _within(m, "bento_like.description"),
        lambda t: _within(t, *WEB_FRAMEWORKS, "bento_like.serving", "bento_like.builders", "bento_like.cli"),
    ),
]


def test_every_room_the_walls_name_is_found() -> None:
    """A walker that found nothing would pass every wall."""
    rooms = ("sdk", "serving", "serving.batching.policy", "builders", "kernels", "cli", "description")
    missing = [f"bento_like.{r}" for r in rooms if not any(_within(m, f"bento_like.{r}") for m in MODULES)]
    assert not missing, f"no module found for {', '.join(missing)} among the {len(MODULES)} modules of bento_like"
    assert any(_within(i.target, "bento_like.serving") for i in IMPORTS), "no import of serving found at all"


@pytest.mark.parametrize("wall", WALLS, ids=lambda w: w.text.split(":")[0])
def test_wall(wall: Wall) -> None:
    broken: dict[tuple[Path, int], Import] = {}
    for i in IMPORTS:  # one line per import statement, naming the first forbidden name it imports
        if wall.applies_to(i.importer) and wall.forbidden(i.target):
            broken.setdefault((i.path, i.line), i)
    if broken:
        pytest.fail(
            "\n".join(
                f"{i.path}:{i.line}: {i.importer} imports {i.target}, which breaks the wall '{wall.text}'"
                for i in broken.values()
            ),
            pytrace=False,
        )


def test_only_tuning_reads_the_runtime_s_environment() -> None:
    """The runtime's settings are read once, in serving/tuning.py, and sent to the workers with the others:
    no other module of serving names a ``BENTO_LIKE_`` variable (docstrings aside)."""
    found = []
    for module, path in MODULES.items():
        if not _within(module, "bento_like.serving") or module == "bento_like.serving.tuning":
            continue
        tree = ast.parse(path.read_text(), filename=str(path))
        docstrings = {
            id(node.body[0].value)
            for node in ast.walk(tree)
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
            and node.body and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant)
        }
        for node in ast.walk(tree):
            if (isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings
                    and "BENTO_LIKE_" in node.value):
                found.append(f"{path}:{node.lineno}: {module} names {node.value!r}")
    assert not found, "\n".join(found)


def test_the_walker_resolves_relative_imports_and_sees_imports_inside_functions(tmp_path: Path) -> None:
    source = tmp_path / "bento.py"
    source.write_text(
        "from .. import serving\nfrom ..sdk.io import File\n\n"
        "def build():\n    from ..serving import app\n    import importlib\n"
        "    importlib.import_module('bento_like.cli.main')\n"
    )
    found = {(i.line, i.target) for i in _imports("bento_like.builders.bento", source)}
    assert {(1, "bento_like.serving"), (2, "bento_like.sdk.io"), (5, "bento_like.serving.app"),
            (7, "bento_like.cli.main")} <= found
