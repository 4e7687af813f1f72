"""Properties of the loss combinator and of EVERY term factory of :mod:`gradjax.losses.terms` (enumerated from the
module: every public ``*_term`` function; a new factory without an entry in ``FACTORIES`` fails
:func:`test_every_factory_is_covered`):

* term weights: with every factory in one :func:`~gradjax.losses.terms.make_loss_fn` at a weight ``w_t ≠ 1``
  (all different), the loss equals ``Σ_t w_t · term_t`` with ``term_t`` the unweighted batch means reported as
  ``term/<name>`` — and those equal the term values of the same list at weight 1 (a weight must neither be dropped
  nor leak into the term), and ``Term.weight == w_t``;
* frozen teachers stay frozen: the gradient of a random positive combination of all terms w.r.t. the teacher's
  variables passed as ``ctx.frozen["teacher"]`` is exactly zero (one term's non-zero gradient cannot cancel
  exactly against the others), while the student's is not;
* options honoured: chosen options at a non-default value change the term (e.g. the anti-score-matching σ, whose
  documented default 1e-3 is checked explicitly) — each variant sits at the same list index as its reference, so it
  gets the same key (``fold_in(ctx.rng, index + 1)``) and any difference is the option's.

Everything is computed by one compiled function on a two-block VGG (student and teacher differ).
"""
import inspect

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gradjax import train
from gradjax.losses import fooling as FO
from gradjax.losses import terms as LT
from gradjax.models import VGG

pytestmark = pytest.mark.usefixtures("fast_compilation")

B, HW, C, K = 4, 8, 3, 5
TEACHER = "teacher"
CUSTOM = "custom_teacher_term"

# name -> (kwargs besides weight, uses the teacher)
FACTORIES = {
    "cross_entropy_term": ({}, False),
    "activation_matching_term": ({}, True),
    "jacobian_matching_term": ({}, True),
    "stochastic_jacobian_matching_term": ({"num_probes": 2}, True),
    "noisy_activation_matching_term": ({"sigma": 0.3}, True),
    "attention_matching_term": ({"pairs": [("block0", "block0")]}, True),
    "attention_jacobian_matching_term": ({"student_layer": "block1", "teacher_layer": "block1", "divisor": 2}, True),
    "gradient_norm_term": ({}, False),
    "l2_term": ({}, False),
    "full_gradient_matching_term": ({"num_resolutions": 2}, True),
    "bias_gradient_penalty_term": ({}, False),
    "bias_l2_term": ({"layers": ["block0"]}, False),
    "score_matching_term": ({"mu": 0.1, "sigma": 0.1}, False),
    "anti_score_matching_term": ({"sigma": 0.05}, False),
    "fooling_loss_term": ({"mask": FO.corner_mask(HW, side=3)}, False),
}

