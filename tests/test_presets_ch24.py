"""The ch. 2 / ch. 4 paper presets encode the thesis protocols (issue 24, item 3): each value below is the thesis's
(seed 004 line numbers; the same values are listed in ../shared/PROTOCOLS.md, which is compared with the scripts'
reference tables when that file is present). No training: seconds."""
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import (
    bias_regularization,
    distill_fewshot,
    distill_fullgrad,
    gradient_angle,
    lwf_transfer,
    noise_robustness,
    scale_sweep,
)

PROTOCOLS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "..", "shared", "PROTOCOLS.md")


def test_table2_1_paper_preset():
    """VGG-9 -> VGG-4 on CIFAR-100, Adam 1e-3 -> 1e-4 at epoch 400 of 500, batch 128, weights 1, one run (L982,
    L707-721)."""
    pre = distill_fewshot.PRESETS["paper"]
    assert (pre.model, pre.teacher, pre.dataset) == ("vgg4", "vgg9", "cifar100")
    assert (pre.epochs, pre.batch_size, pre.lr, pre.width, pre.seeds) == (500, 128, 1e-3, 1.0, 1)
    assert tuple(pre.n_per_class) == (1, 5, 10, 50, 100, 500) == tuple(distill_fewshot.THESIS_N)
    for term in distill_fewshot._terms(("ce", "act", "jac")):
        assert term.weight == 1.0
    # Adam 1e-3 -> 1e-4 at 80 % of the steps (epoch 400 of 500): the learning rate the schedule applies
    import optax
    tx = distill_fewshot.common.adam_step_decay(pre.lr, 500)
    params = {"w": jnp.ones(())}

    def body(state, _):
        upd, state = tx.update({"w": jnp.ones(())}, state, params)
        return state, -upd["w"]  # Adam's step for a constant gradient = the learning rate

    _, lrs = jax.lax.scan(body, tx.init(params), None, length=500)
    assert float(lrs[398]) == pytest.approx(1e-3, rel=1e-3) and float(lrs[401]) == pytest.approx(1e-4, rel=1e-3)
    del optax


def test_table2_2_paper_preset():
    """VGG-9 on CIFAR-100, lambda in {0, .01, .1, 1, 10}, sigma 0..0.4, l2 1e-3, dropout 0.25 (L725-736)."""
    pre = noise_robustness.PRESETS["paper"]
    assert (pre.model, pre.dataset, pre.width, pre.batch_size, pre.lr, pre.epochs) == ("vgg9", "cifar100", 1.0, 128,
                                                                                       1e-3, 500)
    assert noise_robustness.LAMBDAS == (0.0, 0.01, 0.1, 1.0, 10.0)
    assert noise_robustness.SIGMAS == (0.0, 0.1, 0.2, 0.3, 0.4)
    cfgs = noise_robustness.configs()
    assert set(cfgs) >= {"lambda=0", "lambda=0.01", "lambda=0.1", "lambda=1", "lambda=10", "l2", "dropout"}
    assert cfgs["dropout"][2] == 0.25
    assert [t.weight for t in cfgs["l2"][0]][1] == pytest.approx(1e-3)
    assert [t.weight for t in cfgs["lambda=10"][0]][1] == 10.0


def test_table2_3_paper_preset():
    """ResNet-34 teacher -> two-head VGG-9, SGD m 0.9, lr 1e-3 / 10 after epochs 40 and 60 of 75, batch 8, weights
    10/0, Jacobian after ResNet stage 1 / VGG's second max-pool, window s/5 stride 1, two runs, 5/10/25/50/Full
    (L740-760, L978-984); MIT-67 and the ImageNet-pretrained teacher are declared unavailable."""
    pre = lwf_transfer.PRESETS["paper"]
    assert pre.teacher == "resnet34-imagenet" and pre.model == "vgg9"
    assert (pre.optimizer, pre.momentum, pre.lr, pre.epochs, tuple(pre.lr_drop_epochs), pre.batch_size) == (
        "sgd", 0.9, 1e-3, 75, (40, 60), 8)
    assert pre.weight == 10.0 and pre.seeds == 2 and pre.ablation_n == 10
    assert tuple(pre.n_per_class) == (5, 10, 25, 50, 0)  # 0 = Full
    assert pre.divisor == 5 and pre.window is None  # average pool window s/5, stride 1
    assert "not available" in pre.thesis_target and pre.thesis_source == "imagenet2012"
    pairs = lwf_transfer.layer_pairs(pre)
    assert list(pairs) == ["(7, 2)", "(15, 4)", "(27, 6)", "(33, 8)"]  # Table 2.4 (L764)
    assert pairs[pre.jacobian_pair] == ("block1:pool", "stage0_block2")  # VGG after its SECOND max-pool (L978)
    # the small preset's default Jacobian pair is also the VGG's second max-pool
    small = lwf_transfer.PRESETS["small"]
    assert lwf_transfer.layer_pairs(small)[small.jacobian_pair][0] == "block1:pool"


