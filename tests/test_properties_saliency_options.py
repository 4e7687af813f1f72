"""Property: every option of every saliency method in :data:`gradjax.saliency.SALIENCY_METHODS`, at a value other
than the one it is compared with, changes the output as documented — or, where the docstring says it must not
(``chunk``, ``memory_budget``, ``loop``; ``merge`` of the linear ``fullgrad_noabs``), leaves it unchanged.

Options are enumerated from the signatures, so a new option without an entry in ``CHECKS`` fails
:func:`test_every_option_is_checked`. The model is a two-block VGG with BatchNorm on 3-channel 8x8 inputs, its
biases, BatchNorm parameters and statistics randomized (so that e.g. FullGrad's ``merge="none"`` and
``"conv_bn"`` differ: conv biases are not zero) — both ``merge`` values are checked explicitly, whatever the default.
Where cheap, the changed output is checked against its documented value (channel reductions against numpy on an
independent ``jax.grad``, zero noise = plain gradient, ``relu``/``upsample`` of Grad-CAM, ...).
"""
import inspect

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gradjax import saliency as S
from gradjax.model import ModelHandle
from gradjax.models import VGG

pytestmark = pytest.mark.usefixtures("fast_compilation")

B, HW, C, K = 3, 8, 3, 4
SMALL = dict(samples=4, chunk=2)  # base of the noise methods: cheap, and samples=2 keeps the chunk shape


def _randomize(variables, key):
    leaves, tree = jax.tree.flatten(variables)
    keys = jax.random.split(key, len(leaves))
    out = []
    for k, v in zip(keys, leaves):
        noise = 0.3 * jax.random.normal(k, v.shape, v.dtype)
        is_scale = v.ndim == 1 and float(jnp.min(v)) >= 0.99  # BatchNorm scales (initialized at 1): keep them > 0
        out.append(jnp.abs(v) + 0.5 + noise * 0.1 if is_scale else v + noise)
    return jax.tree.unflatten(tree, out)


@pytest.fixture(scope="module")
def setup():
    model = VGG(layers=(4, "M", 4), num_classes=K)  # two conv+BN+ReLU blocks: a small program to compile
    x = jax.random.uniform(jax.random.PRNGKey(0), (B, HW, HW, C))
    x = x * jnp.asarray([1.0, 0.5, 2.0])[:, None, None, None]  # different ranges per example (noise_range)
    variables = model.init(jax.random.PRNGKey(1), x, train=False)
    variables = {k: v for k, v in variables.items() if k in ("params", "batch_stats")}
    params = _randomize(variables["params"], jax.random.PRNGKey(2))
    stats = jax.tree.map(lambda v: jnp.abs(v) + 0.5, variables["batch_stats"])  # positive variances, means 0.5
    handle = ModelHandle(model.apply, {"params": params, "batch_stats": stats})
    target = jnp.asarray([0, 1, 3], jnp.int32)
    return handle, x, target, jax.random.PRNGKey(4), _raw_gradient(handle, x, target)


def _raw_gradient(handle, x, target):
    """grad_x f_t(x) per example: jax.grad of sum_b f_{t_b}(x)_b (eval mode: examples independent), independent of
    gradjax's gradient code."""
    n = x.shape[0]
    pad = -n % 24  # one batch shape (a multiple of 24) for every call: eager operations are compiled once per shape
    xp = jnp.concatenate([x, jnp.zeros((pad,) + x.shape[1:], x.dtype)])
    tp = jnp.concatenate([target, jnp.zeros((pad,), target.dtype)])
    return np.asarray(jax.grad(lambda z: jnp.sum(jnp.take_along_axis(handle(z), tp[:, None], 1)))(xp))[:n]


NP_REDUCE = {"abs_sum": lambda a: np.abs(a).sum(-1), "sum": lambda a: a.sum(-1),
             "abs_max": lambda a: np.abs(a).max(-1), "sq_sum": lambda a: (a * a).sum(-1)}