# option variants: (factory, kwargs of the reference or None = its FACTORIES entry, kwargs of the variant, relation)
HEAD = (K, 2 * K)  # a head variant runs on a two-head student (2K logits): head (K, 2K) against its reference (0, K)
FG_PAIR = {"pairs": [("block0", "block1")]}  # an 8x8 student map against a 4x4 teacher map: resized
VARIANTS = [
    ("activation_matching_term", None, {"head": HEAD}, "differs"),
    ("anti_score_matching_term", {}, {"sigma": 1e-3}, "same"),  # the documented default sigma is 1e-3
    ("anti_score_matching_term", {}, {"sigma": 1e-2}, "differs"),
    ("anti_score_matching_term", None, {"sigma": 0.05, "tau": 1.0}, "differs"),
    ("anti_score_matching_term", None, {"sigma": 0.05, "form": "antithetic"}, "differs"),  # **trace_options
    ("attention_jacobian_matching_term", None, {"student_layer": "block1", "teacher_layer": "block1", "divisor": 1},
     "differs"),
    ("attention_jacobian_matching_term", None, {"student_layer": "block1", "teacher_layer": "block1", "window": 1},
     "differs"),
    ("attention_jacobian_matching_term", None, {"student_layer": "block1", "teacher_layer": "block1", "divisor": 2,
                                                "p": 1.0}, "differs"),
    ("attention_matching_term", None, {"pairs": [("block0", "block0")], "p": 1.0}, "differs"),
    ("attention_matching_term", None, {"pairs": [("block0", "block0")], "squared": True}, "differs"),
    ("attention_matching_term", None, {"pairs": [("block1", "block1")]}, "differs"),
    ("bias_gradient_penalty_term", None, {"noise": "unit"}, "differs"),
    ("bias_gradient_penalty_term", None, {"layers": ["block0"]}, "differs"),
    ("bias_gradient_penalty_term", None, {"output": "top"}, "differs"),
    ("bias_gradient_penalty_term", None, {"merge": "none", "layers": ["block1/conv"]}, "differs"),
    ("bias_l2_term", None, {"layers": ["block1"]}, "differs"),
    ("cross_entropy_term", None, {"label_smoothing": 0.2}, "differs"),
    ("cross_entropy_term", None, {"head": HEAD}, "differs"),
    ("fooling_loss_term", None, {"mask": FO.corner_mask(HW, side=5)}, "differs"),
    ("full_gradient_matching_term", None, {"num_resolutions": 2, "channel_reduce": "abs"}, "differs"),
    ("full_gradient_matching_term", None, {"num_resolutions": 2, "output": "top"}, "differs"),
    ("full_gradient_matching_term", None, {"num_resolutions": 1}, "differs"),
    ("full_gradient_matching_term", None, {"num_resolutions": 2, "merge": "none"}, "differs"),
    ("full_gradient_matching_term", FG_PAIR, {**FG_PAIR, "align_corners": True}, "differs"),
    ("full_gradient_matching_term", None, FG_PAIR, "differs"),
    ("gradient_norm_term", None, {"form": "logit"}, "differs"),
    ("gradient_norm_term", None, {"output": "full", "form": "logit"}, "differs"),
    ("gradient_norm_term", None, {"head": HEAD}, "differs"),
    ("jacobian_matching_term", None, {"output": "full"}, "differs"),
    ("jacobian_matching_term", None, {"form": "normalized"}, "differs"),
    ("jacobian_matching_term", None, {"head": HEAD, "output": "top"}, "differs"),
    ("jacobian_matching_term", {"form": "cross_entropy"}, {"form": "cross_entropy", "sigma": 2.0}, "differs"),
    ("jacobian_matching_term", {"form": "cross_entropy"}, {"form": "cross_entropy", "temperature": 3.0}, "differs"),
    ("l2_term", None, {"include_bias": False}, "differs"),
    ("noisy_activation_matching_term", None, {"sigma": 0.6}, "differs"),
    ("noisy_activation_matching_term", None, {"sigma": 0.3, "num_samples": 2}, "differs"),
    ("noisy_activation_matching_term", None, {"sigma": 0.3, "antithetic": False}, "differs"),
    ("noisy_activation_matching_term", None, {"sigma": 0.3, "head": HEAD}, "differs"),
    ("score_matching_term", None, {"mu": 0.5, "sigma": 0.1}, "differs"),
    ("score_matching_term", None, {"mu": 0.1, "sigma": 0.3}, "differs"),
    ("score_matching_term", None, {"mu": 0.1, "sigma": 0.1, "form": "antithetic"}, "differs"),
    ("stochastic_jacobian_matching_term", None, {"num_probes": 2, "probe_space": "output"}, "differs"),
    ("stochastic_jacobian_matching_term", None, {"num_probes": 3}, "differs"),
    ("stochastic_jacobian_matching_term", None, {"num_probes": 2, "distribution": "gaussian"}, "differs"),
    ("stochastic_jacobian_matching_term", None, {"num_probes": 2, "head": HEAD}, "differs"),
]
TRACE_OPTIONS = "trace_options"  # **kwargs: covered by any variant passing a keyword the factory does not name