@pytest.fixture(scope="module")
def thesis_pair_shapes():
    """Spatial sizes of the four Table 2.4 layers in the ImageNet-stem ResNet-34 and the two-head VGG-9."""
    from gradjax.losses.attention import capture_features
    from gradjax.models.two_head import TwoHeadVGG
    from gradjax.models.vgg import VGG_CONFIGS

    x = jnp.zeros((1, 32, 32, 3))
    teacher = lwf_transfer.build_teacher("resnet34-imagenet", 5, width=1 / 16)
    student = TwoHeadVGG(VGG_CONFIGS["vgg9"], 5, 5, width=1 / 16)
    pairs = lwf_transfer.THESIS_PAIRS

    def trace():  # shapes only (jax.eval_shape: traced, never compiled or run)
        tv, sv = teacher.init(jax.random.PRNGKey(0), x), student.init(jax.random.PRNGKey(1), x)
        _, tf = capture_features(teacher.apply, tv, x, [t for _, t in pairs.values()])
        _, sf = capture_features(student.apply, sv, x, [s for s, _ in pairs.values()])
        return tv["params"], sf, tf

    tparams, sf, tf = jax.eval_shape(trace)
    return {k: (sf[s].shape[1:3], tf[t].shape[1:3]) for k, (s, t) in pairs.items()}, {"params": tparams}


def test_table2_4_pairs_have_equal_spatial_size(thesis_pair_shapes):
    shapes, tv = thesis_pair_shapes
    assert [s for s, _ in shapes.values()] == [(8, 8), (4, 4), (2, 2), (1, 1)]  # 32 / 4, 8, 16, 32
    for label, (s, t) in shapes.items():
        assert s == t, f"pair {label}: student {s} vs teacher {t}"
    # ResNet-34: stages of 3, 4, 6, 3 basic blocks -> depths 7, 15, 27, 33 (stem conv + 2 convs per block)
    blocks = [k for k in tv["params"] if k.startswith("stage")]
    per_stage = [sum(1 for k in blocks if k.startswith(f"stage{i}_")) for i in range(4)]
    assert per_stage == [3, 4, 6, 3]
    assert list(np.cumsum([1 + 2 * per_stage[0]] + [2 * b for b in per_stage[1:]])) == [7, 15, 27, 33]


def test_table4_1_4_2_paper_preset():
    """VGG-9 -> VGG-11, Adam 1e-3 -> 1e-4 at epoch 250 of 300, batch 128, weights 10, two runs; CIFAR-100 grid
    5..500 (L1380) and CIFAR-10 grid 50..5000 (L1415)."""
    pre = distill_fullgrad.PRESETS["paper"]
    assert (pre.model, pre.teacher, pre.dataset, pre.epochs, pre.batch_size, pre.lr, pre.seeds) == (
        "vgg11", "vgg9", "cifar100", 300, 128, 1e-3, 2)
    assert pre.drop_at == pytest.approx(250 / 300)
    assert distill_fullgrad.WEIGHT == 10.0
    assert distill_fullgrad.n_per_class_grid("paper", "cifar100") == (5, 10, 50, 100, 500)
    assert distill_fullgrad.n_per_class_grid("paper", "cifar10") == (50, 100, 500, 1000, 5000)
    assert distill_fullgrad.n_per_class_grid("small", "cifar10") == tuple(distill_fullgrad.PRESETS["small"].n_per_class)
    for ds in ("cifar100", "cifar10"):
        assert list(distill_fullgrad.n_per_class_grid("paper", ds)) == distill_fullgrad.THESIS[ds]["n"]


