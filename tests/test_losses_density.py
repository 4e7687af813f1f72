"""Ch. 5 losses: score-matching, anti-score-matching, gradient norm (eq. 5.4, §5.5), the hidden gradient-norm term
of the one-sided Taylor estimator (§5.8), explicit probe noise, and the fooling objective (eq. 5.7, §5.2/§5.7)."""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gradjax import gradients as G
from gradjax import trace as T
from gradjax.losses import fooling as F
from gradjax.losses import regularizers as R
from gradjax.losses import score_matching as SM
from gradjax.losses import terms as LT

pytestmark = pytest.mark.usefixtures("fast_compilation")

# A quadratic per-example f(x)_b = ½ x_bᵀ A x_b + cᵀ x_b + d with known gradient A x + c and trace tr A.
A = np.array([[2.0, 0.5, 0.0], [0.5, 1.0, -0.3], [0.0, -0.3, 3.0]])
C = np.array([0.1, -0.2, 0.3])
X = np.array([[1.0, 0.0, -1.0], [0.5, 2.0, 0.0]])


def quad(a_scale=1.0):
    def f(x):
        Ax = jnp.einsum("ij,bj->bi", a_scale * jnp.asarray(A, x.dtype), x)
        return 0.5 * jnp.sum(x * Ax, 1) + x @ jnp.asarray(C, x.dtype) + 0.7
    return f


def grad_q(x):
    return x @ A.T + C


# -------------------------------------------------------------------------------------- hand-computable cases
def test_score_matching_exact_equals_formula(x64):
    x = jnp.asarray(X)
    reg, terms = SM.score_matching(quad(), x, None, mu=0.1, estimator="exact")
    g = grad_q(X)
    want = np.trace(A) + 0.5 * np.sum(g ** 2, 1) + 0.1 * np.trace(A) ** 2
    chex.assert_trees_all_close(reg, want, rtol=1e-12)
    chex.assert_trees_all_close(terms.grad, g, rtol=1e-12)
    chex.assert_trees_all_close(terms.trace, np.full(2, np.trace(A)), rtol=1e-12)


@pytest.mark.parametrize("form", ["one_sided", "antithetic", "control_variate"])
def test_score_matching_taylor_equals_formula_on_the_same_probe(x64, form):
    """On a quadratic the Taylor sample is exact: one-sided (2/σ²)(gᵀv + ½vᵀAv), the others vᵀAv/σ²."""
    x, key, sigma, mu = jnp.asarray(X), jax.random.PRNGKey(3), 0.01, 1e-3
    reg, terms = SM.score_matching(quad(), x, key, mu=mu, estimator="taylor", sigma=sigma, form=form)
    eps = np.asarray(T.sample_probes(jax.random.fold_in(key, 0), x.shape, x.dtype, "gaussian"))
    v, g = sigma * eps, grad_q(X)
    quad_term = np.einsum("bi,ij,bj->b", v, A, v) / sigma ** 2
    h = quad_term + (2 / sigma ** 2) * np.sum(g * v, 1) if form == "one_sided" else quad_term
    chex.assert_trees_all_close(terms.trace, h, rtol=1e-8)
    chex.assert_trees_all_close(reg, h + 0.5 * np.sum(g ** 2, 1) + mu * h ** 2, rtol=1e-8)


@pytest.mark.parametrize("estimator", ["hutchinson", "hutchpp"])
def test_score_matching_hvp_estimators_on_quadratic(x64, estimator):
    opts = {"num_matvecs": 9} if estimator == "hutchpp" else {"num_probes": 1}
    reg, terms = SM.score_matching(quad(), jnp.asarray(X), jax.random.PRNGKey(0), mu=0.0, estimator=estimator, **opts)
    if estimator == "hutchpp":  # 3 sketch directions span R^3: exact
        chex.assert_trees_all_close(terms.trace, np.full(2, np.trace(A)), rtol=1e-9)
    else:  # Rademacher: εᵀAε = tr A + 2 Σ_{i<j} A_ij ε_i ε_j
        eps = np.asarray(T.sample_probes(jax.random.fold_in(jax.random.PRNGKey(0), 0), X.shape, jnp.float64,
                                         "rademacher"))
        chex.assert_trees_all_close(terms.trace, np.einsum("bi,ij,bj->b", eps, A, eps), rtol=1e-9)
    chex.assert_trees_all_close(reg, terms.trace + 0.5 * np.sum(grad_q(X) ** 2, 1), rtol=1e-9)


