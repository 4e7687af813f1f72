"""Tests for gradjax.trace: HVPs, exact trace, Hutchinson, the Taylor trace estimator (thesis §5.3.2, eq. 5.9,
§5.8 Observation) with its variance-reduced forms, and Hutch++."""
from __future__ import annotations

import warnings

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gradjax import trace as T


def softplus_net(dtype=jnp.float32, shape=(3, 2, 2, 2), width=16, K=3, seed=0, scale=1.0):
    """f(x) = logsumexp(logits(x)) of a tiny softplus MLP (the implicit log-density of thesis §5.3), x [B, ...]."""
    rng = np.random.default_rng(seed)
    D = int(np.prod(shape[1:]))
    W1 = jnp.asarray(scale * rng.normal(size=(D, width)) / np.sqrt(D), dtype)
    b1 = jnp.asarray(0.1 * rng.normal(size=width), dtype)
    W2 = jnp.asarray(2.0 * rng.normal(size=(width, K)) / np.sqrt(width), dtype)

    def f(x):
        h = jax.nn.softplus(x.reshape(x.shape[0], -1) @ W1 + b1)
        return jax.nn.logsumexp(h @ W2, axis=-1)

    x = jnp.asarray(rng.normal(size=shape), dtype)
    return f, x


def quadratic(dtype, A, b):
    """f(x) = ½ xᵀAx + bᵀx per example (x [B, D]); Hessian A, gradient Ax + b."""
    A = jnp.asarray(A, dtype)
    b = jnp.asarray(b, dtype)
    return lambda x: 0.5 * jnp.einsum("bi,ij,bj->b", x, A, x) + x @ b


def reference_trace(f, x):
    hess = jax.vmap(jax.hessian(lambda xi: f(xi[None])[0]))(x)  # [B, *s, *s]
    D = int(np.prod(x.shape[1:]))
    return jnp.trace(hess.reshape(x.shape[0], D, D), axis1=1, axis2=2), hess.reshape(x.shape[0], D, D)


def rbg_keys(seed, n=None):
    """Typed keys with the "rbg" implementation for the statistical tests: any key type works with gradjax, and
    XLA compiles RngBitGenerator ~3x faster than threefry on CPU. Tests that rely on the exact probe stream
    (probe n = fold_in(key, n), common random numbers) use threefry keys: rbg draws may change under vmap."""
    key = jax.random.key(seed, impl="rbg")
    return key if n is None else jax.random.split(key, n)


def se(samples):
    return np.std(np.asarray(samples), axis=0, ddof=1) / np.sqrt(samples.shape[0])


# ---------------------------------------------------------------------------------------------- exact
def test_exact_trace_and_hvp_match_jax_hessian(x64):
    f, x = softplus_net(jnp.float64)
    v = jnp.asarray(np.random.default_rng(1).normal(size=x.shape))

    @jax.jit
    def run(x, v):
        return dict(ref=reference_trace(f, x), default=T.exact_trace(f, x), c3=T.exact_trace(f, x, chunk=3),
                    vm=T.exact_trace(f, x, batch_mode="vmap"), hvp=T.hvp(f, x, v),
                    hvp_vm=T.hvp(f, x, v, batch_mode="vmap"))

    r = run(x, v)
    tr_ref, H = r["ref"]
    assert r["default"].shape == (3,)
    for k in ("default", "c3", "vm"):
        chex.assert_trees_all_close(r[k], tr_ref, rtol=1e-12, atol=1e-12)
    Hv = jnp.einsum("bij,bj->bi", H, v.reshape(3, -1)).reshape(x.shape)
    chex.assert_trees_all_close(r["hvp"], Hv, rtol=1e-12, atol=1e-12)
    chex.assert_trees_all_close(r["hvp_vm"], Hv, rtol=1e-12, atol=1e-12)
    assert float(jnp.min(jnp.abs(tr_ref))) > 1e-2  # a non-trivial Hessian


def test_exact_trace_refuses_large_inputs():
    f, x = softplus_net(shape=(2, 8, 8, 3))
    with pytest.raises(ValueError, match=r"D = prod\(x.shape\[1:\]\) = 192 .* max_dim=100"):
        T.exact_trace(f, x, max_dim=100)