def test_table4_3_and_fig4_1_paper_presets():
    """Table 4.3: VGG-11, dropout 0.5, bias wd 1e-1, bias-grad 1e2, 100 epochs annealed at 80, two runs, 50/100/500
    (L1426-1438); Fig. 4.1b: VGG-11 / VGG-6 / VGG-4 students at 50 per class (L1401)."""
    pre = bias_regularization.PRESETS["paper"]
    assert (pre.model, pre.dataset, pre.epochs, pre.drop_at, pre.seeds) == ("vgg11", "cifar100", 100, 0.8, 2)
    assert tuple(pre.n_per_class) == (50, 100, 500)
    assert (bias_regularization.DROPOUT_P, bias_regularization.BIAS_WD, bias_regularization.BIAS_GRAD) == (0.5, 0.1,
                                                                                                            100.0)
    assert set(gradient_angle.FIG_B_STUDENTS) == {"vgg4", "vgg6", "vgg11"} and gradient_angle.FIG_N["paper"][1] == 50


def _protocol_rows(text: str, header_marker: str) -> dict:
    block = text[text.index(header_marker):]
    rows = {}
    started = False
    for line in block.splitlines()[1:]:
        if line.startswith("## ") or (started and not line.startswith("|")):
            break
        started = started or line.startswith("|")
        m = re.match(r"^\| ([^|]+?) \| ([\d.| ]+)\|$", line.strip())
        if m and m.group(1) != "per class" and not m.group(1).startswith("σ"):
            rows[m.group(1)] = [float(v) for v in m.group(2).split("|") if v.strip()]
    return rows


@pytest.mark.skipif(not os.path.exists(PROTOCOLS), reason="../shared/PROTOCOLS.md not in this checkout")
def test_reference_tables_match_protocols():
    """The scripts' THESIS reference rows equal the tables of PROTOCOLS.md (Tables 2.1, 2.3, 4.1)."""
    with open(PROTOCOLS) as f:
        text = f.read()
    t21 = _protocol_rows(text, "## Table 2.1")
    assert t21 and all(distill_fewshot.THESIS[k] == v for k, v in t21.items() if k in distill_fewshot.THESIS)
    assert {"CE", "CE + A", "CE + J", "CE + {A+J}"} <= set(t21)
    t23 = _protocol_rows(text, "## Table 2.3")
    assert lwf_transfer.THESIS_23["CE + {A+att+J}"] == t23["CE + {A+att+J}"]
    t41 = _protocol_rows(text, "Table 4.1 CIFAR-100")
    assert t41 and all(distill_fullgrad.THESIS["cifar100"]["rows"][k] == v for k, v in t41.items())


def test_scale_sweep_parsing_and_trend():
    """The sweep runner's pieces: budgets/claims parsed, paired verdicts per column, trend over budgets."""
    assert scale_sweep.parse_budget("x4=--student-steps 600") == ("x4", ["--student-steps", "600"])
    assert scale_sweep.parse_claim("CE + {A+J}>CE + A") == ("CE + {A+J}", "CE + A")
    with pytest.raises(ValueError):
        scale_sweep.parse_claim("CE")
    with pytest.raises(ValueError):
        scale_sweep.parse_budget("--steps 3")
    res = {"A": {5: {"runs": [0.50, 0.60, 0.70]}}, "B": {5: {"runs": [0.40, 0.52, 0.61]}}}
    cmp = scale_sweep.compare_budget(res, [("A", "B")])["A>B"]["5"]
    assert cmp["verdict"] == "a>b" and cmp["mean"] == pytest.approx(9.0) and cmp["wins"] == 3
    res2 = {"A": {5: {"runs": [0.50, 0.60, 0.70]}}, "B": {5: {"runs": [0.55, 0.66, 0.74]}}}
    cmp2 = scale_sweep.compare_budget(res2, [("A", "B")])["A>B"]["5"]
    assert cmp2["verdict"] == "a<b"
    assert scale_sweep.trend(cmp2, cmp)["direction"] == "toward thesis"
    assert scale_sweep.trend(cmp, cmp2)["direction"] == "away from thesis"