def test_every_term_option_is_varied():
    """Every option of every factory (besides weight and name) has a variant above."""
    varied = {}
    for fac, _, var_kw, _ in VARIANTS:
        varied.setdefault(fac, set()).update(var_kw)
    for n, f in _factories().items():
        params = {p.name: p for p in inspect.signature(f).parameters.values() if p.name not in ("weight", "name")}
        named = {k for k, p in params.items() if p.kind != p.VAR_KEYWORD}
        want = set(named) | ({TRACE_OPTIONS} if len(named) < len(params) else set())
        got = (varied.get(n, set()) & named) | ({TRACE_OPTIONS} if varied.get(n, set()) - named else set())
        assert want <= got, f"{n}: options never varied: {sorted(want - got)} (add a variant to VARIANTS)"


def _factories():
    return {n: f for n, f in inspect.getmembers(LT, inspect.isfunction)
            if n.endswith("_term") and not n.startswith("_") and f.__module__ == LT.__name__}


def test_every_factory_is_covered():
    found = set(_factories())
    assert {"cross_entropy_term", "jacobian_matching_term"} <= found  # the enumeration works
    assert found == set(FACTORIES), (f"factories without a property check: {sorted(found - set(FACTORIES))}; "
                                     f"checked but gone: {sorted(set(FACTORIES) - found)}")


def _pad(i):
    return LT.term(f"pad{i}", lambda inp: jnp.zeros((inp.x.shape[0],), inp.x.dtype), 1.0)