# ------------------------------------------------------------------------------------------ Hutchinson
def test_hutchinson_is_unbiased(x64):
    f, x = softplus_net(jnp.float64, scale=2.0)
    keys = rbg_keys(0, 4000)
    exact, s_rad, s_gauss = jax.jit(lambda x, keys: (
        T.exact_trace(f, x),
        jax.vmap(lambda k: T.hutchinson_trace(f, x, k))(keys),
        jax.vmap(lambda k: T.hutchinson_trace(f, x, k, distribution="gaussian"))(keys)))(x, keys)
    for s in (s_rad, s_gauss):
        mean, err = np.mean(s, axis=0), se(s)
        assert np.all(err < 0.1 * np.abs(exact)), (err, exact)  # the test has power
        assert np.all(np.abs(mean - exact) < 4 * err), (mean, exact, err)


def test_hutchinson_probe_scheme_and_chunking(x64):
    """Probe n is fold_in(key, n) whatever the chunk size: a chunked run (with a smaller last chunk) equals the
    hand-written, unchunked average of εᵀHε over those probes."""
    f, x = softplus_net(jnp.float64)
    key = jax.random.PRNGKey(7)

    @jax.jit
    def run(x, key):
        def one(i):
            v = T.sample_probes(jax.random.fold_in(key, i), x.shape, x.dtype, "rademacher")
            return jnp.sum((v * T.hvp(f, x, v)).reshape(x.shape[0], -1), axis=1)
        manual = jnp.mean(jax.vmap(one)(jnp.arange(7)), axis=0)
        return manual, T.hutchinson_trace(f, x, key, num_probes=7, chunk=3)  # 2 chunks of 3, then one probe

    ref, out = run(x, key)
    chex.assert_trees_all_close(out, ref, rtol=1e-12, atol=1e-12)


@jax.jit
def _quadratic_hutchinson_samples(A, b, x, keys1):
    f = lambda z: 0.5 * jnp.einsum("bi,ij,bj->b", z, A, z) + z @ b
    return dict(
        rademacher=jax.vmap(lambda k: T.hutchinson_trace(f, x, k))(keys1),
        gaussian=jax.vmap(lambda k: T.hutchinson_trace(f, x, k, distribution="gaussian"))(keys1))


def test_hutchinson_variance_formulas_on_known_quadratic(x64):
    """Var of one probe: 2 Σ_{i≠j} H_ij² (Rademacher), 2 ‖H‖_F² (Gaussian, thesis §5.8). (The 1/N scaling
    with N probes is checked in test_taylor_observation_5_8_on_quadratic.)"""
    rng = np.random.default_rng(0)
    D = 6
    M = rng.normal(size=(D, D))
    A = (M + M.T) / 2
    x = jnp.asarray(rng.normal(size=(2, D)))
    keys1 = rbg_keys(1, 20000)
    s = _quadratic_hutchinson_samples(jnp.asarray(A), jnp.asarray(rng.normal(size=D)), x, keys1)
    want = dict(rademacher=2 * (np.sum(A**2) - np.sum(np.diag(A) ** 2)), gaussian=2 * np.sum(A**2))
    for dist in ("rademacher", "gaussian"):
        chex.assert_trees_all_close(np.var(s[dist], axis=0, ddof=1), want[dist], rtol=0.1)
        chex.assert_trees_all_close(np.mean(s[dist], axis=0), np.trace(A), atol=4 * np.sqrt(want[dist] / 20000))
    # a diagonal Hessian has zero Rademacher variance: every probe is exact
    Ad = np.diag(np.arange(1.0, D + 1))
    s = _quadratic_hutchinson_samples(jnp.asarray(Ad), jnp.zeros(D), x, keys1)
    chex.assert_trees_all_close(s["rademacher"], np.full((20000, 2), D * (D + 1) / 2), rtol=1e-13)