def test_gradient_norm_equals_formula(x64):
    """§5.5's "Gradient-Norm" ½‖∇f_y‖² is half the one gradient-norm penalty (logit form, label row), and the
    score-matching family's ½‖g‖² is the same squared norm."""
    logits_fn = lambda z: jnp.stack([quad()(z), jnp.zeros(z.shape[0], z.dtype)], -1)
    y = jnp.zeros(2, jnp.int32)
    want = 0.5 * np.sum(grad_q(X) ** 2, 1)
    chex.assert_trees_all_close(0.5 * R.gradient_norm(logits_fn, jnp.asarray(X), y, form="logit"), want, rtol=1e-12)
    terms = SM.density_terms(quad(), jnp.asarray(X), need_trace=False)
    chex.assert_trees_all_close(0.5 * terms.grad_sq_norm, want, rtol=1e-12)
    assert terms.trace is None


def test_anti_score_matching_value_and_clamp_stops_gradient(x64):
    """-min(tr, τ) per example; d/dθ is -d tr/dθ below τ and exactly 0 above (f = ½ θ xᵀAx: tr = θ tr A)."""
    x, tau = jnp.asarray(X), 10.0

    def reg(theta):
        return SM.anti_score_matching(quad(theta), x, None, tau=tau, estimator="exact")[0]

    chex.assert_trees_all_close(reg(1.0), np.full(2, -np.trace(A)))            # tr A = 6 < τ
    chex.assert_trees_all_close(reg(3.0), np.full(2, -tau))                    # 18 > τ: clamped
    d = jax.jacfwd(reg)
    chex.assert_trees_all_close(d(1.0), np.full(2, -np.trace(A)))
    chex.assert_trees_all_equal(d(3.0), np.zeros(2))
    # per example: one example above, one below
    tr = jnp.array([5.0, 50.0])
    chex.assert_trees_all_equal(jax.grad(lambda t: jnp.sum(SM.anti_score_matching_from_terms(t, tau=tau)))(tr),
                                np.array([-1.0, 0.0]))


# ------------------------------------------------------- the hidden gradient-norm term (Monte Carlo, §5.8)
def test_implied_regularizer_authors_setting():
    r = SM.implied_regularizer(mu=1e-3, sigma=0.01, num_probes=1)
    assert r["hidden_grad_sq_norm"] == pytest.approx(40.0)
    assert r["hidden_to_explicit"] == pytest.approx(80.0)
    for form in ("antithetic", "control_variate"):
        assert SM.implied_regularizer(mu=1e-3, sigma=0.01, form=form)["hidden_grad_sq_norm"] == 0.0
    assert SM.implied_regularizer(mu=1e-3, estimator="hutchinson")["hidden_grad_sq_norm"] == 0.0


@pytest.mark.parametrize("form", ["one_sided", "antithetic", "control_variate"])
def test_monte_carlo_stability_term_matches_implied_regularizer(x64, form):
    """E[μ h²] = μ tr² + 2μ‖H‖_F² + (4μ/σ²)‖g‖² (one-sided) over 40k independent probes, within 5 std errors."""
    sigma, mu, n = 0.1, 1.0, 40_000
    x = jnp.asarray(X[:1])
    keys = jax.random.split(jax.random.PRNGKey(7), n)
    h = jax.jit(jax.vmap(lambda k: T.taylor_trace(quad(), x, k, sigma=sigma, form=form, warn_rtol=None)[0]))(keys)
    mc = mu * np.asarray(h) ** 2
    r = SM.implied_regularizer(mu=mu, sigma=sigma, form=form)
    g2 = float(np.sum(grad_q(X[:1]) ** 2))
    want = mu * np.trace(A) ** 2 + r["hessian_fro_sq"] * np.sum(A ** 2) + r["hidden_grad_sq_norm"] * g2
    assert abs(mc.mean() - want) < 5 * mc.std() / np.sqrt(n), (mc.mean(), want)
    if form == "one_sided":  # the hidden term dominates here: (4/σ²)‖g‖² ≫ μ tr² + 2μ‖H‖_F²
        assert r["hidden_grad_sq_norm"] * g2 > 5 * (mu * np.trace(A) ** 2 + 2 * mu * np.sum(A ** 2))


