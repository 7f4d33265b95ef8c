"""Mistakes a newcomer makes, as the CLI prints them: each is one `Error:` line on stderr naming what to fix,
a non-zero exit, and no traceback. Run as a person runs it: the `pkg` script in a subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

SERVICE = '''
import bento_like as bl


@bl.service(name="classifier")
class Classifier:
    @bl.api
    def predict(self, text: str) -> str:
        return text
'''


def pkg(*args: str, cwd: Path, env: dict[str, str], stdin: str = "") -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "bento_like", *args]
    return subprocess.run(command, cwd=cwd, env=env, input=stdin, capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    """A home holding one bento (classifier) and one model (weights), and a folder of broken services."""
    root = tmp_path_factory.mktemp("cli-errors")
    env = {**os.environ, "BENTO_LIKE_HOME": str(root / "home"), "NO_COLOR": "1"}
    (root / "app").mkdir()
    (root / "app" / "service.py").write_text(SERVICE)
    built = pkg("build", "app", cwd=root, env=env)
    assert built.returncode == 0, built.stderr
    saved = subprocess.run([sys.executable, "-c", "import bento_like as bl; bl.models.save('weights', {'w': 1}, "
                            "framework='pickle')"], env=env, capture_output=True, text=True, timeout=60)
    assert saved.returncode == 0, saved.stderr
    broken = {
        "bad_tag.py": "import bento_like as bl\n\n@bl.service\nclass Svc:\n    m = bl.model('Weights:Latest!')\n",
        "syntax.py": "import bento_like as bl\n\n@bl.service\nclass Svc(:\n    pass\n",
        "missing_import.py": "import bento_like as bl\nimport torchvisionn\n\n@bl.service\nclass Svc:\n    pass\n",
        "raises.py": "import bento_like as bl\n\nLIMIT = int('ten')\n\n@bl.service\nclass Svc:\n    pass\n",
    }
    for name, text in broken.items():
        (root / name).write_text(text)
    return root, env


MISTAKES = [
    # (what the user typed, a fragment of the one error line, exit code)
    (["serve", "bad_tag.py:Svc"], "cannot import bad_tag.py: bad_tag.py, line 5: InvalidTagError: invalid model", 1),
    (["serve", "syntax.py:Svc"], "cannot import syntax.py: syntax.py, line 4: SyntaxError: ", 1),
    (["serve", "missing_import.py:Svc"],
     "cannot import missing_import.py: missing_import.py, line 2: ModuleNotFoundError: No module named 'torchvisionn'", 1),
    (["serve", "raises.py:Svc"],
     "cannot import raises.py: raises.py, line 3: ValueError: invalid literal for int() with base 10: 'ten'", 1),
    (["serve", "classifer:latest"], "'classifer:latest' is neither a bento (no bento 'classifer:latest'; did you mean "
                                    "classifier:latest?", 1),
    (["get", "classifer"], "no bento 'classifer'; did you mean classifier:latest?", 1),
    (["serve", "app/service.py:Clasifier"], "'app/service.py' has no attribute 'Clasifier'; did you mean "
                                            "app/service.py:Classifier?", 1),
    (["containerize", "classifier:latest", "--base", "oci-archive:nowhere/python3.tar"],
     "base image oci-archive:nowhere/python3.tar: the OCI archive nowhere/python3.tar does not exist", 1),
    (["export", "classifier:latest", "no-such-folder/classifier.tar"],
     "cannot write no-such-folder/classifier.tar: the folder no-such-folder does not exist", 1),
    (["models", "export", "weights:latest", "no-such-folder/weights.tar"],
     "cannot write no-such-folder/weights.tar: the folder no-such-folder does not exist", 1),
    (["models", "delete", "wieghts"], "no model 'wieghts'; did you mean weights:latest?", 1),
    (["build", "."], "and 3 @service classes (bad_tag.py:Svc, missing_import.py:Svc, raises.py:Svc): say which "
                     "(unreadable: syntax.py (SyntaxError: ", 1),
]


@pytest.mark.parametrize("args, fragment, code", MISTAKES, ids=[" ".join(m[0][:2]) for m in MISTAKES])
def test_a_mistake_is_one_error_line(world: tuple[Path, dict[str, str]], args: list[str], fragment: str,
                                     code: int) -> None:
    root, env = world
    result = pkg(*args, cwd=root, env=env, stdin="y\n")
    lines = result.stderr.splitlines()
    assert result.returncode == code, result.stderr
    assert "Traceback" not in result.stderr and result.stdout == "", (result.stdout, result.stderr)
    errors = [line for line in lines if line.startswith("Error: ")]
    assert len(errors) == 1 and fragment in errors[0], result.stderr
    assert len(lines) == 1, f"one line expected, got:\n{result.stderr}"


def test_deleting_an_unknown_model_asks_nothing(world: tuple[Path, dict[str, str]]) -> None:
    root, env = world
    result = pkg("models", "delete", "nosuch", cwd=root, env=env)  # no stdin: a prompt would abort, not hang
    assert result.returncode == 1 and "Delete" not in result.stdout + result.stderr, result.stderr
    assert result.stderr.startswith("Error: no model 'nosuch'")