@pytest.fixture(scope="module")
def computed():
    names = sorted(FACTORIES)
    weights = {n: 0.25 + 0.5 * i for i, n in enumerate(names)}  # all different, none equal to 1
    facs = _factories()
    student, teacher = VGG(layers=(4, "M", 4), num_classes=K), VGG(layers=(6, "M", 4), num_classes=K)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.uniform(size=(B, HW, HW, C)), jnp.float32)
    y = jnp.asarray(rng.integers(0, K, size=(B,)), jnp.int32)
    sv = student.init(jax.random.PRNGKey(1), x, train=False)
    tv = teacher.init(jax.random.PRNGKey(2), x, train=False)
    sv = {k: v for k, v in sv.items() if k in ("params", "batch_stats")}
    tv = {k: v for k, v in tv.items() if k in ("params", "batch_stats")}
    tv["params"] = jax.tree.map(lambda p: p + 0.1 * jnp.sign(p + 1e-3), tv["params"])  # non-zero teacher biases
    leaves, tdef = jax.tree.flatten(sv["params"])  # non-zero student conv biases, different in every layer
    sv["params"] = jax.tree.unflatten(tdef, [p + 0.05 * (1 + 0.3 * i) for i, p in enumerate(leaves)])

    def make(terms):
        return LT.make_loss_fn(student.apply, terms, teacher_apply_fn=teacher.apply)

    weighted = [facs[n](weights[n], **FACTORIES[n][0]) for n in names]
    unit = [facs[n](1.0, **FACTORIES[n][0]) for n in names]
    # a user-written term that reads the teacher without stop_gradient: the variables in ctx.frozen must still be
    # constants (every built-in factory also stops the teacher's outputs, which would hide a leak at the source)
    raw_teacher = lambda inp: jnp.sum(jnp.square(inp.teacher(inp.x) - inp.logits), -1)  # noqa: E731
    weights[CUSTOM] = 0.6
    weighted.append(LT.term(CUSTOM, raw_teacher, weights[CUSTOM]))
    unit.append(LT.term(CUSTOM, raw_teacher, 1.0))
    names = names + [CUSTOM]
    wide = VGG(layers=(4, "M", 4), num_classes=2 * K)  # a two-head student (LwF) for the head variants
    wv = wide.init(jax.random.PRNGKey(3), x, train=False)
    wv = {"params": jax.tree.map(lambda p: p + 0.05, wv["params"]), "batch_stats": wv["batch_stats"]}

    def make_wide(terms):
        return LT.make_loss_fn(wide.apply, terms, teacher_apply_fn=teacher.apply)

    # every variant (and explicit reference) at its factory's index in `unit`, so that it gets the same term key;
    # variants of different factories share a loss_fn ("round"), the other indices padded with zero terms
    items = []  # (key, index, term, on the two-head student)
    for v, (fac, ref_kw, var_kw, _) in enumerate(VARIANTS):
        i = names.index(fac)
        if "head" in var_kw:
            ref_kw = {**(FACTORIES[fac][0] if ref_kw is None else ref_kw), **var_kw, "head": (0, K)}
        if ref_kw is not None:
            items.append((("ref", v), i, facs[fac](1.0, **ref_kw), "head" in var_kw))
        items.append((("var", v), i, facs[fac](1.0, **var_kw), "head" in var_kw))
    rounds = []  # (loss_fn, {key: term name}, on_wide)
    for on_wide in (False, True):
        slots = []
        for key, i, t, w in items:
            if w != on_wide:
                continue
            for r in slots:
                if i not in r:
                    r[i] = (key, t)
                    break
            else:
                slots.append({i: (key, t)})
        for r in slots:
            terms = [r[j][1] if j in r else _pad(j) for j in range(max(r) + 1)]
            rounds.append(((make_wide if on_wide else make)(terms), {k: t.name for k, t in r.values()}, on_wide))
    loss_w, loss_1 = make(weighted), make(unit)
    batch = {"image": x, "label": y}
    state = {"batch_stats": sv["batch_stats"]}
    probe = jnp.asarray(np.random.default_rng(1).uniform(0.5, 1.5, size=len(unit)), jnp.float32)

    @jax.jit
    def run(params, tv, key):
        ctx = train.StepContext(rng=key, step=jnp.zeros((), jnp.int32), frozen={TEACHER: tv})
        Lw, aux_w = loss_w(params, state, batch, ctx)

        def unit_loss(params, tv):
            L1, aux = loss_1(params, state, batch, ctx._replace(frozen={TEACHER: tv}))
            vals = jnp.stack([aux["metrics"][f"term/{t.name}"] for t in unit])
            return jnp.sum(probe * vals), (L1, vals)

        # one backward pass of a random positive combination of the terms: a term's non-zero gradient w.r.t. the
        # frozen teacher cannot cancel exactly against the others
        (_, (L1, vals_1)), (grad_s, grad_t) = jax.value_and_grad(unit_loss, argnums=(0, 1), has_aux=True)(params, tv)
        found = {}
        for fn, keys, on_wide in rounds:
            p, st = (wv["params"], {"batch_stats": wv["batch_stats"]}) if on_wide else (params, state)
            m = fn(p, st, batch, ctx)[1]["metrics"]
            found.update({k: m[f"term/{name}"] for k, name in keys.items()})
        variants = [(found.get(("ref", v), vals_1[names.index(VARIANTS[v][0])]), found[("var", v)])
                    for v in range(len(VARIANTS))]
        return Lw, aux_w["metrics"], L1, vals_1, grad_s, grad_t, variants

    out = jax.device_get(run(sv["params"], tv, jax.random.PRNGKey(7)))
    return dict(names=names, weights=weights, weighted=weighted, unit=unit, out=out)


def test_loss_is_the_weighted_sum_of_the_terms(computed):
    names, weights, weighted = computed["names"], computed["weights"], computed["weighted"]
    Lw, mw, L1, vals_1, *_ = computed["out"]
    for n, t in zip(names, weighted):
        assert t.weight == pytest.approx(weights[n]), f"{n}: Term.weight {t.weight} != the weight given {weights[n]}"
    vals_w = np.array([float(mw[f"term/{t.name}"]) for t in weighted])
    vals_1 = np.asarray(vals_1, np.float64)
    assert np.all(np.isfinite(vals_w)) and np.all(vals_1 != 0), dict(zip(names, vals_1))
    np.testing.assert_allclose(vals_w, vals_1, rtol=2e-4, atol=1e-7,
                               err_msg=f"a term's value depends on its weight ({names})")
    w = np.array([weights[n] for n in names])
    np.testing.assert_allclose(float(Lw), float(np.sum(w * vals_1)), rtol=2e-4)
    np.testing.assert_allclose(float(L1), float(np.sum(vals_1)), rtol=2e-4)