# ----------------------------------------------------------------- estimator correctness on a smooth network
def test_taylor_estimators_converge_to_exact_trace_on_softplus_avgpool_net(x64):
    """Smooth net (conv → softplus β=10 → average pool → dense): all forms average to the exact trace."""
    k1, k2, k3 = jax.random.split(jax.random.PRNGKey(0), 3)
    w = jax.random.normal(k1, (3, 3, 1, 4)) * 0.5
    v = jax.random.normal(k2, (4, 3))
    x = jax.random.uniform(k3, (2, 6, 6, 1))

    def logits_fn(x):
        z = jax.lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return jnp.mean(jax.nn.softplus(10 * z) / 10, axis=(1, 2)) @ v

    f = SM.label_logit_fn(logits_fn, jnp.array([0, 2]))
    exact = np.asarray(SM.density_terms(f, x, None, estimator="exact").trace)
    keys = jax.random.split(jax.random.PRNGKey(1), 4000)
    for form in ("antithetic", "control_variate", "one_sided"):
        h = np.asarray(jax.jit(jax.vmap(lambda k: SM.density_terms(
            f, x, k, estimator="taylor", sigma=1e-2, form=form).trace))(keys))  # one probe per key
        se = h.std(0) / np.sqrt(len(keys))
        assert np.all(np.abs(h.mean(0) - exact) < 5 * se + 0.02 * np.abs(exact)), (form, h.mean(0), exact, se)


# ------------------------------------------------------------------------------------------------ validation
def test_validation_errors():
    x = jnp.asarray(X, jnp.float32)
    with pytest.raises(ValueError, match="sigma"):
        SM.score_matching(quad(), x, jax.random.PRNGKey(0), sigma=0.0)
    with pytest.raises(ValueError, match="sigma"):
        SM.anti_score_matching(quad(), x, jax.random.PRNGKey(0), sigma=-1.0)
    with pytest.raises(ValueError, match="mu"):
        SM.score_matching(quad(), x, jax.random.PRNGKey(0), mu=-1.0)
    with pytest.raises(ValueError, match="tau"):
        SM.anti_score_matching_from_terms(jnp.ones(2), tau=float("inf"))
    with pytest.raises(ValueError, match="key"):
        SM.score_matching(quad(), x, None)
    with pytest.raises(ValueError, match="estimator"):
        SM.score_matching(quad(), x, jax.random.PRNGKey(0), estimator="nope")
    with pytest.raises(ValueError, match="per-example"):
        SM.score_matching_from_terms(jnp.ones((2, 1)), x, mu=0.0)
    with pytest.raises(ValueError, match="batch"):
        SM.score_matching_from_terms(jnp.ones(3), x, mu=0.0)
    with pytest.raises(ValueError, match="labels"):
        SM.label_logit_fn(lambda z: z, jnp.ones((2, 2), jnp.int32))
    with pytest.raises(ValueError, match="noisy_f"):
        SM.density_terms(quad(), x, jax.random.PRNGKey(0), estimator="hutchinson", noisy_f=quad())