def _differs(a, b):
    a, b = np.asarray(a), np.asarray(b)
    return a.shape != b.shape or not np.allclose(a, b, rtol=1e-3, atol=1e-6 * max(1.0, np.abs(a).max()))


def _same(a, b):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-4, atol=1e-6 * max(1.0, np.abs(b).max()))
    return True


# ------------------------------------------------------------------------------ documented relations
# A check is check(base, new, get, ctx) -> bool, where get(method=None, **overrides) returns the output (of this
# method, or another) for the base options plus ``overrides``, computed once per module; ``check.needs`` lists the
# (method or None, overrides) it asks for.
def _check(needs=()):
    def wrap(fn):
        fn.needs = tuple(needs)
        return fn
    return wrap


def _reduce_matches_raw(value):
    @_check(needs=[(None, {"reduce": None})])
    def check(base, new, get, ctx):
        raw = get(reduce=None)
        if value is None:
            return new.shape == ctx["x"].shape
        return _same(new, NP_REDUCE[value](raw))
    return check


def _equals(expected):
    @_check()
    def check(base, new, get, ctx):
        return _same(new, expected(ctx))
    return check


@_check()
def differs(base, new, get, ctx):
    return _differs(base, new)


@_check()
def same(base, new, get, ctx):
    return _same(base, new)


@_check(needs=[(None, {"relu": False, "upsample": False}), (None, {"upsample": False})])
def _gradcam_relu(base, new, get, ctx):
    low_signed, low = get(relu=False, upsample=False), get(upsample=False)
    return _same(np.maximum(low_signed, 0), low) and low_signed.min() < 0 and _differs(base, new)


@_check()
def _gradcam_upsample(base, new, get, ctx):
    return new.shape[1:] != base.shape[1:] and _same(S.bilinear_upsample(jnp.asarray(new), (HW, HW)), base)


@_check(needs=[("fullgrad", {"input_sum": "before"})])
def _smooth_fullgrad_without_noise(base, new, get, ctx):
    return _same(new, get("fullgrad", input_sum="before"))


def _grad(ctx):
    return ctx["grad"]


NOISE_CHECKS = {
    "samples": [(2, differs)],
    "chunk": [(1, same)],  # (chunk 1: batches of B, a shape the plain gradient calls have compiled already)
    "memory_budget": [(1, same)],  # with chunk=None (see _case_requests): one sample per chunk
    "loop": [("unroll", same)],
}
# every reduction against numpy on one method; on the others: raw (None) and one value other than the default
REDUCE_ALL = {"reduce": [(r, _reduce_matches_raw(r)) for r in ("abs_sum", "sum", "abs_max", "sq_sum", None)]}
REDUCE_CHECKS = {"reduce": [(r, _reduce_matches_raw(r)) for r in ("abs_max", None)]}
# (value, check) compares with the base call; (value, check, other) compares two explicit values, neither assumed
# to be the default (e.g. FullGrad's merge, whose default is being changed)
FULLGRAD_COMMON = {
    "postprocess": [(v, differs) for v in ("abs", "rescale", "none")],
    "rescale": [("channel", differs)],
    "align_corners": [(False, differs)],
    "eps": [(1.0, differs, 0.0)],
    "input_sum": [("before", differs, "after")],
}

