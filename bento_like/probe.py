"""``python -m bento_like probe [URL]``: an exec probe for images that have no curl, using the standard library only.

Kubernetes runs an exec probe as a new process every period, so it must start fast: this module imports nothing
outside the standard library (not the CLI, not httpx), and ``python -m bento_like probe`` reaches it before the
CLI is imported. Exit 0 when the URL answers 2xx within the timeout, 1 otherwise (with one line saying why), 2 for
a usage error.
"""

from __future__ import annotations

import http.client
import json
import os
import sys
import urllib.error
import urllib.request

USAGE = "usage: python -m bento_like probe [URL or /path, default /readyz] [--timeout SECONDS, default 2]"


def target(url: str | None) -> str:
    """The URL to probe: a path (``/livez``) means this machine's server, on ``$BENTO_LIKE_PORT`` (or 3000)."""
    url = url or "/readyz"
    if url.startswith("/"):
        return f"http://127.0.0.1:{os.environ.get('BENTO_LIKE_PORT') or 3000}{url}"
    return url


def probe(url: str, timeout: float) -> tuple[bool, str]:
    """Whether ``url`` answers 2xx within ``timeout`` seconds, and a line that says what it answered."""
    if not url.startswith(("http://", "https://")):
        raise ValueError(f"probe takes an http(s) URL or a path, got {url!r}")
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:  # noqa: S310 - http(s) checked above
            return True, f"{url}: {response.status}"
    except urllib.error.HTTPError as exc:
        return False, f"{url}: {exc.code} {_reason(exc)}"
    except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:
        reason = getattr(exc, "reason", exc)
        return False, f"{url}: unreachable ({reason})"


def _reason(exc: urllib.error.HTTPError) -> str:
    """The server's own reason (the ``error`` of its JSON body), else the HTTP reason phrase."""
    try:
        body = json.loads(exc.read(4096) or b"null")
    except (ValueError, OSError):
        body = None
    return str(body["error"]) if isinstance(body, dict) and "error" in body else str(exc.reason)


def main(argv: list[str]) -> int:
    url: str | None = None
    timeout = 2.0
    args = list(argv)
    while args:
        arg = args.pop(0)
        if arg in ("-h", "--help"):
            print(USAGE)
            return 0
        if arg == "--timeout" and args:
            try:
                timeout = float(args.pop(0))
            except ValueError:
                timeout = -1.0
            if not timeout > 0:
                print(f"--timeout must be seconds > 0\n{USAGE}", file=sys.stderr)
                return 2
        elif url is None and not arg.startswith("-"):
            url = arg
        else:
            print(f"unexpected argument {arg!r}\n{USAGE}", file=sys.stderr)
            return 2
    try:
        ok, line = probe(target(url), timeout)
    except ValueError as exc:
        print(f"{exc}\n{USAGE}", file=sys.stderr)
        return 2
    print(line, file=sys.stdout if ok else sys.stderr)
    return 0 if ok else 1