# ------------------------------------------------------------------------------------ Taylor estimator
def test_taylor_bias_is_order_sigma_squared(x64):
    """On a non-quadratic f (softplus net), E[TTE] = tr H + O(σ²) (thesis eq. 5.8/5.9). The one-sided estimate's
    zero-mean term 2∇f·ε/σ is cancelled exactly with antithetic probes: f̃(y) = f(2x - y) has f̃(x + σε) = f(x - σε),
    and the same key gives the same probes, so ½(TTE_f + TTE_f̃) = the antithetic form; its difference from
    Hutchinson on the same probes is the Taylor bias, which must shrink 4× when σ halves."""
    f, x = softplus_net(jnp.float64, scale=2.0)
    key = rbg_keys(3)
    N = 2000

    @jax.jit
    def run(x, key, sigma):
        kw = dict(sigma=sigma, num_probes=N, chunk=500)
        one = T.taylor_trace(f, x, key, **kw)
        one_r = T.taylor_trace(lambda y: f(2 * x - y), x, key, **kw)
        anti = T.taylor_trace(f, x, key, form="antithetic", **kw)
        hutch = T.hutchinson_trace(f, x, key, num_probes=N, distribution="gaussian", chunk=500)
        return one, one_r, anti, hutch

    bias = []
    for sigma in (0.2, 0.1, 0.05):
        one, one_r, anti, hutch = run(x, key, jnp.float64(sigma))
        chex.assert_trees_all_close(0.5 * (one + one_r), anti, rtol=1e-7)
        bias.append(np.asarray(anti - hutch))
    bias = np.array(bias)  # [3 sigmas, B]
    ratios = bias[:-1] / bias[1:]
    print("\nTaylor bias per example at sigma=0.2/0.1/0.05:\n", bias, "\nratios (expect ~4):\n", ratios)
    assert np.all(np.abs(bias[0]) > 1e-3)
    assert np.all((ratios > 3.4) & (ratios < 4.6)), ratios


def test_taylor_observation_5_8_on_quadratic(x64):
    """Thesis §5.8 Observation. For quadratic f every one-sided sample is exactly a Hutchinson sample on the same
    probe plus 2∇f(x)ᵀε/σ, so Var(TTE) exceeds Var(Hutchinson) by 4‖∇f‖²/(Nσ²) <= the stated bound 4σ⁻²‖∇f‖²."""
    rng = np.random.default_rng(4)
    D = 5
    M = rng.normal(size=(D, D))
    A = (M + M.T) / 2
    b = rng.normal(size=D)
    f = quadratic(jnp.float64, A, b)
    x = jnp.asarray(rng.normal(size=(2, D)))
    g = np.asarray(x) @ A + b
    gnorm2 = np.sum(g**2, axis=1)
    sigma = 0.5
    bound = 4 * gnorm2 / sigma**2

    @jax.jit
    def run(keys):  # threefry keys: the exact probe stream is needed for the per-sample identity
        tte = jax.vmap(lambda k: T.taylor_trace(f, x, k, sigma=sigma))(keys)
        hut = jax.vmap(lambda k: T.hutchinson_trace(f, x, k, distribution="gaussian"))(keys)
        eps = jax.vmap(lambda k: T.sample_probes(jax.random.fold_in(k, 0), x.shape, x.dtype, "gaussian"))(keys)
        return tte, hut, eps

    @jax.jit
    def run4(keys):
        return (jax.vmap(lambda k: T.taylor_trace(f, x, k, sigma=sigma, num_probes=4))(keys),
                jax.vmap(lambda k: T.hutchinson_trace(f, x, k, num_probes=4, distribution="gaussian"))(keys))

    tte, hut, eps = run(jax.random.split(jax.random.PRNGKey(0), 20000))
    tte4, hut4 = run4(rbg_keys(1, 8000))
    # per-sample identity with common random numbers
    chex.assert_trees_all_close(tte - hut, 2 * np.sum(eps * g, axis=-1) / sigma, rtol=1e-9, atol=1e-9)
    for N, t, h in ((1, tte, hut), (4, tte4, hut4)):
        extra = np.var(t, axis=0, ddof=1) - np.var(h, axis=0, ddof=1)
        print(f"\nN={N}: extra variance of one-sided TTE over Hutchinson {extra}; "
              f"thesis bound 4|g|^2/sigma^2 = {bound}")
        chex.assert_trees_all_close(extra, bound / N, rtol=0.1)
        assert np.all(extra <= 1.1 * bound)
        atol = 4 * np.sqrt((bound + 2 * np.sum(A**2)) / N / t.shape[0])
        np.testing.assert_array_less(np.abs(np.mean(t, axis=0) - np.trace(A)), atol)