CHECKS = {
    "random": {},
    "gradient": REDUCE_ALL,
    "grad_x_input": REDUCE_CHECKS,
    "guided_backprop": REDUCE_CHECKS,
    "integrated_gradients": {
        **REDUCE_CHECKS,
        "baseline": [(0.5, differs)],
        "steps": [(4, differs)],
        # (each fixed rule is also checked against its quadrature below; "adaptive", whose eager run costs more than
        # the rest of this method's checks, is tested in test_ig_rules.py)
        "rule": [(r, differs) for r in ("trapezoid", "left", "right", "gauss_legendre")],
        "chunk": [(1, same)], "memory_budget": [(1, same)], "loop": [("unroll", same)],
    },
    "smoothgrad": {**NOISE_CHECKS, **REDUCE_CHECKS,
                   "noise_level": [(0.0, _equals(lambda c: np.abs(_grad(c)).sum(-1))), (0.5, differs)]},
    "smoothgrad_sq": {**NOISE_CHECKS, **REDUCE_CHECKS,  # chunk, memory_budget, loop: shared with smoothgrad
                      "noise_level": [(0.0, _equals(lambda c: (_grad(c) ** 2).sum(-1))), (0.5, differs)]},
    "vargrad": {**NOISE_CHECKS, **REDUCE_CHECKS,
                "noise_level": [(0.0, _equals(lambda c: np.zeros((B, HW, HW)))), (0.5, differs)]},
    "gradcam": {"layer": [("block0", differs)], "relu": [(False, _gradcam_relu)],
                "upsample": [(False, _gradcam_upsample)], "align_corners": [(False, differs)]},
    "fullgrad": {**FULLGRAD_COMMON, "merge": [("none", differs, "conv_bn"), ("block", differs, "none")]},
    "fullgrad_noabs": {"merge": [("none", same, "conv_bn"), ("block", same, "conv_bn")],
                       "align_corners": [(False, differs)]},
    "fullgrad_simple": dict(FULLGRAD_COMMON),
    "smooth_fullgrad": {
        **FULLGRAD_COMMON, "merge": [("none", differs, "conv_bn")],
        "samples": [(2, differs)], "chunk": [(1, same)], "memory_budget": [(1, same)],
        "average": [("saliency", differs)],
        "noise_level": [(0.0, _smooth_fullgrad_without_noise)],
        "noise_range": [("example", differs, "batch")],
    },
}
BASE_OPTIONS = {"integrated_gradients": dict(steps=6, chunk=2), "smoothgrad": SMALL, "smoothgrad_sq": SMALL,
                "vargrad": SMALL, "smooth_fullgrad": SMALL}


def _options(fn):
    return {p.name: p.default for p in inspect.signature(fn).parameters.values()
            if p.kind == p.KEYWORD_ONLY and p.name != "key"}


def test_every_option_is_checked():
    assert set(S.SALIENCY_METHODS) == set(CHECKS), "a saliency method without option checks (add it to CHECKS)"
    for name, fn in S.SALIENCY_METHODS.items():
        opts = set(_options(fn))
        checked = {o for o, vals in CHECKS[name].items() if vals}
        assert opts == checked, (f"{name}: options without a check {sorted(opts - checked)}, checks of options "
                                 f"that do not exist {sorted(checked - opts)}")


CASES = [(m, o, i) for m, opts in CHECKS.items() for o, vals in opts.items() for i in range(len(vals))]


def _request(method, overrides):
    opts = {**BASE_OPTIONS.get(method, {}), **overrides}
    return method, tuple(sorted(opts.items(), key=lambda kv: kv[0]))


def _case_requests(method, option, i):
    entry = CHECKS[method][option][i]
    value, check = entry[:2]
    base = _request(method, {option: entry[2]} if len(entry) == 3 else {})
    # memory_budget sizes the chunk only when chunk=None
    new = _request(method, {option: value, **({"chunk": None} if option == "memory_budget" else {})})
    extra = [_request(m or method, over) for m, over in check.needs]
    return base, new, extra


class _Outputs(dict):
    """Outputs computed on first use and kept for the module (so ``-k`` runs only what it selects). Eager: each
    operation is compiled once per shape and re-used by every call with the same shapes (the base options keep
    the chunk shapes equal) — far cheaper here than compiling ~100 programs."""

    def __init__(self, setup):
        super().__init__()
        self.handle, self.x, self.target, self.key, _ = setup

    def __missing__(self, request):
        method, opts = request
        out = np.asarray(S.SALIENCY_METHODS[method](self.handle, self.x, self.target, key=self.key, **dict(opts)))
        self[request] = out
        return out


@pytest.fixture(scope="module")
def outputs(setup):
    return _Outputs(setup)