def test_frozen_teacher_gets_exactly_zero_gradient(computed):
    _, _, _, _, grad_s, grad_t, _ = computed["out"]
    for path, leaf in jax.tree_util.tree_leaves_with_path(grad_t):
        assert np.all(np.asarray(leaf) == 0.0), f"the teacher's variables in ctx.frozen get a gradient at {path}"
    assert max(float(np.max(np.abs(np.asarray(leaf)))) for leaf in jax.tree.leaves(grad_s)) > 0


@pytest.mark.parametrize("i", range(len(VARIANTS)),
                         ids=[f"{f}-{'-'.join(f'{k}={v}' for k, v in var.items())}" for f, _, var, _ in VARIANTS])
def test_term_option_is_honoured(computed, i):
    fac, ref_kw, var_kw, relation = VARIANTS[i]
    ref, var = (float(v) for v in computed["out"][6][i])
    assert np.isfinite(ref) and np.isfinite(var)
    if relation == "same":
        assert var == pytest.approx(ref, rel=1e-5), f"{fac}: {var_kw} should equal the default"
    else:
        assert var != pytest.approx(ref, rel=1e-4, abs=1e-8), f"{fac}({var_kw}) did not change the term"


def test_density_regularizers_defaults_and_values():
    """The documented defaults of the ch. 5 regularizers (anti-score-matching: one-sided Taylor, σ = 1e-3, τ = 1000;
    score-matching: σ = 0.01, μ = 1e-4) and their values from the returned terms: ``h + ½‖g‖² + μh²`` and
    ``-min(h, τ)``. On ``f(x) = ½ xᵀAx`` the one-sided estimate depends on σ (through ``2gᵀε/σ``), so an ignored
    or changed σ shows."""
    from gradjax.losses import score_matching as SM

    rng = np.random.default_rng(0)
    A = jnp.asarray(np.diag(rng.uniform(0.5, 2.0, 6)), jnp.float32)
    x = jnp.asarray(rng.normal(size=(3, 6)), jnp.float32)
    f = lambda z: 0.5 * jnp.einsum("bi,ij,bj->b", z, A, z)  # noqa: E731
    key = jax.random.PRNGKey(0)
    anti = lambda **kw: np.asarray(SM.anti_score_matching(f, x, key, **kw)[0])  # noqa: E731
    np.testing.assert_allclose(anti(), anti(sigma=1e-3, tau=1000.0), rtol=1e-6)
    assert not np.allclose(anti(), anti(sigma=1e-2), rtol=1e-3)
    reg, terms = SM.anti_score_matching(f, x, key, sigma=0.05, tau=1.0)
    np.testing.assert_allclose(np.asarray(reg), -np.minimum(np.asarray(terms.trace), 1.0), rtol=1e-6)
    score = lambda **kw: SM.score_matching(f, x, key, **kw)  # noqa: E731
    np.testing.assert_allclose(np.asarray(score()[0]), np.asarray(score(sigma=0.01, mu=1e-4)[0]), rtol=1e-6)
    reg, terms = score(mu=0.3, sigma=0.1)
    h, g2 = np.asarray(terms.trace), np.asarray(terms.grad_sq_norm)
    np.testing.assert_allclose(np.asarray(reg), h + 0.5 * g2 + 0.3 * h * h, rtol=1e-5)
    np.testing.assert_allclose(g2, np.sum((np.asarray(x) @ np.asarray(A)) ** 2, axis=1), rtol=1e-5)