def test_taylor_variance_reduced_forms_on_softplus_network():
    """Antithetic and control-variate forms remove the 2∇f·ε/σ term: far lower variance than the one-sided
    estimator of eq. 5.9 at the same σ (float32, the precision used in training)."""
    f, x = softplus_net(jnp.float32, scale=2.0)
    sigma, forms = 0.1, ("one_sided", "antithetic", "control_variate")
    keys = rbg_keys(11, 2000)
    exact, samples = jax.jit(lambda x, keys: (T.exact_trace(f, x), {
        form: jax.vmap(lambda k: T.taylor_trace(f, x, k, sigma=sigma, form=form))(keys) for form in forms}))(x, keys)
    var = {form: np.var(s, axis=0, ddof=1) for form, s in samples.items()}
    r_anti = var["one_sided"] / var["antithetic"]
    r_cv = var["one_sided"] / var["control_variate"]
    print(f"\nsigma={sigma}: per-sample variance one-sided {var['one_sided']}, antithetic {var['antithetic']}, "
          f"control variate {var['control_variate']}\nratio one-sided/antithetic = {r_anti}\n"
          f"ratio one-sided/control-variate = {r_cv}")
    assert np.all(r_anti > 10) and np.all(r_cv > 10)
    for form, s in samples.items():  # all three estimate the same trace
        m, e = np.mean(s, axis=0), se(s)
        assert np.all(np.abs(m - exact) < 4 * e + 0.03 * np.abs(exact)), (form, m, exact, e)


def test_taylor_roundoff_warning_and_noise_floor(x64):
    """In float32 a tiny σ drowns the estimate in round-off (~4·eps·|f|/σ²): an eager call warns, a sensible σ
    does not (nor does a traced call), and the float32 error at tiny σ really is large."""
    f32, x32 = softplus_net(jnp.float32)
    f64, x64_ = softplus_net(jnp.float64)
    key = jax.random.PRNGKey(0)  # threefry: the reference below re-draws the same probes

    with pytest.warns(RuntimeWarning, match="round-off"):
        bad = T.taylor_trace(f32, x32, key, sigma=1e-4, num_probes=8, form="antithetic")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        good = T.taylor_trace(f32, x32, key, sigma=0.1, num_probes=8, form="antithetic")
        jax.eval_shape(lambda x: T.taylor_trace(f32, x, key, sigma=1e-4, num_probes=8), x32)  # traced: no warning

    @jax.jit
    def reference(sigma):  # the same (float32) probes, evaluated in float64
        def one(i):
            eps = T.sample_probes(jax.random.fold_in(key, i), x32.shape, jnp.float32, "gaussian").astype(jnp.float64)
            return (f64(x64_ + sigma * eps) + f64(x64_ - sigma * eps) - 2 * f64(x64_)) / sigma**2
        return jnp.mean(jax.vmap(one)(jnp.arange(8)), axis=0), T.exact_trace(f64, x64_)

    ref_bad, exact = reference(1e-4)
    ref_good, _ = reference(0.1)
    err_bad = np.abs(np.asarray(bad, np.float64) - ref_bad)
    err_good = np.abs(np.asarray(good, np.float64) - ref_good)
    fx32, g32 = jax.jit(lambda x: (f32(x), jax.grad(lambda z: jnp.sum(f32(z)))(x)))(x32)
    floor = np.asarray(T.taylor_noise_floor(f32, x32, sigma=1e-4, form="antithetic", fx=fx32, grad_fx=g32).roundoff)
    print(f"\nfloat32 round-off error at sigma=1e-4: {err_bad} (estimated floor per sample {floor}), "
          f"at sigma=0.1: {err_good}; exact trace {np.asarray(exact)}")
    assert np.max(err_bad) > 0.1 * np.max(np.abs(exact))
    assert np.max(err_good) < 1e-2 * np.max(np.abs(exact))
    assert 1e-2 < np.max(err_bad) / np.max(floor) < 10  # the floor is the right order of magnitude

    # noise-floor helper: σ⁻² scaling of round-off, 2‖∇f‖/σ spread for the one-sided form only
    fx, g = jax.jit(lambda x: (f64(x), jax.grad(lambda z: jnp.sum(f64(z)))(x)))(x64_)
    n1 = T.taylor_noise_floor(f64, x64_, sigma=0.1)  # computes f(x) and ∇f(x) itself
    n2 = T.taylor_noise_floor(f64, x64_, sigma=0.01, fx=fx, grad_fx=g)
    chex.assert_trees_all_close(n2.roundoff / n1.roundoff, 100.0, rtol=1e-9)
    chex.assert_trees_all_close(n1.gradient_spread, 2 * np.sqrt(np.sum(np.asarray(g).reshape(3, -1) ** 2, 1)) / 0.1,
                               rtol=1e-9)
    assert np.all(T.taylor_noise_floor(f64, x64_, sigma=0.1, form="antithetic", fx=fx, grad_fx=g).gradient_spread == 0)
    # in float64 the same tiny sigma is harmless: the floor is 2^29 times lower than in float32
    n64 = T.taylor_noise_floor(f64, x64_, sigma=1e-4, form="antithetic", fx=fx, grad_fx=g).roundoff
    assert np.max(np.asarray(n64)) < 1e-3 * np.max(np.abs(np.asarray(exact)))


