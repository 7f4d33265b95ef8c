"""containerize's progress as a person sees it: on a terminal the layers' lines are one block rewritten in place
(the screen is rebuilt from the escape codes written), elsewhere one line per step."""

from __future__ import annotations

import io
import re
import threading

from bento_like.cli.images import _Steps

STEPS = [
    "base: oci:/bases/python:3.11",
    "dependencies: cached",
    "image: 3 layers on oci:/bases/python:3.11",
    "layer 1/3 python dependencies: compressing 120.4 MB",
    "layer 3/3 code + manifest: compressing 0.0 MB",
    "layer 2/3 bento_like runtime: cached (0.1 MB)",
    "layer 3/3 code + manifest: 0.0 MB in 0.1 s",
    "layer 1/3 python dependencies: 34.1 MB in 12.3 s",
    "oci:/out:v1  sha256:abc  (12.5 s)",
]


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def screen(written: str) -> list[str]:
    """The lines a terminal shows after `written`: cursor up (ESC[nA), carriage return, erase line (ESC[2K)."""
    rows: list[str] = [""]
    row = col = 0
    for token in re.findall(r"\x1b\[\d*[A-Za-z]|\r|\n|[^\x1b\r\n]+", written):
        if token == "\n":
            row += 1
            col = 0
            if row == len(rows):
                rows.append("")
        elif token == "\r":
            col = 0
        elif token.startswith("\x1b["):
            number, code = token[2:-1], token[-1]
            if code == "A":
                row = max(0, row - int(number or 1))
            elif code == "K":
                rows[row] = ""
        else:
            rows[row] = rows[row][:col] + token + rows[row][col + len(token):]
            col += len(token)
    return [r for r in rows if r] if rows[-1] == "" else rows


def test_on_a_terminal_each_layer_keeps_one_line_with_its_latest_state() -> None:
    out = Terminal()
    steps = _Steps(out)
    for line in STEPS:
        steps(line)
    assert "\x1b[" in out.getvalue()
    assert screen(out.getvalue()) == [
        "base: oci:/bases/python:3.11",
        "dependencies: cached",
        "image: 3 layers on oci:/bases/python:3.11",
        "layer 1/3 python dependencies: 34.1 MB in 12.3 s",
        "layer 3/3 code + manifest: 0.0 MB in 0.1 s",
        "layer 2/3 bento_like runtime: cached (0.1 MB)",
        "oci:/out:v1  sha256:abc  (12.5 s)",
    ]


def test_elsewhere_every_step_is_a_line_of_its_own() -> None:
    out = io.StringIO()
    steps = _Steps(out)
    for line in STEPS:
        steps(line)
    assert out.getvalue() == "".join(f"{line}\n" for line in STEPS)


def test_layers_reporting_from_threads_at_once_leave_a_whole_block() -> None:
    out = Terminal()
    steps = _Steps(out)
    steps("image: 8 layers")
    threads = [threading.Thread(target=lambda i=i: [steps(f"layer {i}/8 l{i}: compressing 1.0 MB"),
                                                     steps(f"layer {i}/8 l{i}: 1.0 MB in 0.1 s")])
               for i in range(1, 9)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    shown = screen(out.getvalue())
    assert shown[0] == "image: 8 layers" and sorted(shown[1:]) == [f"layer {i}/8 l{i}: 1.0 MB in 0.1 s" for i in range(1, 9)]
