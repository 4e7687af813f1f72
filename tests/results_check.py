"""Shared helpers for the tests that check docs/RESULTS.md against the raw results committed under docs/results/.

Convention: each reproduced table's raw numbers live in ``docs/results/<name>.json`` (small, numbers only, written by
the experiment's ``results.json`` or a summary of several runs), and each RESULTS table cell that reports such a
number is checked against that file by a test. Use :func:`results_json` to load a file, :func:`section` to cut the
text of one RESULTS section (by its heading, up to the next heading of the same or a higher level), and
:func:`assert_reported` to assert a number appears in that text with the precision the table prints.
"""
from __future__ import annotations

import json
import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS_MD = os.path.join(ROOT, "docs", "RESULTS.md")
RESULTS_DIR = os.path.join(ROOT, "docs", "results")


def results_json(name: str) -> dict:
    """``docs/results/<name>.json`` parsed."""
    with open(os.path.join(RESULTS_DIR, name if name.endswith(".json") else name + ".json")) as f:
        return json.load(f)


def section(heading: str) -> str:
    """Text of the RESULTS.md section whose heading line contains ``heading``, up to the next heading of the same
    or a higher level. Raises ``AssertionError`` when no heading matches."""
    lines = open(RESULTS_MD).read().splitlines()
    for i, line in enumerate(lines):
        m = re.match(r"^(#+)\s", line)
        if m and heading in line:
            level = len(m.group(1))
            out = []
            for nxt in lines[i + 1:]:
                m2 = re.match(r"^(#+)\s", nxt)
                if m2 and len(m2.group(1)) <= level:
                    break
                out.append(nxt)
            return "\n".join(out)
    raise AssertionError(f"no RESULTS.md heading contains {heading!r}")


def numbers_in(text: str) -> list[float]:
    """Every decimal number printed in ``text`` (signs and thousands kept as printed)."""
    return [float(x) for x in re.findall(r"(?<![\w.])[-−]?\d+(?:\.\d+)?", text.replace("−", "-"))]


def assert_reported(text: str, value: float, decimals: int, *, what: str = "") -> None:
    """Assert ``value`` rounded to ``decimals`` is printed in ``text`` (as ``f"{value:.{decimals}f}"``)."""
    s = f"{value:.{decimals}f}"
    if s.startswith("-0.") and float(s) == 0.0:
        s = s[1:]
    assert re.search(r"(?<![\d.])" + re.escape(s) + r"(?![\d])", text), (
        f"RESULTS does not report {what or 'a value'} = {s} (from docs/results); update the table or the file.")