# ------------------------------------------------------------------------------------------------ Hutch++
def low_rank_plus_identity(D=40, rank=3, big=(100.0, 60.0, 30.0), small=0.5, seed=0):
    rng = np.random.default_rng(seed)
    U, _ = np.linalg.qr(rng.normal(size=(D, rank)))
    return U @ np.diag(big[:rank]) @ U.T + small * np.eye(D)


@jax.jit
def _quadratic_hutchpp_vs_hutchinson(A, x, keys):
    f = lambda z: 0.5 * jnp.einsum("bi,ij,bj->b", z, A, z) + jnp.sum(z, axis=1)
    return (jax.vmap(lambda k: T.hutchpp_trace(f, x, k, num_matvecs=12, chunk=2))(keys),
            jax.vmap(lambda k: T.hutchinson_trace(f, x, k, num_probes=12))(keys))


def test_hutchpp_beats_hutchinson_at_equal_matvecs(x64):
    x = jnp.asarray(np.random.default_rng(2).normal(size=(2, 40)))
    keys = rbg_keys(3, 400)
    # rank 3 <= k = 12 // 3: the sketch captures the whole Hessian, Hutch++ is exact
    A0 = low_rank_plus_identity(small=0.0)
    hpp, _ = _quadratic_hutchpp_vs_hutchinson(jnp.asarray(A0), x, keys)  # same shapes: no recompilation
    chex.assert_trees_all_close(hpp, np.trace(A0), rtol=1e-10)
    # dominant low-rank part + small identity: much lower variance than Hutchinson with the same 12 HVPs
    A = low_rank_plus_identity()
    hpp, hut = _quadratic_hutchpp_vs_hutchinson(jnp.asarray(A), x, keys)
    ratio = np.var(hut, 0, ddof=1) / np.var(hpp, 0, ddof=1)
    print(f"\nHutch++ vs Hutchinson, 12 matvecs: variance {np.var(hpp, 0)} vs {np.var(hut, 0)}; ratio {ratio}")
    assert np.all(ratio > 10)
    assert np.all(np.abs(np.mean(hpp, 0) - np.trace(A)) < 4 * se(hpp))  # unbiased (Hutch++ is, for any H)
    assert np.all(np.abs(np.mean(hut, 0) - np.trace(A)) < 4 * se(hut))