# ------------------------------------------------------------------------------------------------- fooling
def test_corner_mask_and_uniform_energy():
    m = F.corner_mask(32)
    assert m.shape == (32, 32) and m.sum() == 15 * 15
    frac = F.energy_fraction(jnp.ones((2, 32, 32, 3)), m)
    chex.assert_trees_all_close(frac, 225 / 1024, rtol=1e-6)  # the thesis's "22 %"
    with pytest.raises(ValueError, match="side"):
        F.corner_mask(8, side=9)
    with pytest.raises(ValueError, match="mask"):
        F.energy_fraction(jnp.ones((1, 8, 8, 1)), np.ones((4, 4)))


def test_fooling_loss_formula():
    g = np.zeros((1, 2, 2, 1), np.float32)
    g[0, 0, 0, 0], g[0, 1, 1, 0] = 3.0, -1.0                       # s = [[.75, 0], [0, .25]]
    mask = np.array([[1.0, 1.0], [0.0, 0.0]])                      # m = [[.5, .5], [0, 0]]
    want = (0.75 - 0.5) ** 2 + 0.5 ** 2 + 0.0 + 0.25 ** 2
    chex.assert_trees_all_close(F.fooling_loss(jnp.asarray(g), mask), np.array([want]), rtol=1e-6)
    chex.assert_trees_all_close(F.fooling_loss(jnp.zeros((1, 2, 2, 1)), mask), np.array([0.5]), rtol=1e-6)  # no NaN


def test_shift_logits_changes_logit_gradients_not_loss_gradients():
    k1, k2 = jax.random.split(jax.random.PRNGKey(0))
    W = jax.random.normal(k1, (12, 4))
    x = jax.random.uniform(k2, (3, 2, 2, 3))
    logits_fn = lambda z: jnp.tanh(z.reshape(z.shape[0], -1)) @ W
    shifted = F.shift_logits(logits_fn, lambda z: 5.0 * jnp.sum(z[:, 0, 0, :] ** 2, -1))
    y = jnp.array([0, 1, 3])
    chex.assert_trees_all_close(G.loss_gradient(shifted, x, y), G.loss_gradient(logits_fn, x, y), atol=1e-5)
    d = G.logit_gradient(shifted, x, y) - G.logit_gradient(logits_fn, x, y)
    chex.assert_trees_all_close(d[:, 0, 0, :], 10.0 * x[:, 0, 0, :], rtol=1e-5)   # ∇g
    chex.assert_trees_all_close(F.energy_fraction(d, np.pad(np.ones((1, 1)), ((0, 1), (0, 1)))), 1.0)


def test_fooling_loss_moves_saliency_energy_into_the_mask():
    """A tiny softplus MLP on 6×6 inputs, trained with CE + λ L_fool: the logit-gradient energy in the 3×3
    top-left corner (25 % of the pixels) rises far above its starting share while accuracy stays."""
    import optax

    k1, k2, k3 = jax.random.split(jax.random.PRNGKey(0), 3)
    x = jax.random.uniform(k1, (64, 6, 6, 1))
    y = (jnp.sum(x[:, 3:, 3:, 0], (1, 2)) > jnp.median(jnp.sum(x[:, 3:, 3:, 0], (1, 2)))).astype(jnp.int32)
    params = {"w1": jax.random.normal(k2, (36, 32)) / 6, "w2": jax.random.normal(k3, (32, 2)) / 6}
    mask = F.corner_mask(6, side=3)
    logits_of = lambda p: (lambda z: (jax.nn.softplus(10 * z.reshape(z.shape[0], -1) @ p["w1"]) / 10) @ p["w2"])

    def loss(p):
        fool, logits = F.fooling_loss_of_model(logits_of(p), x, y, mask)
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, y)
        return jnp.mean(ce) + 100.0 * jnp.mean(fool)

    tx = optax.adam(1e-2)
    step = jax.jit(lambda p, s: (lambda g: (lambda u: (optax.apply_updates(p, u[0]), u[1]))(tx.update(g, s, p)))(
        jax.grad(loss)(p)))
    frac = lambda p: float(jnp.mean(F.energy_fraction(G.logit_gradient(logits_of(p), x, y), mask)))
    before = frac(params)
    opt = tx.init(params)
    for _ in range(300):
        params, opt = step(params, opt)
    after = frac(params)
    assert before < 0.3 and after > 0.6, (before, after)
    assert float(jnp.mean(jnp.argmax(logits_of(params)(x), -1) == y)) > 0.7


