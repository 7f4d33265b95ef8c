"""Which files of a build context ship in a bento's `src/` (and so in its image's code layer).

Excluded by default: caches, environments and VCS data (junk), archives over ARCHIVE_LIMIT, and files that
usually hold secrets (`.env*`, keys, credentials). Then `.bentoignore` and the build config's `exclude` (both
gitignore syntax, read in that order) may exclude more, or re-include with `!PATTERN`. A file that would ship
and looks like a secret (re-included, or with a private key or token in it) stops the build unless
`allow_secrets`; a private file mode (the image makes every file 0644) and a large src/ are warned about.
"""

from __future__ import annotations

import os
import re
import shutil
import stat
from collections.abc import Sequence
from dataclasses import dataclass, field
from fnmatch import fnmatch
from pathlib import Path

from ..bentos import BentoError
from ._ignore import Pattern, compile_patterns, last_match

IGNORE_FILE = ".bentoignore"
JUNK = (
    "__pycache__/", "*.py[cod]", ".git/", ".hg/", ".svn/", ".venv/", "venv/", ".tox/", ".nox/", ".pytest_cache/",
    ".mypy_cache/", ".ruff_cache/", "*.egg-info/", ".ipynb_checkpoints/", ".idea/", ".vscode/", ".DS_Store",
    "*.swp", "*.log", "*.pid", "bentofile.yaml", IGNORE_FILE,
)
SECRETS = (
    ".env", ".env.*", "!.env.example", "!.env.sample", "!.env.template", ".ssh/", ".aws/", ".gnupg/", ".docker/",
    ".kube/", "id_rsa", "id_dsa", "id_ecdsa", "id_ed25519", "*.key", "*.pem", "*.p12", "*.pfx", "*.jks",
    "*.keystore", "*.kdbx", ".git-credentials", ".netrc", "_netrc", ".pypirc", ".npmrc", ".htpasswd", ".dockercfg",
    "secrets.*", "credentials.json", "*.tfstate", "*.tfstate.backup",
)
ARCHIVES = ("*.tar", "*.tar.*", "*.tgz", "*.zip", "*.7z", "*.rar", "*.gz", "*.bz2", "*.xz", "*.zst")
ARCHIVE_LIMIT = 10 * 2**20  # an archive this big is data (or a model) that belongs in the model store
SRC_WARN_SIZE = 10 * 2**20
SCAN_BYTES = 2**20  # how much of each shipped file is searched for keys and tokens
_CONTENT = {
    "a private key": re.compile(rb"-----BEGIN (?:[A-Z0-9]+ )*PRIVATE KEY(?: BLOCK)?-----"),
    "an AWS access key id": re.compile(rb"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b"),
    "a GitHub token": re.compile(rb"\b(?:gh[pousr]_[A-Za-z0-9]{36,}|github_pat_[A-Za-z0-9_]{60,})\b"),
    "a Slack token": re.compile(rb"\bxox[abprs]-[A-Za-z0-9-]{10,}"),
}
_NAMED = 8  # files named in one message; the rest are counted


class SecretsError(BentoError):
    """A likely secret would ship in the bento; the message names each file and why."""


@dataclass
class Selection:
    files: list[str] = field(default_factory=list)  # POSIX paths relative to the context, sorted
    notes: list[str] = field(default_factory=list)  # what the defaults left out, for the build's progress
    warnings: list[str] = field(default_factory=list)