# ------------------------------------------------------------------------------------- jit / API / errors
class TestJitEqualsEager(chex.TestCase):
    """Each estimator called eagerly is the reference; value_grad_and_trace, with and without jit, returns the same
    trace, f(x) and ∇f(x). The Taylor case also covers a traced sigma (under jit) and the given-gradient path
    (value_grad_and_trace passes its own ∇f(x) as grad_fx to the control-variate form). rbg keys: cheaper to
    compile, and the same chunks on both sides."""

    @chex.variants(with_jit=True, without_jit=True)
    def test_value_grad_and_trace_equals_the_eager_estimators(self):
        f, x = softplus_net(jnp.float32)
        key = rbg_keys(9)
        eager = {"exact": T.exact_trace(f, x), "hutchinson": T.hutchinson_trace(f, x, key, chunk=5),
                 "hutchpp": T.hutchpp_trace(f, x, key, num_matvecs=3, chunk=5),
                 "taylor": T.taylor_trace(f, x, key, sigma=0.1, num_probes=5, form="control_variate", chunk=5)}
        fx, g = f(x), jax.grad(lambda z: jnp.sum(f(z)))(x)

        def run(x, key, sigma):
            opts = {"exact": {}, "hutchinson": dict(chunk=5), "hutchpp": dict(num_matvecs=3, chunk=5),
                    "taylor": dict(sigma=sigma, num_probes=5, form="control_variate", chunk=5)}
            return {m: T.value_grad_and_trace(f, x, key, method=m, **o) for m, o in opts.items()}

        out = self.variant(run)(x, key, jnp.float32(0.1))
        for method in eager:
            v, gr, tr = out[method]
            chex.assert_trees_all_close(tr, eager[method], rtol=1e-4, atol=1e-4)
            chex.assert_trees_all_close((v, gr), (fx, g), rtol=1e-5, atol=1e-6)


def test_estimators_are_differentiable_wrt_parameters(x64):
    """Score-matching (thesis eq. 5.4) trains through the trace: jax.grad w.r.t. closed-over parameters of the
    exact, Hutchinson (through jax.linearize) and Taylor traces matches central finite differences."""
    rng = np.random.default_rng(0)
    W, v = jnp.asarray(rng.normal(size=(4, 8))), jnp.asarray(rng.normal(size=8))
    x = jnp.asarray(rng.normal(size=(3, 4)))
    d = jnp.asarray(rng.normal(size=W.shape))
    key, h = rbg_keys(5), 1e-5

    def traces(W):
        f = lambda z: jax.nn.softplus(z @ W) @ v
        return jnp.stack([T.exact_trace(f, x).sum(), T.hutchinson_trace(f, x, key, num_probes=3).sum(),
                          T.taylor_trace(f, x, key, sigma=0.1, num_probes=3).sum()])

    jac, plus, minus = jax.jit(lambda W: (jax.jacrev(traces)(W), traces(W + h * d), traces(W - h * d)))(W)
    chex.assert_trees_all_close(jnp.tensordot(jac, d, axes=2), (plus - minus) / (2 * h), rtol=1e-7)