def test_scale_sweep_runs_resumes_and_writes(tmp_path, monkeypatch):
    """run_sweep end to end on a stand-in script (no training): one main() per budget with the budget's arguments,
    per-budget paired verdicts, the trend first -> last budget, and --resume keeping finished budgets."""
    import json
    import types

    calls = []

    def fake_main(argv):
        steps = int(argv[argv.index("--student-steps") + 1])
        calls.append(steps)
        gap = {1: -0.10, 2: -0.05, 4: 0.02}[steps]  # A - B per seed grows with the budget
        base = np.array([0.50, 0.60, 0.70])
        jitter = np.array([0.0, 0.01, -0.01])
        return {"teacher_accuracy": 0.9, "student_steps": [steps],
                "results": {"A": {5: {"mean": 0, "std": 0, "runs": list(base + gap + jitter)}},
                            "B": {5: {"mean": 0, "std": 0, "runs": list(base)}}}}

    monkeypatch.setitem(__import__("sys").modules, "experiments._fake_sweep_target",
                        types.SimpleNamespace(main=fake_main))
    out = str(tmp_path / "sweep.json")
    budgets = [("x1", ["--student-steps", "1"]), ("x2", ["--student-steps", "2"]), ("x4", ["--student-steps", "4"])]
    summ = scale_sweep.run_sweep("_fake_sweep_target", budgets, [("A", "B")], ["--scale", "smoke"], out=out,
                                 workdir=str(tmp_path))
    assert calls == [1, 2, 4]
    paired = {b: summ["budgets"][b]["paired"]["A>B"]["5"] for b in ("x1", "x2", "x4")}
    assert paired["x1"]["verdict"] == "a<b" and paired["x4"]["verdict"] == "a>b"
    assert paired["x1"]["mean"] == pytest.approx(-10.0) and paired["x4"]["mean"] == pytest.approx(2.0)
    assert summ["trend"]["claims"]["A>B"]["5"]["direction"] == "toward thesis"
    assert summ["gap_by_budget"]["A>B"]["5"] == {"x1": -10.0, "x2": -5.0, "x4": 2.0}
    with open(out) as f:
        assert json.load(f)["budgets"].keys() == {"x1", "x2", "x4"}
    md = scale_sweep.markdown(summ)
    assert "| A > B | 5 | -10.0 ± 1.0 (t -17.32, a<b) | -5.0 ± 1.0 (t -8.66, a<b) | +2.0 ± 1.0 (t 3.46, a>b) |" in md
    calls.clear()
    scale_sweep.run_sweep("_fake_sweep_target", budgets, [("A", "B")], ["--scale", "smoke"], out=out,
                          workdir=str(tmp_path), resume=True)
    assert calls == []  # every budget kept
    with pytest.raises(ValueError, match="other shared arguments"):
        scale_sweep.run_sweep("_fake_sweep_target", budgets, [("A", "B")], ["--scale", "small"], out=out,
                              resume=True)


def test_paper_lwf_objective_traces_with_the_thesis_pairs():
    """The paper preset's CE + {A+att+J} (attention at Table 2.4's four pairs, attention-Jacobian at (7, 2), window
    s/5) with the ImageNet-stem ResNet-34 teacher and the two-head VGG-9 student: traced (jax.eval_shape, nothing
    compiled) to a finite scalar loss — every pair exists and has matching spatial sizes."""
    from gradjax.losses import terms as LT
    from gradjax.models.two_head import TwoHeadVGG, target_slice
    from gradjax.models.vgg import VGG_CONFIGS
    from gradjax.train import StepContext

    pre = lwf_transfer.PRESETS["paper"]
    nt, ns = 3, 4
    teacher = lwf_transfer.build_teacher(pre.teacher, ns, width=1 / 16)
    student = TwoHeadVGG(VGG_CONFIGS[pre.model], nt, ns, width=1 / 16)
    terms = lwf_transfer.method_terms("CE + {A+att+J}", nt, ns, pairs=lwf_transfer.layer_pairs(pre),
                                      jacobian_pair=pre.jacobian_pair, window=pre.window, divisor=pre.divisor,
                                      w=pre.weight)
    assert [t.weight for t in terms] == [10.0] * 4
    loss_fn = LT.make_loss_fn(student.apply, terms, teacher_apply_fn=teacher.apply, metrics_head=target_slice(nt))
    x = jnp.zeros((2, 32, 32, 3))

    def run():
        sv = student.init(jax.random.PRNGKey(0), x)
        tv = teacher.init(jax.random.PRNGKey(1), x)
        params, state = sv["params"], {k: v for k, v in sv.items() if k != "params"}
        ctx = StepContext(jax.random.PRNGKey(2), jnp.int32(0), {"teacher": tv})
        loss, _ = loss_fn(params, state, {"image": x, "label": jnp.array([0, 1])}, ctx)
        return loss

    out = jax.eval_shape(run)
    assert out.shape == () and out.dtype == jnp.float32
    with pytest.raises(ValueError, match="jacobian_pair"):
        lwf_transfer.method_terms("CE + {A+J}", nt, ns, pairs=lwf_transfer.layer_pairs(pre), jacobian_pair="level 1")