def select_sources(context: Path, include: Sequence[str], exclude: Sequence[str], *,
                   allow_secrets: bool = False) -> Selection:
    """The files to ship from `context`, or SecretsError when a likely secret is among them."""
    secrets = compile_patterns(SECRETS, "default")
    defaults = [*compile_patterns(JUNK, "default"), *secrets]
    ignore_file = context / IGNORE_FILE
    user = compile_patterns(ignore_file.read_text().splitlines(), IGNORE_FILE) if ignore_file.is_file() else []
    user += compile_patterns(exclude, "exclude")
    patterns = defaults + user
    selection = Selection()
    left_out: list[str] = []
    big_archives: list[tuple[str, int]] = []
    for dirpath, dirnames, filenames in os.walk(context):
        rel_dir = Path(dirpath).relative_to(context).as_posix()
        kept = []
        for name in sorted(dirnames):
            rel = name if rel_dir == "." else f"{rel_dir}/{name}"
            if os.path.islink(os.path.join(dirpath, name)):
                continue  # symlinks are not followed: they could point anywhere on the build machine
            decided = last_match(patterns, rel, True)
            if decided is not None and not decided.negated:
                if decided in secrets:
                    left_out.append(rel + "/")
                continue
            kept.append(name)
        dirnames[:] = kept
        for name in sorted(filenames):
            rel = name if rel_dir == "." else f"{rel_dir}/{name}"
            st = os.lstat(os.path.join(dirpath, name))
            if not stat.S_ISREG(st.st_mode):
                continue
            decided = last_match(patterns, rel, False)
            if decided is not None and not decided.negated:
                if decided in secrets:
                    left_out.append(rel)
                continue
            wanted = decided is not None and decided in user  # re-included by the user: ship it as it is
            if not wanted and st.st_size > ARCHIVE_LIMIT and any(fnmatch(name, p) for p in ARCHIVES):
                big_archives.append((rel, st.st_size))
                continue
            if any(p in ("**", "*") or fnmatch(rel, p) for p in include):
                selection.files.append(rel)
    selection.files.sort()
    if left_out:
        selection.notes.append(f"left out as likely secrets: {_names(left_out)} (ship one with !PATTERN in "
                               f"{IGNORE_FILE} and --allow-secrets)")
    for rel, size in big_archives:
        selection.warnings.append(
            f"left out {rel} ({size / 1e6:.1f} MB archive, over {ARCHIVE_LIMIT // 2**20} MB): data belongs in the "
            f"model store; add '!{rel}' to {IGNORE_FILE} to ship it")
    _check_secrets(context, selection, secrets, allow_secrets)
    _check_modes_and_size(context, selection)
    return selection


def copy_sources(context: Path, files: Sequence[str], dest: Path) -> None:
    for rel in files:
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(context / rel, target)


def _check_secrets(context: Path, selection: Selection, secrets: list[Pattern], allow: bool) -> None:
    found = []
    for rel in selection.files:
        by_name = _secret_name(rel, secrets)
        if by_name is not None:
            found.append(f"{rel} (name matches {by_name.text!r})")
            continue
        with open(context / rel, "rb") as f:
            head = f.read(SCAN_BYTES)
        what = next((what for what, regex in _CONTENT.items() if regex.search(head)), None)
        if what is not None:
            found.append(f"{rel} ({what})")
    if not found:
        return
    listed = "; ".join(found)
    if not allow:
        raise SecretsError(
            f"likely secrets would ship in the bento and its image: {listed}. Exclude them in {IGNORE_FILE} "
            f"(gitignore syntax), or pass --allow-secrets (allow_secrets=True) to ship them anyway")
    selection.warnings.append(f"shipping likely secrets because of --allow-secrets: {listed}")


def _secret_name(rel: str, secrets: list[Pattern]) -> Pattern | None:
    """The default secret pattern matching the file or one of its directories (re-included by the user)."""
    parts = rel.split("/")
    for depth in range(1, len(parts) + 1):
        decided = last_match(secrets, "/".join(parts[:depth]), depth < len(parts))
        if decided is not None and not decided.negated:
            return decided
    return None


def _check_modes_and_size(context: Path, selection: Selection) -> None:
    sizes, private = [], []
    for rel in selection.files:
        st = (context / rel).stat()
        sizes.append((st.st_size, rel))
        if not st.st_mode & 0o044:
            private.append(f"{rel} ({stat.S_IMODE(st.st_mode):04o})")
    if private:
        selection.warnings.append(
            f"{len(private)} file(s) readable by their owner only will be readable by everyone (0644) in the bento "
            f"and its image: {_names(private)}; exclude them in {IGNORE_FILE} if they are private")
    total = sum(size for size, _ in sizes)
    if total > SRC_WARN_SIZE:
        largest = ", ".join(f"{rel} ({size / 1e6:.1f} MB)" for size, rel in sorted(sizes, reverse=True)[:5])
        selection.warnings.append(
            f"src/ holds {total / 1e6:.1f} MB (over {SRC_WARN_SIZE // 2**20} MB), every image rebuild and push "
            f"carries it; largest: {largest}. Models and data belong in the model store; exclude the rest in "
            f"{IGNORE_FILE}")


def _names(items: Sequence[str]) -> str:
    shown = ", ".join(items[:_NAMED])
    return shown if len(items) <= _NAMED else f"{shown} and {len(items) - _NAMED} more"