def test_bad_inputs_raise_clear_errors():
    f, x = softplus_net(jnp.float32)
    key = jax.random.PRNGKey(0)
    with pytest.raises(ValueError, match="num_probes must be >= 1"):
        T.hutchinson_trace(f, x, key, num_probes=0)
    with pytest.raises(ValueError, match="num_probes must be a Python int"):
        T.taylor_trace(f, x, key, sigma=0.1, num_probes=2.0)
    with pytest.raises(ValueError, match="sigma must be a finite number > 0"):
        T.taylor_trace(f, x, key, sigma=0.0)
    with pytest.raises(ValueError, match="sigma must be a finite number > 0"):
        T.taylor_trace(f, x, key, sigma=-0.1)
    with pytest.raises(ValueError, match="distribution must be one of"):
        T.hutchinson_trace(f, x, key, distribution="uniform")
    with pytest.raises(ValueError, match="form must be one of"):
        T.taylor_trace(f, x, key, sigma=0.1, form="central")
    with pytest.raises(ValueError, match="floating-point"):
        T.exact_trace(f, x.astype(jnp.int32))
    with pytest.raises(ValueError, match="non-finite"):
        T.hutchinson_trace(f, x.at[0, 0, 0, 0].set(jnp.nan), key)
    with pytest.raises(ValueError, match="one value per example"):
        T.hutchinson_trace(lambda z: z.reshape(z.shape[0], -1), x, key)
    with pytest.raises(ValueError, match="num_matvecs must be >= 3"):
        T.hutchpp_trace(f, x, key, num_matvecs=2)
    with pytest.raises(ValueError, match="chunk must be >= 1"):
        T.hutchinson_trace(f, x, key, num_probes=4, chunk=0)
    with pytest.raises(ValueError, match="v must have the shape of x"):
        T.hvp(f, x, x[:1])
    with pytest.raises(ValueError, match="grad_fx must have the shape of x"):
        T.taylor_trace(f, x, key, sigma=0.1, form="control_variate", grad_fx=x[:, 0])
    with pytest.raises(ValueError, match="needs a jax.random key"):
        T.value_grad_and_trace(f, x, method="hutchinson")
    with pytest.raises(ValueError, match="unknown option"):
        T.value_grad_and_trace(f, x, key, method="hutchinson", sigma=0.1)
    with pytest.raises(ValueError, match="batch_mode"):
        T.exact_trace(f, x, batch_mode="loop")
    probes = T.sample_probes(key, x.shape, x.dtype, "rademacher", num_probes=3)
    with pytest.raises(ValueError, match="either a key or explicit probes"):
        T.hutchinson_trace(f, x, key, probes=probes)
    with pytest.raises(ValueError, match="pass a jax.random key, or explicit probes"):
        T.taylor_trace(f, x, sigma=0.1)
    with pytest.raises(ValueError, match=r"probes must have shape \[num_probes, \*x.shape\]"):
        T.hutchinson_trace(f, x, probes=probes[:, :1])
    with pytest.raises(ValueError, match="num_probes=2 but 3 probes"):
        T.taylor_trace(f, x, sigma=0.1, num_probes=2, probes=probes)
    with pytest.raises(ValueError, match="num_matvecs=6 uses 4 probes"):
        T.hutchpp_trace(f, x, num_matvecs=6, probes=probes)
    with pytest.raises(ValueError, match="floating-point"):
        T.hutchinson_trace(f, x, probes=probes.astype(jnp.int32))


@pytest.mark.usefixtures("fast_compilation")
def test_a_repeated_eager_call_compiles_nothing():
    """No hidden jit: an eager call runs per-operation programs (compiled once per shape) and the probe loop is a
    Python loop eagerly, so calling an estimator twice compiles nothing the second time (it used to jit a fresh
    closure on every call)."""
    n = [0]

    def listener(event, duration, **kwargs):
        if event == "/jax/core/compile/backend_compile_duration":
            n[0] += 1

    f, x = softplus_net()
    key = jax.random.PRNGKey(3)
    calls = {
        "hutchinson": lambda: T.hutchinson_trace(f, x, key, num_probes=5, chunk=2),
        "taylor": lambda: T.taylor_trace(f, x, key, sigma=0.1, num_probes=3, chunk=2, warn_rtol=None),
        "exact": lambda: T.exact_trace(f, x, chunk=3),
    }
    for name, call in calls.items():
        first = call()
        jax.monitoring.register_event_duration_secs_listener(listener)
        try:
            n[0] = 0
            second = call()
        finally:
            jax.monitoring.unregister_event_duration_listener(listener)
        assert n[0] == 0, (name, n[0])
        chex.assert_trees_all_equal(first, second)


# ------------------------------------------------------------------------------------------ explicit probes
# A quadratic f(x)_b = ½ x_bᵀ A x_b + bᵀ x_b (Hessian A, gradient A x + b) and a hand-made probe set [N=2, B=2, 3].
A_P = np.array([[2.0, 0.5, 0.0], [0.5, 1.0, -0.3], [0.0, -0.3, 3.0]], np.float32)
B_P = np.array([0.1, -0.2, 0.3], np.float32)
X_P = np.array([[1.0, 0.0, -1.0], [0.5, 2.0, 0.0]], np.float32)
E_P = np.array([[[1.0, -1.0, 1.0], [1.0, 1.0, -1.0]], [[-1.0, -1.0, 1.0], [0.5, -2.0, 0.0]]], np.float32)
# Hutch++ with 9 matvecs uses k = 3 sketch probes (they span R^3 for both examples: exact) + 3 residual probes
E_PP = np.concatenate([np.broadcast_to(np.array([[1.0, 1.0, 1.0], [1.0, -1.0, 1.0], [1.0, 1.0, -1.0]],
                                                np.float32)[:, None], (3, 2, 3)), E_P, E_P[:1]])


