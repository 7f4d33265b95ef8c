"""gitignore-syntax patterns: `.bentoignore`, the build config's `exclude`, and the build's default excludes.

The rules are git's: `#` starts a comment, `!` re-includes, a trailing `/` matches directories only, a `/` at the
start or in the middle anchors the pattern to the context's root (otherwise it matches at any depth), `*` and `?`
never match `/`, `**/`, `/**/` and `/**` match any number of directories, and a backslash escapes the next
character. The last pattern that matches a path decides; a file under an excluded directory stays excluded.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Pattern:
    text: str  # as written, for messages
    source: str  # where it was written, with the line: ".bentoignore:3", "exclude:1"
    negated: bool
    dir_only: bool
    regex: re.Pattern[str]

    def matches(self, path: str, is_dir: bool) -> bool:
        return (is_dir or not self.dir_only) and self.regex.match(path) is not None


def compile_patterns(lines: Iterable[str], source: str) -> list[Pattern]:
    """One Pattern per meaningful line; `source` names where the lines come from."""
    patterns = []
    for number, raw in enumerate(lines, 1):
        line = raw.rstrip("\r\n")
        line = re.sub(r"(?<!\\)[ \t]+$", "", line)  # trailing blanks go unless escaped, as in git
        if not line or line.startswith("#"):
            continue
        negated = line.startswith("!")
        body = line[1:] if negated else line
        dir_only = body.endswith("/")
        body = body.rstrip("/")
        if not body:
            continue
        anchored = "/" in body
        body = body.lstrip("/")
        prefix = "" if anchored else "(?:.*/)?"
        patterns.append(Pattern(line, f"{source}:{number}", negated, dir_only, re.compile(prefix + _translate(body) + r"\Z")))
    return patterns


def last_match(patterns: Sequence[Pattern], path: str, is_dir: bool) -> Pattern | None:
    """The pattern that decides `path` (POSIX, relative to the root): the last one matching it, or None."""
    for pattern in reversed(patterns):
        if pattern.matches(path, is_dir):
            return pattern
    return None


def _translate(glob: str) -> str:
    out, i, n = [], 0, len(glob)
    while i < n:
        c = glob[i]
        if c == "*":
            if glob.startswith("**", i) and (i == 0 or glob[i - 1] == "/") and (i + 2 == n or glob[i + 2] == "/"):
                if i + 2 == n:
                    out.append(".*")  # `a/**`: everything inside a
                    i += 2
                else:
                    out.append("(?:.*/)?")  # `**/b`, `a/**/b`: zero or more directories
                    i += 3
                continue
            while i < n and glob[i] == "*":
                i += 1
            out.append("[^/]*")
            continue
        if c == "?":
            out.append("[^/]")
        elif c == "[":
            end = _class_end(glob, i)
            if end < 0:
                out.append(re.escape(c))
            else:
                content = glob[i + 1:end]
                negate = content[:1] in ("!", "^")
                content = content[1:] if negate else content
                content = content.replace("\\", "\\\\")
                out.append(f"[^/{content}]" if negate else f"[{content}]")
                i = end
        elif c == "\\" and i + 1 < n:
            i += 1
            out.append(re.escape(glob[i]))
        else:
            out.append(re.escape(c))
        i += 1
    return "".join(out)


def _class_end(glob: str, start: int) -> int:
    """The index of the `]` closing the bracket expression at `start`, or -1 when it is not closed."""
    j = start + 1
    if j < len(glob) and glob[j] in "!^":
        j += 1
    if j < len(glob) and glob[j] == "]":
        j += 1
    return glob.find("]", j)
