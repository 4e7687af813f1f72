"""gradjax.models.cpu_ops: the opt-in im2col convolution and mask max-pool give the default ops' values and
derivatives (issue 27), ties included; the model options change no map."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gradjax import saliency
from gradjax.models import create_model
from gradjax.models.cpu_ops import conv, conv_im2col, max_pool_mask


def _lax_conv(x, w, padding="SAME"):
    return jax.lax.conv_general_dilated(x, w, (1, 1), padding, dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                        precision="highest")


@pytest.mark.parametrize("backward", ["gemm", "autodiff"])
@pytest.mark.parametrize("shape,padding", [((2, 6, 5, 3, 4), "SAME"), ((1, 7, 7, 2, 3), "VALID")])
def test_conv_im2col_values_and_vjp(backward, shape, padding):
    b, h, w_, c, o = shape
    k1, k2, k3 = jax.random.split(jax.random.PRNGKey(sum(shape)), 3)
    x = jax.random.normal(k1, (b, h, w_, c))
    w = jax.random.normal(k2, (3, 3, c, o))
    f = lambda x, w: conv_im2col(x, w, padding=padding, precision="highest", backward=backward)  # noqa: E731
    y, pull = jax.vjp(f, x, w)
    y_ref, pull_ref = jax.vjp(lambda x, w: _lax_conv(x, w, padding), x, w)
    np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
    g = jax.random.normal(k3, y.shape)
    for a, r in zip(pull(g), pull_ref(g)):
        np.testing.assert_allclose(a, r, rtol=1e-5, atol=1e-5)


def test_conv_im2col_autodiff_jvp_and_gemm_rejects_jvp():
    x = jax.random.normal(jax.random.PRNGKey(0), (1, 5, 5, 2))
    w = jax.random.normal(jax.random.PRNGKey(1), (3, 3, 2, 3))
    t = jax.random.normal(jax.random.PRNGKey(2), x.shape)
    _, jv = jax.jvp(lambda x: conv("im2col", x, w, precision="highest"), (x,), (t,))
    _, jv_ref = jax.jvp(lambda x: _lax_conv(x, w), (x,), (t,))
    np.testing.assert_allclose(jv, jv_ref, rtol=1e-5, atol=1e-5)
    with pytest.raises(TypeError):  # custom VJP: reverse mode only (documented)
        jax.jvp(lambda x: conv("im2col_gemm", x, w), (x,), (t,))
    with pytest.raises(ValueError, match="conv_impl"):
        conv("winograd", x, w)


def test_max_pool_mask_ties_route_like_select_and_scatter():
    # values from {0, 1, 2}: most windows have tied maxima, at every position of the window
    x = jax.random.randint(jax.random.PRNGKey(3), (3, 9, 8, 4), 0, 3).astype(jnp.float32)  # odd height: dropped row
    ref = lambda x: nn.max_pool(x, (2, 2), (2, 2))  # noqa: E731
    y, pull = jax.vjp(max_pool_mask, x)
    y_ref, pull_ref = jax.vjp(ref, x)
    np.testing.assert_array_equal(y, y_ref)
    g = jax.random.normal(jax.random.PRNGKey(4), y.shape)
    np.testing.assert_array_equal(pull(g)[0], pull_ref(g)[0])
    t = jax.random.normal(jax.random.PRNGKey(5), x.shape)
    np.testing.assert_array_equal(jax.jvp(max_pool_mask, (x,), (t,))[1], jax.jvp(ref, (x,), (t,))[1])
    # every window tied: the whole cotangent goes to the window's top-left element
    d = jax.vjp(max_pool_mask, jnp.ones((1, 2, 2, 1)))[1](jnp.ones((1, 1, 1, 1)))[0]
    np.testing.assert_array_equal(d[0, :, :, 0], [[1.0, 0.0], [0.0, 0.0]])


@pytest.fixture(scope="module")
def nets():
    x = jax.random.uniform(jax.random.PRNGKey(0), (3, 16, 16, 3))
    x = x.at[0].set(0.5)  # a constant image: tied max-pool windows and ReLU kinks in the first layers
    base = create_model("vgg4", 10, width=0.125)
    v = base.init(jax.random.PRNGKey(1), x[:1])
    _, upd = base.apply(v, x, train=True, mutable=["batch_stats"])
    v = {"params": v["params"], "batch_stats": upd["batch_stats"]}
    return x, v, base


@pytest.mark.parametrize("conv_impl,pool_impl", [("im2col", "mask"), ("im2col_gemm", "lax"), ("im2col_small", "mask")])
def test_model_option_keeps_maps(nets, conv_impl, pool_impl):
    """Logits, the input-gradient map (on a constant image: tied max-pool windows) and a train-mode weight-gradient
    equal the default model's."""
    x, v, base = nets
    fast = create_model("vgg4", 10, width=0.125, conv_impl=conv_impl, pool_impl=pool_impl)
    np.testing.assert_allclose(fast.apply(v, x), base.apply(v, x), rtol=1e-5, atol=1e-5)
    grad_x = lambda m: jax.grad(lambda z: m.apply(v, z)[:, 3].sum())(x)  # noqa: E731
    a, r = np.asarray(grad_x(fast)), np.asarray(grad_x(base))
    np.testing.assert_allclose(a, r, rtol=1e-4, atol=1e-5 * np.abs(r).max())
    assert np.abs(r[0]).max() > 0  # the constant image's map is not trivially zero

    def loss(p, model):
        out, _ = model.apply({"params": p, "batch_stats": v["batch_stats"]}, x, train=True, mutable=["batch_stats"])
        return jnp.sum(jax.nn.log_softmax(out)[:, 0])
    ga, gr = jax.grad(loss)(v["params"], fast), jax.grad(loss)(v["params"], base)
    scale = max(float(np.abs(r).max()) for r in jax.tree.leaves(gr))  # (a bias before train-mode BN: ~0 gradient)
    for a, r in zip(jax.tree.leaves(ga), jax.tree.leaves(gr)):
        np.testing.assert_allclose(a, r, rtol=1e-4, atol=1e-5 * scale)