def _hand_estimates(sigma):
    """εᵀAε averaged over E_P (Hutchinson; antithetic and control-variate Taylor are exact on a quadratic), plus
    the one-sided Taylor sample's first-order term 2 gᵀε / σ."""
    quad = np.einsum("nbi,ij,nbj->nb", E_P, A_P, E_P).mean(0)
    g = X_P @ A_P + B_P
    return {"hutchinson": quad, "antithetic": quad, "control_variate": quad,
            "one_sided": quad + (2.0 / sigma) * np.einsum("nbi,bi->nb", E_P, g).mean(0), "hutchpp": np.trace(A_P)}


def _estimators(f, sigma):
    """{name: (probes or key, x) -> trace}: every randomized estimator, keyword ``probes`` or ``key``."""
    out = {"hutchinson": lambda x, **k: T.hutchinson_trace(f, x, **k),
           "hutchpp": lambda x, **k: T.hutchpp_trace(f, x, num_matvecs=9, **k)}
    for form in ("one_sided", "antithetic", "control_variate"):
        out[form] = (lambda fm: lambda x, **k: T.taylor_trace(f, x, sigma=sigma, form=fm, warn_rtol=None, **k))(form)
    return out


@pytest.mark.usefixtures("fast_compilation")
class TestExplicitProbes(chex.TestCase):
    """Every estimator takes explicit probe noise instead of a key (issue 22 item 7): the draws of
    ``sample_probes(key, ..., num_probes=N)`` reproduce the key's estimate, and a hand-made probe set gives the
    hand-computed estimate on a quadratic — with and without jit."""

    @chex.variants(with_jit=True, without_jit=True)
    def test_key_draws_passed_as_probes_give_the_key_estimate(self):
        f, x = quadratic(jnp.float32, A_P, B_P), jnp.asarray(X_P)
        key = jax.random.PRNGKey(11)
        n = {"hutchinson": 5, "hutchpp": 9 - 3, "one_sided": 3, "antithetic": 3, "control_variate": 3}
        for name, est in _estimators(f, 0.1).items():
            num = {} if name == "hutchpp" else {"num_probes": n[name]}
            dist = "rademacher" if name.startswith("hutch") else "gaussian"
            probes = T.sample_probes(key, x.shape, x.dtype, dist, num_probes=n[name])
            by_key = self.variant(lambda x, key: est(x, key=key, chunk=2, **num))(x, key)
            by_probes = self.variant(lambda x, p: est(x, probes=p, chunk=2))(x, probes)
            # the same numbers up to float32 round-off (two separately compiled programs under jit; the one-sided
            # Taylor form amplifies the round-off of f by 2/sigma^2)
            chex.assert_trees_all_close(by_probes, by_key, rtol=1e-5, atol=1e-5)

    @chex.variants(with_jit=True, without_jit=True)
    def test_hand_made_probes_give_the_hand_computed_estimate(self):
        sigma = 1.0  # exact on a quadratic for any sigma; 1.0 keeps the float32 round-off small
        f = quadratic(jnp.float32, A_P, B_P)
        want = _hand_estimates(sigma)
        for name, est in _estimators(f, sigma).items():
            probes = E_PP if name == "hutchpp" else E_P
            got = self.variant(lambda x, p: est(x, probes=p))(jnp.asarray(X_P), jnp.asarray(probes))
            chex.assert_trees_all_close(got, np.broadcast_to(want[name], (2,)), rtol=1e-5, atol=1e-5)
        # one probe of x's shape is a probe set of one; value_grad_and_trace forwards probes too
        one = self.variant(lambda x, p: T.hutchinson_trace(f, x, probes=p))(jnp.asarray(X_P), jnp.asarray(E_P[0]))
        chex.assert_trees_all_close(one, np.einsum("bi,ij,bj->b", E_P[0], A_P, E_P[0]), rtol=1e-6)
        v, g, tr = self.variant(lambda x, p: T.value_grad_and_trace(f, x, method="taylor", sigma=sigma,
                                                                    form="antithetic", probes=p))(
            jnp.asarray(X_P), jnp.asarray(E_P))
        chex.assert_trees_all_close((g, tr), (X_P @ A_P + B_P, want["antithetic"]), rtol=1e-5, atol=1e-5)
