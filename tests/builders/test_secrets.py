"""What `pkg build` ships from the context: default excludes for secrets and junk, `.bentoignore` (gitignore
syntax), a refusal when a likely secret would ship (unless --allow-secrets), and warnings for private file
modes and a large src/."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from click.testing import CliRunner

import bento_like as bl
from bento_like.bentos import BentoStore
from bento_like.builders._ignore import compile_patterns, last_match
from bento_like.builders.bento import SecretsError, build_bento
from bento_like.cli.main import cli

SERVICE = '''
import bento_like as bl


@bl.service(name="echo")
class Echo:
    @bl.api
    def echo(self, text: str) -> str:
        return text
'''

PRIVATE_KEY = "-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXktdjEAAAAA\n-----END OPENSSH PRIVATE KEY-----\n"


def write(root: Path, rel: str, text: str | bytes = "x\n", mode: int | None = None) -> Path:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    if mode is not None:
        os.chmod(path, mode)
    return path


@pytest.fixture
def project(tmp_path: Path, home: Path) -> Path:
    root = tmp_path / "proj"
    write(root, "service.py", SERVICE)
    write(root, "bentofile.yaml", "service: service.py:Echo\n")
    return root


def shipped(result) -> list[str]:  # type: ignore[no-untyped-def]
    return sorted(f.path.removeprefix("src/") for f in result.bento.info.files if f.path.startswith("src/"))


def test_secrets_and_junk_stay_out_by_default(project: Path) -> None:
    for rel in (".env", ".env.production", ".ssh/id_rsa", ".ssh/config", ".git-credentials", ".netrc",
                "certs/server.key", "certs/server.pem", "config/secrets.json", "deploy/.docker/config.json",
                ".aws/credentials", "app.log", "logs/run.pid", ".git/config", ".venv/lib/x.py"):
        write(project, rel, "secret\n", mode=0o600)
    write(project, ".env.example", "KEY=\n")
    write(project, "small.tar", b"\0" * 1024)
    big = write(project, "data/big.tar", b"")
    os.truncate(big, 11 * 2**20)  # over the archive limit (sparse: nothing to write)
    write(project, "config/settings.json", "{}\n")
    lines: list[str] = []
    result = build_bento(project, progress=lines.append)
    assert shipped(result) == [".env.example", "config/settings.json", "service.py", "small.tar"]
    src = result.bento.path / "src"
    assert not (src / ".env").exists() and not (src / ".ssh").exists()
    log = "\n".join(lines)
    assert "likely secrets" in log and ".env" in log and ".ssh/" in log
    assert any("data/big.tar" in w and "!data/big.tar" in w for w in result.warnings)


def test_bentoignore_is_gitignore_syntax(project: Path) -> None:
    write(project, ".bentoignore", "# data stays home\ndata/\n*.csv\n!keep.csv\n/top.txt\ndocs/**/*.md\n\\#hash.txt\n")
    for rel in ("data/a.py", "x.csv", "sub/y.csv", "keep.csv", "top.txt", "sub/top.txt", "docs/a/b/c.md",
                "docs/readme.txt", "#hash.txt", "notes/data", "lib/data/z.py"):
        write(project, rel)
    result = build_bento(project)
    assert shipped(result) == ["docs/readme.txt", "keep.csv", "notes/data", "service.py", "sub/top.txt"]


@pytest.mark.parametrize(("lines", "path", "is_dir", "ignored"), [
    (["*.log"], "a/b/c.log", False, True),
    (["/build"], "build", True, True),
    (["/build"], "src/build", True, False),
    (["build/"], "build", False, False),  # a trailing slash matches directories only
    (["build/"], "x/build", True, True),
    (["a/**/b"], "a/b", False, True),
    (["a/**/b"], "a/x/y/b", False, True),
    (["**/foo"], "x/foo", False, True),
    (["a/**"], "a/x/y", False, True),
    (["a/**"], "a", True, False),
    (["*.py", "!keep.py"], "keep.py", False, False),
    (["d?t.txt"], "dat.txt", False, True),
    (["d?t.txt"], "d/t.txt", False, False),
    (["[!a]b"], "cb", False, True),
    (["[!a]b"], "ab", False, False),
    (["\\!bang"], "!bang", False, True),
    (["trailing   "], "trailing", False, True),
    (["a*b"], "a/b", False, False),  # `*` never crosses a `/`
])
def test_gitignore_matching(lines: list[str], path: str, is_dir: bool, ignored: bool) -> None:
    found = last_match(compile_patterns(lines, "test"), path, is_dir)
    assert (found is not None and not found.negated) is ignored


def test_a_reincluded_secret_is_refused_unless_allowed(project: Path) -> None:
    write(project, ".env", "API_KEY=hunter2\n", mode=0o600)
    write(project, ".bentoignore", "!.env\n")
    with pytest.raises(SecretsError, match=r"\.env .*--allow-secrets"):
        build_bento(project)
    assert BentoStore().list() == []
    runner = CliRunner()
    refused = runner.invoke(cli, ["build", str(project)])
    assert refused.exit_code == 1
    assert refused.stderr.count("\n") == 1 and refused.stderr.startswith("Error: ")
    assert ".env" in refused.stderr and "--allow-secrets" in refused.stderr
    assert "Traceback" not in refused.output
    allowed = runner.invoke(cli, ["build", str(project), "--allow-secrets"])
    assert allowed.exit_code == 0, allowed.output
    assert "Warning: " in allowed.stderr and ".env" in allowed.stderr
    bento = BentoStore().list()[0]
    assert (bento.path / "src" / ".env").read_text() == "API_KEY=hunter2\n"


def test_secret_content_is_refused_naming_the_file(project: Path) -> None:
    write(project, "settings.py", f"KEY = '''{PRIVATE_KEY}'''\n")
    write(project, "aws.cfg", "aws_access_key_id = AKIAIOSFODNN7EXAMPLE\n")
    with pytest.raises(SecretsError) as caught:
        build_bento(project)
    message = str(caught.value)
    assert "settings.py (a private key)" in message and "aws.cfg (an AWS access key id)" in message
    assert build_bento(project, allow_secrets=True).bento.path.is_dir()


def test_private_modes_and_a_large_src_are_warned_about(project: Path) -> None:
    write(project, "config.ini", "[db]\npassword = x\n", mode=0o600)
    big = write(project, "weights.bin", b"")
    os.truncate(big, 12 * 2**20)
    result = build_bento(project)
    private = [w for w in result.warnings if "config.ini" in w]
    assert private and "0600" in private[0] and "0644" in private[0]
    large = [w for w in result.warnings if "src/ holds" in w]
    assert large and "weights.bin (12.6 MB)" in large[0]
    cli_run = CliRunner().invoke(cli, ["build", str(project), "-o", "json"])
    assert cli_run.exit_code == 0, cli_run.output
    assert "Warning: " in cli_run.stderr and "config.ini" in cli_run.stderr
    assert cli_run.stdout.startswith("{")  # the JSON document stays alone on stdout
