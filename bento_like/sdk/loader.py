"""Find a service class from a target string: ``file.py:Class``, ``package.module:Class`` or ``module``."""

from __future__ import annotations

import difflib
import importlib
import importlib.util
import os
import sys
import traceback
from pathlib import Path

from .api import ServiceDefinitionError
from .service import ServiceSpec, get_spec, get_spec_or_none


def load_service(target: str, working_dir: str | os.PathLike[str] | None = None) -> ServiceSpec:
    """Import the module a target names and return the spec of the service it points to.

    ``working_dir`` (default: the current directory) goes first on ``sys.path`` so the service's own
    modules import the way they do when the user runs them.
    """
    base = Path(working_dir or os.getcwd()).resolve()
    if str(base) not in sys.path:
        sys.path.insert(0, str(base))
    module_part, _, attr = target.partition(":")
    if module_part.endswith(".py") or os.sep in module_part:
        path = (base / module_part).resolve()
        if not path.is_file():
            raise ServiceDefinitionError(f"service file {str(path)!r} does not exist")
        if str(path.parent) not in sys.path:
            sys.path.insert(0, str(path.parent))
        module = _import_file(path)
    else:
        try:
            module = importlib.import_module(module_part)
        except ModuleNotFoundError as exc:
            if exc.name and module_part.startswith(exc.name):
                raise ServiceDefinitionError(f"cannot import {module_part!r}: no such module (looked in {base})") from None
            raise ServiceDefinitionError(_import_failure(module_part, exc, base)) from exc
        except ServiceDefinitionError:
            raise
        except Exception as exc:
            raise ServiceDefinitionError(_import_failure(module_part, exc, base)) from exc
    services = [v for v in vars(module).values() if get_spec_or_none(v) is not None]
    if attr:
        try:
            obj = module
            for part in attr.split("."):
                obj = getattr(obj, part)
        except AttributeError:
            names = sorted(v.__name__ for v in services)
            close = difflib.get_close_matches(attr, names, n=1)
            hint = (f"; did you mean {module_part}:{close[0]}?" if close
                    else f"; its services: {', '.join(names)}" if names else "")
            raise ServiceDefinitionError(f"{module_part!r} has no attribute {attr!r}{hint}") from None
        return get_spec(obj)
    found = [v for v in services if v.__module__ == module.__name__]
    if len(found) != 1:
        names = ", ".join(sorted(v.__name__ for v in found)) or "none"
        raise ServiceDefinitionError(
            f"{module_part!r} defines {len(found)} services ({names}); name one as {module_part}:ClassName"
        )
    return get_spec(found[0])


def _import_file(path: Path):
    name = path.stem
    existing = sys.modules.get(name)
    if existing is not None and getattr(existing, "__file__", None) and Path(existing.__file__).resolve() == path:
        return existing
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ServiceDefinitionError(f"cannot import {str(path)!r}")
    module = importlib.util.module_from_spec(spec)
    # Registered before it runs so that pickling, dataclasses and msgspec can find classes defined in it.
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except ServiceDefinitionError:
        sys.modules.pop(name, None)
        raise
    except Exception as exc:
        sys.modules.pop(name, None)
        raise ServiceDefinitionError(_import_failure(path.name, exc, path.parent)) from exc
    except BaseException:
        sys.modules.pop(name, None)
        raise
    return module


def _import_failure(what: str, exc: Exception, base: Path) -> str:
    """One line for an exception raised while importing the user's service: where in their code, and what.

    The frame shown is the innermost one in a file under ``base``, the service's folder (the user's line that
    called into a library that raised), else the innermost; a SyntaxError names its own file and line."""
    if isinstance(exc, SyntaxError):
        where = f"{Path(exc.filename or what).name}, line {exc.lineno}"
        text = (exc.text or "").strip()
        return f"cannot import {what}: {where}: SyntaxError: {exc.msg}" + (f": {text}" if text else "")
    frames = traceback.extract_tb(exc.__traceback__)
    root = base.resolve()
    user = [f for f in frames if "site-packages" not in f.filename and Path(f.filename).resolve().is_relative_to(root)]
    frame = (user or frames or [None])[-1]
    where = f"{Path(frame.filename).name}, line {frame.lineno}: " if frame is not None else ""
    return f"cannot import {what}: {where}{type(exc).__name__}: {exc}"