def test_saliency_map_with_model_option(nets):
    """An end-to-end saliency method (FullGrad: input- and bias-gradients) is unchanged by im2col + mask."""
    x, v, base = nets
    fast = create_model("vgg4", 10, width=0.125, conv_impl="im2col_small", pool_impl="mask")
    a = np.asarray(saliency.fullgrad(saliency.ModelHandle(fast.apply, v), x))
    r = np.asarray(saliency.fullgrad(saliency.ModelHandle(base.apply, v), x))
    np.testing.assert_allclose(a, r, rtol=1e-4, atol=1e-4 * np.abs(r).max())


def test_model_option_forward_over_reverse(nets):
    """A Hessian-vector product (jvp of grad, as the trace estimators use) through im2col + mask equals lax's."""
    x, v, base = nets
    fast = create_model("vgg4", 10, width=0.125, activation="softplus", conv_impl="im2col", pool_impl="mask")
    smooth = create_model("vgg4", 10, width=0.125, activation="softplus")
    u = jax.random.normal(jax.random.PRNGKey(9), x.shape)
    hvp = lambda m: jax.jvp(jax.grad(lambda z: jax.nn.logsumexp(m.apply(v, z)).sum()), (x,), (u,))[1]  # noqa: E731
    a, r = np.asarray(hvp(fast)), np.asarray(hvp(smooth))
    np.testing.assert_allclose(a, r, rtol=1e-4, atol=1e-4 * np.abs(r).max())


def test_create_model_rejects_bad_impl():
    with pytest.raises(ValueError, match="conv_impl"):
        create_model("vgg4", 10, conv_impl="fft")
    with pytest.raises(ValueError, match="pool_impl"):
        create_model("vgg4", 10, pool_impl="avg")
    with pytest.raises(ValueError, match="VGG options"):
        create_model("resnet18", 10, conv_impl="im2col")
