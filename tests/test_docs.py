"""The README's and docs/quickstart.md's code blocks, as a newcomer runs them: each block is run here against a
real quickstart server (and its shown output compared), checked against the file it quotes, run by another test
that says so in a comment before it, or marked `<!-- excerpt: why -->`. A block that is none of these fails."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from live_server import Server

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = REPO / "examples" / "quickstart"
PAGES = [REPO / "README.md", REPO / "docs" / "quickstart.md"]


@dataclass
class Block:
    page: Path
    line: int
    lang: str
    text: str
    marker: str  # the HTML comment on the line before the fence, if any

    @property
    def where(self) -> str:
        return f"{self.page.relative_to(REPO)}:{self.line}"


def blocks(page: Path) -> list[Block]:
    lines = page.read_text().splitlines()
    found, i = [], 0
    while i < len(lines):
        fence = re.match(r"^```(\w*)\s*$", lines[i])
        if fence:
            end = next(j for j in range(i + 1, len(lines)) if lines[j].startswith("```"))
            before = lines[i - 1].strip() if i else ""
            marker = before[4:-3].strip() if before.startswith("<!--") and before.endswith("-->") else ""
            found.append(Block(page, i + 1, fence.group(1), "\n".join(lines[i + 1:end]), marker))
            i = end
        i += 1
    return found


def all_blocks() -> list[Block]:
    return [b for page in PAGES for b in blocks(page)]


@pytest.fixture(scope="module")
def quickstart(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    """`cd examples/quickstart && pkg serve service.py:Demo`, as the pages say, on a free port."""
    server = Server("service.py:Demo", QUICKSTART, [], {**os.environ, "PYTHONUNBUFFERED": "1"},
                    tmp_path_factory.mktemp("quickstart") / "server.log", None)
    server.wait_ready()
    yield server
    server.stop()


def _same(shown: object, got: object) -> bool:
    """JSON values equal, numbers to the 4 decimals a page shows."""
    if isinstance(shown, (int, float)) and isinstance(got, (int, float)) and not isinstance(shown, bool):
        return abs(shown - got) <= 5e-4
    if isinstance(shown, list) and isinstance(got, list):
        return len(shown) == len(got) and all(_same(a, b) for a, b in zip(shown, got))
    if isinstance(shown, dict) and isinstance(got, dict):
        return shown.keys() == got.keys() and all(_same(shown[k], got[k]) for k in shown)
    return shown == got


def _commands_and_outputs(text: str) -> list[tuple[str, list[str]]]:
    """Each command line, with the `# ...` lines right after it: what the page says it prints."""
    pairs: list[tuple[str, list[str]]] = []
    for line in text.splitlines():
        if line.startswith("# ") and pairs:
            pairs[-1][1].append(line[2:])
        elif line.strip() and not line.startswith("#"):
            pairs.append((line, []))
    return pairs


def _shown(output: str) -> str:
    """What a page shows, without its note: `[[0.99]]      (setosa; ...)` -> `[[0.99]]`."""
    return re.split(r"\s{2,}\(", output, maxsplit=1)[0].strip()


def run_shell_block(block: Block, server) -> int:  # type: ignore[no-untyped-def]
    ran = 0
    for command, outputs in _commands_and_outputs(block.text):
        if command.startswith(("cd examples/quickstart", "pkg serve service.py:Demo")):
            continue  # the quickstart fixture is this very server
        command = command.replace("localhost:3000", f"127.0.0.1:{server.port}")
        result = subprocess.run(["bash", "-c", command], capture_output=True, text=True, timeout=30)
        assert result.returncode == 0 and result.stdout, f"{block.where}: {command}\n{result.stderr}"
        if outputs:
            shown, got = _shown(" ".join(outputs)), result.stdout.strip()
            assert _same(json.loads(shown), json.loads(got)), f"{block.where}: {command}\nshown {shown}\ngot   {got}"
        ran += 1
    return ran


def run_python_block(block: Block, server) -> None:  # type: ignore[no-untyped-def]
    code = block.text.replace("http://127.0.0.1:3000", server.url)
    shown = [line[2:] for line in block.text.splitlines() if line.startswith("# ")]
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, f"{block.where}:\n{result.stderr}"
    assert result.stdout.splitlines() == shown, f"{block.where}: shown {shown}, printed {result.stdout!r}"


def check_quoted_service(block: Block) -> None:
    """Every line of the block that is not a comment is in examples/quickstart/service.py, in that order (the
    page may add comments at the ends of lines)."""
    def code(line: str) -> str:
        return re.sub(r"\s+#\s.*$", "", line).rstrip()

    source = [code(line) for line in (QUICKSTART / "service.py").read_text().splitlines()]
    at = 0
    for line in block.text.splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        hits = [i for i in range(at, len(source)) if source[i] == code(line)]
        assert hits, f"{block.where}: {line.strip()!r} is not in examples/quickstart/service.py (after line {at})"
        at = hits[0] + 1


def normalize_run(text: str) -> list[str]:
    text = re.sub(r"127\.0\.0\.1:\d+", "127.0.0.1:PORT", text)
    text = re.sub(r"--port \d+", "--port PORT", text)
    text = re.sub(r"\(in [^)]*examples/quickstart\)", "(in examples/quickstart)", text)
    return [re.sub(r"\s+", " ", line).strip() for line in text.splitlines() if line.strip()]


def test_every_block_is_run_checked_or_marked(quickstart) -> None:  # type: ignore[no-untyped-def]
    run_output = None
    for block in all_blocks():
        text = block.text
        if block.marker.startswith("excerpt"):
            assert block.marker.startswith("excerpt:") and len(block.marker) > 12, \
                f"{block.where}: say why it is an excerpt: <!-- excerpt: why -->"
            continue
        others = re.findall(r"tests/\S+\.py", block.marker)
        if others and "tests/test_docs.py" not in others:
            for name in others:
                assert (REPO / name).is_file() and block.page.name in (REPO / name).read_text(), \
                    f"{block.where}: {name} should run this block (and read {block.page.name})"
            continue
        if block.lang == "python" and "class Demo" in text:
            check_quoted_service(block)
        elif block.lang == "python" and "bl.Client(" in text:
            run_python_block(block, quickstart)
        elif block.lang == "bash" and "python examples/quickstart/run.py" in text:
            run_output = run_output or subprocess.run([sys.executable, "examples/quickstart/run.py"], cwd=REPO,
                                                      capture_output=True, text=True, timeout=120)
            assert run_output.returncode == 0, run_output.stderr
        elif block.lang == "bash" and ("curl " in text or "pkg serve service.py:Demo" in text):
            run_shell_block(block, quickstart)
        elif block.lang == "" and text.startswith("$ pkg serve service.py:Demo"):
            run_output = run_output or subprocess.run([sys.executable, "examples/quickstart/run.py"], cwd=REPO,
                                                      capture_output=True, text=True, timeout=120)
            assert normalize_run(run_output.stdout) == normalize_run(text), \
                f"{block.where}: the page shows\n{text}\nrun.py printed\n{run_output.stdout}"
        else:
            pytest.fail(f"{block.where}: a {block.lang or 'plain'} block that is neither run nor checked here, "
                        "run by a test named before it, nor marked <!-- excerpt: why -->")


def test_the_pages_have_blocks_to_check() -> None:
    found = all_blocks()
    assert len(found) >= 12 and {b.page.name for b in found} == {"README.md", "quickstart.md"}
