import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gradjax.models import MODEL_NAMES, VGG_CONFIGS, create_model


def test_thesis_vgg_layer_lists():
    # thesis §2.12.1
    assert VGG_CONFIGS["vgg9"] == (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M")
    assert VGG_CONFIGS["vgg4"] == (64, "M", 128, "M", 512, "M")
    # VGG-n has n weight layers: convolutions + the single Dense layer
    for name, cfg in VGG_CONFIGS.items():
        assert sum(1 for l in cfg if l != "M") + 1 == int(name[3:])


def _count_convs(params):
    return sum(1 for path, _ in jax.tree_util.tree_leaves_with_path(params)
               if "kernel" in jax.tree_util.keystr(path) and "head" not in jax.tree_util.keystr(path))


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_every_model_builds_with_right_output_shape(name):
    model = create_model(name, 7, width=0.125)
    for shape in [(2, 32, 32, 3), (2, 32, 32, 1)]:  # CIFAR and the embedded digits
        x = jax.random.normal(jax.random.PRNGKey(0), shape)
        # shape inference by tracing only (compiling every deep model would dominate the suite's time)
        variables = jax.eval_shape(model.init, jax.random.PRNGKey(1), x)
        assert jax.eval_shape(model.apply, variables, x).shape == (2, 7)
    if name in ("vgg4", "mlp"):  # and a real forward pass
        variables = jax.jit(model.init)(jax.random.PRNGKey(1), x)
        y = jax.jit(model.apply)(variables, x)
        assert y.shape == (2, 7) and bool(jnp.all(jnp.isfinite(y)))
    if name.startswith("vgg"):
        # full-width channel counts follow the configuration exactly
        full = create_model(name, 7)
        shapes = jax.eval_shape(full.init, jax.random.PRNGKey(1), x)
        blocks = sorted((k for k in shapes["params"] if k.startswith("block")), key=lambda k: int(k[5:]))
        chans = [shapes["params"][k]["conv"]["kernel"].shape[-1] for k in blocks]
        assert chans == [l for l in VGG_CONFIGS[name] if l != "M"]
    if name == "resnet18":
        # 1 stem + 8 blocks * 2 + 3 projection shortcuts = 20 convolutions (17 on the main path + 1 Dense = 18)
        assert _count_convs(variables["params"]) == 20


def test_train_mode_updates_batch_stats_and_softplus_runs():
    model = create_model("vgg4", 10, activation="softplus", beta=10.0, width=0.25)
    x = jax.random.normal(jax.random.PRNGKey(0), (4, 32, 32, 1)) * 3 + 1
    v = jax.jit(model.init)(jax.random.PRNGKey(1), x)
    _, new = jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"]))(v, x)
    before = v["batch_stats"]["block0"]["bn"]["mean"]
    after = new["batch_stats"]["block0"]["bn"]["mean"]
    assert not np.allclose(before, after)


def test_bias_taps_are_keyed_by_module_path():
    model = create_model("vgg4", 10, activation="softplus", width=0.125)
    x = jnp.ones((2, 32, 32, 1))
    v = jax.eval_shape(model.init, jax.random.PRNGKey(0), x)
    assert set(v) == {"params", "batch_stats"}  # init does not leave tap collections behind
    _, mut = jax.eval_shape(lambda v, x: model.apply(v, x, mutable=["biases", "perturbations"]), v, x)
    assert set(mut["biases"]) == {"block0", "block1", "block2", "head"}
    assert set(mut["biases"]["block0"]) == {"conv", "bn", "act"}
    assert jax.tree.structure(mut["biases"]) == jax.tree.structure(mut["perturbations"])
    # relu has no implicit bias
    _, mut = jax.eval_shape(lambda v, x: create_model("vgg4", 10, width=0.125).apply(v, x, mutable=["biases"]), v, x)
    assert set(mut["biases"]["block0"]) >= {"conv", "bn"}
    assert jax.tree.leaves(mut["biases"]["block0"].get("act", {})) == []


def test_models_check_shapes_only_and_the_library_boundary_checks_values():
    """Models do not validate values inside ``__call__`` (no host copy of ``x`` per call); a wrong rank still fails
    clearly at trace time, and dtype / NaN inputs are caught at the library boundary (gradjax._validation)."""
    from gradjax import gradients, saliency
    model = create_model("vgg4", 10, width=0.125)
    x = jnp.ones((1, 8, 8, 1))
    v = jax.eval_shape(model.init, jax.random.PRNGKey(0), x)
    with pytest.raises(ValueError, match="rank 4"):
        jax.eval_shape(model.apply, v, jnp.ones((8, 8, 1)))
    bad = jnp.full((2, 8, 8, 1), jnp.nan)
    assert jax.eval_shape(model.apply, v, bad).shape == (2, 10)  # the model itself does not look at values
    f = lambda z: 2.0 * z.reshape(z.shape[0], -1)[:, :3]  # noqa: E731
    with pytest.raises(ValueError, match="non-finite"):
        saliency.input_gradient(f, bad)
    with pytest.raises(ValueError, match="floating-point"):
        gradients.logit_gradient(f, jnp.ones((2, 8, 8, 1), jnp.int32))


def test_too_small_input_for_architecture():
    model = create_model("vgg9", 10, width=0.125)
    with pytest.raises(ValueError, match="too small"):
        model.init(jax.random.PRNGKey(0), jnp.ones((1, 8, 8, 1)))


def test_unknown_model_and_activation():
    with pytest.raises(ValueError, match="unknown model"):
        create_model("vgg5", 10)
    with pytest.raises(ValueError, match="activation"):
        create_model("vgg4", 10, activation="tanh")


def test_float32_images_into_float64_parameters(x64):
    """With x64 on, parameters initialize in float64; float32 images must still run (promoted, not rejected)."""
    model = create_model("vgg4", 3, width=1 / 16)
    x32 = jnp.ones((2, 8, 8, 1), jnp.float32)
    variables = model.init(jax.random.PRNGKey(0), x32)
    assert jax.tree.leaves(variables["params"])[0].dtype == jnp.float64
    out = model.apply(variables, x32)
    assert out.dtype == jnp.float64 and out.shape == (2, 3)
    np.testing.assert_allclose(out, model.apply(variables, x32.astype(jnp.float64)), rtol=1e-12)
