"""The chapter-4 experiment script (Tables 4.1/4.2) runs end to end at the smoke scale through the one training
engine and writes results.json, results.md and a PNG."""
import json
import os

import pytest

from experiments import distill_fullgrad

pytestmark = pytest.mark.usefixtures("fast_compilation")


def test_distill_fullgrad_smoke(tmp_path):
    out = str(tmp_path / "t41")
    res = distill_fullgrad.main(["--scale", "smoke", "--methods", "CE,FG+Att", "--out", out])
    for f in ("results.json", "results.md", "table4_1.png"):
        assert os.path.exists(os.path.join(out, f)), f
    with open(os.path.join(out, "results.json")) as f:
        saved = json.load(f)
    assert set(saved["results"]) == {"CE", "FG+Att"}
    assert [tuple(p) for p in saved["pairs"]] == [("block0", "block0"), ("block1", "block1"), ("block2", "block2")]
    for per_n in res["results"].values():
        for v in per_n.values():
            assert all(0.0 <= a <= 1.0 for a in v["runs"])
    with pytest.raises(ValueError, match="unknown methods"):
        distill_fullgrad.main(["--scale", "smoke", "--methods", "XX", "--out", out])