@pytest.mark.parametrize("method,option,i", CASES, ids=[f"{m}-{o}-{CHECKS[m][o][i][0]}" for m, o, i in CASES])
def test_option_is_honoured(setup, outputs, method, option, i):
    handle, x, target, _, grad = setup
    base_r, new_r, _ = _case_requests(method, option, i)
    value, check = CHECKS[method][option][i][:2]
    get = lambda m=None, **over: outputs[_request(m or method, over)]  # noqa: E731
    ctx = {"handle": handle, "x": x, "target": target, "grad": grad}
    new = outputs[new_r]
    assert np.all(np.isfinite(new))
    assert check(outputs[base_r], new, get, ctx), f"{method}({option}={value!r}) did not change the output as documented"


def test_raw_gradient_is_the_input_gradient(setup, outputs):
    """The anchor of the reduce checks: gradient(reduce=None) is grad_x f_t (and grad_x_input's is that times x)."""
    _, x, _, _, grad = setup
    _same(outputs[_request("gradient", {"reduce": None})], grad)
    _same(outputs[_request("grad_x_input", {"reduce": None})], grad * np.asarray(x))


def test_noise_methods_equal_their_definition(setup, outputs):
    """SmoothGrad / SmoothGrad² / VarGrad (reduce=None) are the mean, the mean square and the variance of the
    input-gradient at ``x + sigma_b n_i``, ``sigma_b = 0.15 (max x_b - min x_b)``, ``n_i`` from
    ``split(key, samples)[i]`` (as documented), recomputed here with an independent gradient."""
    handle, x, target, key, _ = setup
    samples = SMALL["samples"]
    xs = np.asarray(x)
    sigma = 0.15 * (xs.reshape(B, -1).max(1) - xs.reshape(B, -1).min(1))
    keys = jax.random.split(key, samples)
    noisy = jnp.concatenate([x + jnp.asarray(sigma)[:, None, None, None] * jax.random.normal(k, x.shape, x.dtype)
                             for k in keys])
    g = _raw_gradient(handle, noisy, jnp.tile(target, samples)).reshape((samples,) + x.shape)
    m1, m2 = g.mean(0), (g * g).mean(0)
    get = lambda m: outputs[_request(m, {"reduce": None})]  # noqa: E731
    _same(get("smoothgrad"), m1)
    _same(get("smoothgrad_sq"), m2)
    _same(get("vargrad"), np.maximum(m2 - m1 * m1, 0))


def test_integrated_gradients_rules_equal_their_quadrature(setup, outputs):
    """IG with ``rule`` on ``steps = 6`` intervals is ``x ⊙ Σ_k w_k ∇f(α_k x)`` (baseline 0) with the rule's nodes and
    weights, written out here (the left and right Riemann sums, midpoint, trapezoid, Gauss–Legendre)."""
    handle, x, target, _, _ = setup
    m = BASE_OPTIONS["integrated_gradients"]["steps"]
    k = np.arange(m)
    gl_t, gl_w = np.polynomial.legendre.leggauss(m)
    rules = {"midpoint": ((k + 0.5) / m, np.full(m, 1 / m)), "left": (k / m, np.full(m, 1 / m)),
             "right": ((k + 1) / m, np.full(m, 1 / m)),
             "trapezoid": (np.arange(m + 1) / m, np.r_[0.5, np.ones(m - 1), 0.5] / m),
             "gauss_legendre": ((gl_t + 1) / 2, gl_w / 2)}
    for rule, (alpha, w) in rules.items():
        pts = jnp.concatenate([a * x for a in alpha.astype(np.float32)])
        g = _raw_gradient(handle, pts, jnp.tile(target, len(alpha))).reshape((len(alpha),) + x.shape)
        attr = np.asarray(x) * np.einsum("n,n...->...", w, g)
        got = outputs[_request("integrated_gradients", {} if rule == "midpoint" else {"rule": rule})]
        _same(got, np.abs(attr).sum(-1))