# ------------------------------------------------------------------------------------------ explicit probes
def test_score_matching_with_explicit_probes(x64):
    """Explicit probe noise instead of a key: the key's own draws reproduce the key's regularizer, and a hand-made
    probe set gives the hand-computed one-sided Taylor value (exact on a quadratic): h = εᵀAε + 2 gᵀε/σ."""
    x, key, sigma, mu = jnp.asarray(X), jax.random.PRNGKey(5), 0.5, 1e-3
    drawn = T.sample_probes(key, x.shape, x.dtype, "gaussian", num_probes=3)
    by_key = SM.score_matching(quad(), x, key, mu=mu, sigma=sigma, num_probes=3)[0]
    chex.assert_trees_all_close(SM.score_matching(quad(), x, probes=drawn, mu=mu, sigma=sigma)[0], by_key,
                                rtol=1e-12)
    eps = np.array([[[1.0, 0.0, 0.0], [0.0, 1.0, 1.0]], [[0.0, -1.0, 0.0], [1.0, 0.0, -1.0]]])
    g = grad_q(X)
    h = (np.einsum("nbi,ij,nbj->nb", eps, A, eps) + (2 / sigma) * np.einsum("nbi,bi->nb", eps, g)).mean(0)
    reg, terms = SM.score_matching(quad(), x, probes=jnp.asarray(eps), mu=mu, sigma=sigma)
    chex.assert_trees_all_close((terms.trace, reg), (h, h + 0.5 * np.sum(g ** 2, 1) + mu * h ** 2), rtol=1e-10)
    anti, _ = SM.anti_score_matching(quad(), x, probes=jnp.asarray(eps), tau=1.0, sigma=sigma)
    chex.assert_trees_all_close(anti, -np.minimum(h, 1.0), rtol=1e-10)
    hut = SM.density_terms(quad(), x, probes=jnp.asarray(eps), estimator="hutchinson").trace
    chex.assert_trees_all_close(hut, np.einsum("nbi,ij,nbj->nb", eps, A, eps).mean(0), rtol=1e-12)
    with pytest.raises(ValueError, match="exact"):
        SM.density_terms(quad(), x, probes=jnp.asarray(eps), estimator="exact")
    with pytest.raises(ValueError, match="fresh probes"):
        LT.score_matching_term(1e-3, probes=jnp.asarray(eps))


def test_chapter5_gradient_norm_term_is_half_the_logit_penalty():
    """The §5.5 regularizer through the one term factory: gradient_norm_term(λ/2, form="logit") on a linear model
    f(x) = W x adds λ · ½‖W_y‖² to the loss (the input-gradient of the label logit is the row W_y)."""
    W = jnp.asarray(np.arange(12, dtype=np.float32).reshape(4, 3) / 10)

    def apply_fn(v, x, train=False, mutable=None):  # a Linen-style apply of f(x) = W x (no BatchNorm)
        out = x.reshape(x.shape[0], -1) @ v["params"]["w"]
        return out if mutable is None else (out, {})

    lam = 0.3
    loss_fn = LT.make_loss_fn(apply_fn, [LT.gradient_norm_term(lam / 2, form="logit", name="gradient_norm")])
    batch = {"image": jnp.ones((2, 2, 2, 1)), "label": jnp.array([0, 2])}
    ctx = type("Ctx", (), {"rng": jax.random.PRNGKey(0), "step": 0, "frozen": None})()
    loss, aux = loss_fn({"w": W}, {}, batch, ctx)
    want = lam * 0.5 * np.mean(np.sum(np.asarray(W).T[[0, 2]] ** 2, 1))
    chex.assert_trees_all_close(loss, want, rtol=1e-6)
    chex.assert_trees_all_close(aux["metrics"]["term/gradient_norm"], want / (lam / 2), rtol=1e-6)
