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

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS_MD = os.path.join(ROOT, "docs", "RESULTS.md")
RESULTS_DIR = os.path.join(ROOT, "docs", "results")


def results_json(name: str) -> dict:
    """``docs/results/<name>.json`` parsed."""
    with open(os.path.join(RESULTS_DIR, name if name.endswith(".json") else name + ".json")) as f:
        return json.load(f)


def section(heading: str) -> str:
    """Text of the RESULTS.md section whose heading line contains ``heading``, up to the next heading of the same
    or a higher level (lines inside fenced code blocks are never headings). Raises ``AssertionError`` when no
    heading matches."""
    lines = open(RESULTS_MD).read().splitlines()
    for i, line in enumerate(lines):
        m = re.match(r"^(#+)\s", line)
        if m and heading in line:
            level = len(m.group(1))
            out, fenced = [], False
            for nxt in lines[i + 1:]:
                if nxt.lstrip().startswith("```"):
                    fenced = not fenced  # a "# comment" inside a fenced code block is not a heading
                m2 = None if fenced else re.match(r"^(#+)\s", nxt)
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


def assert_sweep_self_consistent(sweep: dict, script: str) -> None:
    """An ``experiments.scale_sweep`` summary checks out against its own per-seed numbers: it is ``script``'s, has
    >= 3 budgets, every claim at every budget has a column per row column and >= 3 paired seeds (the same count at
    every budget), every stored paired comparison (verdict, n, wins, mean, std, t, differences) is
    :func:`gradjax.statistics.paired_comparison` of the per-seed accuracies in points, every cell's mean and sample
    std come from its runs, and the trend and ``gap_by_budget`` are recomputed from the first and last budgets.
    (The budget axis itself — steps, widths — is each caller's to check.)"""
    from experiments import scale_sweep
    from gradjax.statistics import paired_comparison

    assert sweep["script"] == script
    assert len(sweep["budgets"]) >= 3, "a scale axis needs >= 3 budgets"
    n_seeds = set()
    for name, b in sweep["budgets"].items():
        assert set(b["paired"]) == set(sweep["claims"])
        for claim in sweep["claims"]:
            a_row, b_row = claim.split(">")
            assert set(b["paired"][claim]) == set(b["accuracy"][a_row])
            for col, stored in b["paired"][claim].items():
                a = np.asarray(b["accuracy"][a_row][col]["runs"]) * 100
                c = np.asarray(b["accuracy"][b_row][col]["runs"]) * 100
                assert len(a) == len(c) >= 3, f"{name} {claim} n={col}: needs >= 3 paired seeds"
                n_seeds.add(len(a))
                pc = paired_comparison(a, c)
                assert pc.verdict == stored["verdict"] and pc.n == stored["n"] and pc.wins == stored["wins"], \
                    f"{name} {claim} {col}"
                assert pc.mean == pytest.approx(stored["mean"], abs=1e-9)
                assert pc.std == pytest.approx(stored["std"], abs=1e-9)
                assert pc.t == pytest.approx(stored["t"], rel=1e-9) or (np.isinf(pc.t) and np.isinf(stored["t"]))
                assert list(pc.differences) == pytest.approx(stored["differences"], abs=1e-9)
        for row in b["accuracy"].values():
            for cell in row.values():
                assert cell["mean"] == pytest.approx(np.mean(cell["runs"]), abs=1e-12)
                assert cell["std"] == pytest.approx(np.std(cell["runs"], ddof=1), abs=1e-12)  # sample std
    assert len(n_seeds) == 1, f"the same seeds at every budget; got seed counts {n_seeds}"
    names = list(sweep["budgets"])
    assert (sweep["trend"]["from"], sweep["trend"]["to"]) == (names[0], names[-1])
    for claim, cols in sweep["trend"]["claims"].items():
        for col, t in cols.items():
            again = scale_sweep.trend(sweep["budgets"][names[0]]["paired"][claim][col],
                                      sweep["budgets"][names[-1]]["paired"][claim][col])
            assert again["direction"] == t["direction"] and again["verdict"] == t["verdict"]
            assert again["mean"] == pytest.approx(t["mean"])
    for claim, cols in sweep["gap_by_budget"].items():
        for col, by_budget in cols.items():
            for name, gap in by_budget.items():
                assert gap == pytest.approx(round(sweep["budgets"][name]["paired"][claim][col]["mean"], 2))


def assert_sweep_tables_in(text: str, sweep: dict) -> None:
    """Every line of ``scale_sweep.markdown(sweep)`` (RESULTS' two generated tables) is in ``text``."""
    from experiments import scale_sweep

    for line in scale_sweep.markdown(sweep).splitlines():
        assert line in text, f"RESULTS lacks the generated line: {line}"
