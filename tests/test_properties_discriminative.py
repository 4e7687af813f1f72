"""Property: the relevance / aggregation functions of :mod:`gradjax.discriminative` (and every other per-pixel channel
aggregation of gradjax) on 3-channel gradients, where
``Σ_c |g_c|`` and ``|Σ_c g_c|`` (and the signed channel std) differ — every value is checked against an independent
numpy computation (per-example ``jax.grad`` of the label logit, numpy ranking and filling), and the data are checked
to tell the wrong orders apart, so an implementation that sums channels before ``abs``, ranks by the wrong end,
fills with the wrong mean or reads the wrong model fails.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gradjax import discriminative as DP

pytestmark = pytest.mark.usefixtures("fast_compilation")

B, H, W, C, K = 24, 4, 4, 3, 3
FRACTIONS = (0.125, 0.25, 0.5, 0.75)


def _mlp(seed):
    rng = np.random.default_rng(seed)
    W1 = jnp.asarray(rng.normal(size=(H * W * C, 8)) / 4, jnp.float32)
    W2 = jnp.asarray(rng.normal(size=(8, K)), jnp.float32)
    return lambda x: jnp.tanh(x.reshape(x.shape[0], -1) @ W1) @ W2


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(B, H, W, C)).astype(np.float32)
    model, other = _mlp(1), _mlp(2)
    labels = np.array(jnp.argmax(model(jnp.asarray(x)), -1))
    labels[::3] = (labels[::3] + 1) % K  # some labels differ from the prediction: the label's gradient is used
    return jnp.asarray(x), labels.astype(np.int32), model, other


def _label_gradients(model, x, labels):
    """Per-example ∇_x f_y(x), one example at a time (independent of gradjax)."""
    one = lambda xb, y: jax.grad(lambda z: model(z[None])[0, y])(xb)  # noqa: E731
    return np.asarray(jax.vmap(one)(x, jnp.asarray(labels)))


def _numpy_curve(model, x, labels, rel, fractions, fill):
    x = np.asarray(x)
    acc = []
    for fr in fractions:
        k = int(round(fr * H * W))
        out = x.copy()
        for b in range(B):
            order = np.argsort(rel[b].reshape(-1), kind="stable")[:k]  # least relevant first
            value = x[b].reshape(-1, C).mean(0) if fill == "mean" else np.full(C, fill, np.float32)
            flat = out[b].reshape(-1, C)
            flat[order] = value
            out[b] = flat.reshape(H, W, C)
        pred = np.asarray(jnp.argmax(model(jnp.asarray(out)), -1))
        acc.append(np.mean(pred == labels))
    return np.asarray(acc)


def test_relevance_map_on_three_channels(data):
    x, labels, model, _ = data
    g = _label_gradients(model, x, labels)
    assert np.max(np.sum(np.abs(g), -1) - np.abs(np.sum(g, -1))) > 1e-2  # the orders differ on these data
    np.testing.assert_allclose(np.asarray(DP.relevance_map(jnp.asarray(g), "abs_sum")), np.sum(np.abs(g), -1),
                               rtol=1e-6)
    np.testing.assert_allclose(np.asarray(DP.relevance_map(jnp.asarray(g), "channel_std")), np.std(g, -1),
                               rtol=1e-5, atol=1e-7)
    for rel in ("abs_sum", "channel_std"):
        got = np.asarray(DP.label_gradient_relevance(model, x, labels, relevance=rel))
        want = np.sum(np.abs(g), -1) if rel == "abs_sum" else np.std(g, -1)
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("relevance,fill", [("abs_sum", "mean"), ("channel_std", 0.5)])
def test_discriminative_curve_matches_numpy(data, relevance, fill):
    x, labels, model, _ = data
    g = _label_gradients(model, x, labels)
    rel = np.sum(np.abs(g), -1) if relevance == "abs_sum" else np.std(g, -1)
    got = DP.discriminative_pixel_perturbation(model, x, labels, fractions=FRACTIONS, relevance=relevance, fill=fill)
    want = _numpy_curve(model, x, labels, rel, FRACTIONS, fill)
    np.testing.assert_allclose(np.asarray(got.accuracy), want, atol=1e-6)
    np.testing.assert_allclose(np.asarray(got.fractions), FRACTIONS, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(got.correct).mean(1), want, atol=1e-6)
    if relevance == "abs_sum":  # the data tell the orders apart: abs after the channel sum gives another curve
        wrong = _numpy_curve(model, x, labels, np.abs(np.sum(g, -1)), FRACTIONS, fill)
        assert np.any(wrong != want)


def test_gradient_model_and_evaluation_model_are_not_mixed_up(data):
    """Fig. 5.3b: relevance from ``gradient_fn``'s gradients, accuracy of ``evaluation_fn``."""
    x, labels, model, other = data
    g_other = _label_gradients(other, x, labels)
    got = DP.discriminative_pixel_perturbation(model, x, labels, gradient_fn=other, fractions=FRACTIONS)
    want = _numpy_curve(model, x, labels, np.sum(np.abs(g_other), -1), FRACTIONS, "mean")
    np.testing.assert_allclose(np.asarray(got.accuracy), want, atol=1e-6)
    own = _numpy_curve(model, x, labels, np.sum(np.abs(_label_gradients(model, x, labels)), -1), FRACTIONS, "mean")
    swapped = _numpy_curve(other, x, labels, np.sum(np.abs(_label_gradients(model, x, labels)), -1), FRACTIONS,
                           "mean")
    assert np.any(own != want) or np.any(swapped != want)  # the data tell the two models apart


def test_other_channel_aggregations_on_three_channels():
    """Every other per-pixel channel aggregation of gradjax on signed 3-channel maps, against numpy: the fooling
    loss's saliency distribution ``Σ_c|g| / Σ Σ_c|g|``, eq. 5.7 and the energy fraction (§5.7.2); attention maps
    ``Σ_c |z|^p`` (eq. 2.7, p = 1, 2, 3); full-gradient matching's channel map (signed sum / sum of |.|, eq. 4.3);
    the input-agnostic heat map ``Σ_c |rho|`` (eq. IA.4)."""
    from gradjax import input_agnostic as IA
    from gradjax.losses import attention as LA
    from gradjax.losses import fooling as FO
    from gradjax.losses import fullgrad_matching as FM

    rng = np.random.default_rng(5)
    g = rng.normal(size=(2, 5, 5, 3)).astype(np.float32)
    gj = jnp.asarray(g)
    e = np.abs(g).sum(-1)
    assert np.max(e - np.abs(g.sum(-1))) > 0.5  # abs before / after the channel sum differ on these data
    s = e / e.sum((1, 2), keepdims=True)
    np.testing.assert_allclose(np.asarray(FO.saliency_distribution(gj)), s, rtol=1e-5)
    mask = np.zeros((5, 5), np.float32)
    mask[:2, :3] = 1
    m = mask / mask.sum()
    np.testing.assert_allclose(np.asarray(FO.fooling_loss(gj, mask)), ((s - m) ** 2).sum((1, 2)), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(FO.energy_fraction(gj, mask)), (e * mask).sum((1, 2)) / e.sum((1, 2)),
                               rtol=1e-5)
    for p in (1.0, 2.0, 3.0):
        np.testing.assert_allclose(np.asarray(LA.attention_map(gj, p=p)), (np.abs(g) ** p).sum(-1), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(FM.channel_map(gj)), g.sum(-1), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(FM.channel_map(gj, channel_reduce="abs")), e, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(IA.heatmap(gj[0])), e[0], rtol=1e-5)
