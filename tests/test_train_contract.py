"""The training contract loss_fn(params, model_state, batch, ctx): double-backprop objectives (gradient norm,
Jacobian matching against a frozen teacher) through the single-device, pmap and sharded steps; ``frozen`` is a
step argument (new teacher values, same compiled step, new result); batch specs for non-image batches; clear errors
for bad input."""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from gradjax import model as gmodel
from gradjax import train as gtrain
from gradjax.losses.classification import cross_entropy
from gradjax.models import create_model

pytestmark = pytest.mark.usefixtures("fast_compilation")

N_DEV, K, BS = 8, 5, 16


def _student(axis_name=None):
    return create_model("vgg4", K, width=1 / 16, axis_name=axis_name)


def _sel(logits, y):
    """sum_i logits[i, y_i]: with a frozen-moments pass, its input-gradient is the stack of per-example
    target-logit gradients."""
    return jnp.sum(jnp.take_along_axis(logits, y[:, None], axis=1))


def grad_norm_loss(apply_fn, lam=0.5):
    """``CE + lam * mean_i ||grad_x CE_i||^2`` — the input-gradients from a frozen-moments pass (double backprop)."""

    def loss_fn(params, model_state, batch, ctx):
        x, y = batch["image"], batch["label"]
        logits, new_state, moments = gmodel.apply_train(apply_fn, params, model_state, x)
        ce = jnp.mean(cross_entropy(logits, y))
        frozen = gmodel.extra_pass_fn(apply_fn, params, model_state, moments, "frozen")
        g = jax.grad(lambda z: jnp.sum(optax.softmax_cross_entropy_with_integer_labels(frozen(z)[0], y)))(x)
        pen = jnp.mean(jnp.sum(jnp.square(g), axis=(1, 2, 3)))
        return ce + lam * pen, {"model_state": new_state, "metrics": {"cross_entropy": ce, "grad_norm_sq": pen}}

    return loss_fn


def jacobian_matching_loss(apply_fn, teacher_apply, lam=10.0):
    """``CE + lam * mean_i ||grad_x S_{y_i}(x_i) - grad_x T_{y_i}(x_i)||^2`` (thesis eq. 2.2's Jacobian term,
    target-class output); the teacher's variables come from ``ctx.frozen``."""

    def loss_fn(params, model_state, batch, ctx):
        x, y = batch["image"], batch["label"]
        logits, new_state, moments = gmodel.apply_train(apply_fn, params, model_state, x)
        ce = jnp.mean(cross_entropy(logits, y))
        gs = jax.grad(lambda z: _sel(gmodel.apply_frozen(apply_fn, params, model_state, moments, z), y))(x)
        gt = jax.grad(lambda z: _sel(teacher_apply(ctx.frozen, z, train=False), y))(x)
        jm = jnp.mean(jnp.sum(jnp.square(gs - gt), axis=(1, 2, 3)))
        return ce + lam * jm, {"model_state": new_state, "metrics": {"cross_entropy": ce, "jacobian": jm}}

    return loss_fn


@pytest.fixture(scope="module")
def setup():
    assert jax.device_count() >= N_DEV, "conftest should give 8 fake CPU devices"
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 8, 8, 1))
    state = gtrain.create_train_state(_student(), optax.sgd(0.1, momentum=0.9), x, seed=0)
    teacher = create_model("vgg4", K, width=1 / 8)
    tv = teacher.init(jax.random.PRNGKey(7), x, train=False)
    # non-trivial running statistics for the teacher (eval mode uses them)
    _, upd = teacher.apply(tv, x * 2 + 1, train=True, mutable=["batch_stats"])
    tv = {"params": tv["params"], **upd}
    rng = np.random.default_rng(0)
    batches = [{"image": (rng.normal(size=(BS, 8, 8, 1)) * 2 + 0.5).astype(np.float32),
                "label": rng.integers(0, K, size=(BS,)).astype(np.int32)} for _ in range(2)]
    return state, teacher, tv, batches


def _losses(kind, teacher, axis_name=None):
    apply_fn = _student(axis_name).apply
    return grad_norm_loss(apply_fn) if kind == "grad_norm" else jacobian_matching_loss(apply_fn, teacher.apply)


def _close(a, b, atol=2e-5, rtol=2e-4):
    chex.assert_trees_all_close(a, b, atol=atol, rtol=rtol)


_STEPS = {}


def _jit_step(kind, teacher):
    """One jitted single-device step per objective for the whole module (compilation dominates), with a list that
    grows each time jit traces the loss."""
    if kind not in _STEPS:
        loss, traces = _losses(kind, teacher), []

        def counted(params, model_state, batch, ctx):
            traces.append(1)  # a Python side effect: runs only while tracing
            return loss(params, model_state, batch, ctx)

        _STEPS[kind] = (gtrain.jit_train_step(counted, num_classes=K, donate=False), traces)
    return _STEPS[kind]


@pytest.mark.parametrize("kind", ["grad_norm", "jacobian"])
def test_double_backprop_losses_agree_on_jit_pmap_and_sharded_steps(setup, kind):
    state0, teacher, tv, batches = setup
    frozen = tv if kind == "jacobian" else None

    step, _ = _jit_step(kind, teacher)
    ref = state0
    for b in batches:
        ref, m = step(ref, b, frozen)
    assert int(ref.step) == 2 and bool(m["finite"])
    reg = "jacobian" if kind == "jacobian" else "grad_norm_sq"
    assert float(m[reg]) > 0

    devs = jax.devices()[:N_DEV]
    mesh = gtrain.data_mesh(devs)
    pstep = gtrain.pmap_train_step(_losses(kind, teacher, "batch"), axis_name="batch", devices=devs, num_classes=K,
                                   donate=False)
    st = gtrain.replicate(state0, mesh, device_axis=True)
    for b in batches:
        st, pm = pstep(st, gtrain.shard(b, mesh, device_axis=True), frozen)
    st = gtrain.unreplicate(st)
    _close(st.params, ref.params)
    _close(st.batch_stats, ref.batch_stats)
    np.testing.assert_allclose(float(gtrain.unreplicate(pm)[reg]), float(m[reg]), rtol=2e-4)

    sstep = gtrain.sharded_train_step(_losses(kind, teacher), mesh, num_classes=K, donate=False)
    st = gtrain.replicate(state0, mesh)
    for b in batches:
        st, _ = sstep(st, gtrain.shard(b, mesh), frozen)
    _close(st.params, ref.params)
    _close(st.batch_stats, ref.batch_stats)
    assert not np.allclose(ref.batch_stats["block0"]["bn"]["mean"], 0.0)


def test_teacher_variables_are_step_arguments_not_constants(setup):
    """``frozen`` is an argument of the compiled step: other teacher values go through the same compiled step (the
    loss is traced once) and give the other teacher's update — the one a program with that teacher baked in as
    constants computes. A teacher captured as a constant would keep giving the old teacher's update."""
    state, teacher, tv, batches = setup
    step, traces = _jit_step("jacobian", teacher)
    s1, m1 = step(state, batches[0], tv)
    n_traces = len(traces)
    tv2 = jax.tree.map(lambda x: 1.5 * x, tv)  # another teacher (scaled weights, other input-gradients)
    s2, m2 = step(state, batches[0], tv2)
    assert len(traces) == n_traces, "new teacher values must not retrace the step"
    assert abs(float(m2["jacobian"]) - float(m1["jacobian"])) > 1e-3 * abs(float(m1["jacobian"]))
    assert not np.allclose(s2.params["head"]["kernel"], s1.params["head"]["kernel"])
    loss = _losses("jacobian", teacher)
    baked = jax.jit(gtrain.make_train_step(lambda p, s, b, ctx: loss(p, s, b, ctx._replace(frozen=tv2))))
    s_ref, m_ref = baked(state, batches[0])
    np.testing.assert_allclose(float(m2["jacobian"]), float(m_ref["jacobian"]), rtol=1e-4)
    _close(s2.params, s_ref.params)


def test_frozen_must_not_carry_a_device_axis(setup):
    state, teacher, tv, batches = setup
    devs = jax.devices()[:N_DEV]
    pstep = gtrain.pmap_train_step(_losses("jacobian", teacher, "batch"), devices=devs, num_classes=K, donate=False)
    mesh = gtrain.data_mesh(devs)
    with pytest.raises(ValueError, match=r"frozen\[.*split across devices.*leading device axis.*un-replicated"):
        pstep(gtrain.replicate(state, mesh, device_axis=True), gtrain.shard(batches[0], mesh, device_axis=True),
              gtrain.replicate(tv, mesh, device_axis=True))
    sstep = gtrain.sharded_train_step(_losses("jacobian", teacher), mesh, num_classes=K, donate=False)
    per_example = jax.device_put(jnp.zeros((BS, K)), NamedSharding(mesh, P("data")))
    with pytest.raises(ValueError, match="split across devices.*belong in the batch"):
        sstep(state, batches[0], {"teacher": tv, "logits": per_example})
    step = gtrain.jit_train_step(_losses("jacobian", teacher), num_classes=K, donate=False)
    with pytest.raises(ValueError, match="must be an array or a number"):
        step(state, batches[0], {"teacher": tv, "name": "vgg9"})


# ----------------------------------------------------------------------- non-image batches and bad contracts
def _toy_state():
    mlp = create_model("mlp", 1, hidden=(8,))
    return mlp, gtrain.create_train_state(mlp, optax.adam(1e-2), jnp.zeros((2, 2)), seed=0)


POINTS = {"x": gtrain.ArraySpec(shape=(2,), kind="float")}


def test_unlabelled_2d_batches_train_with_a_spec_and_use_ctx():
    """A toy-density objective on 2-D points (no labels, no images): denoising towards the data with noise from
    ctx.rng, a weight scheduled on ctx.step, a scale from ctx.frozen."""
    mlp, state = _toy_state()
    seen = {}

    def loss_fn(params, model_state, batch, ctx):
        x = batch["x"]
        noisy = x + ctx.frozen["sigma"] * jax.random.normal(ctx.rng, x.shape)
        energy = mlp.apply({"params": params}, noisy)[:, 0]
        w = jnp.minimum(1.0, (ctx.step + 1) / 2.0)
        seen["step_dtype"] = ctx.step.dtype
        return w * jnp.mean(jnp.square(energy - jnp.sum(x ** 2, -1))), {"metrics": {"w": w}}

    step = gtrain.jit_train_step(loss_fn, batch_spec=POINTS, donate=False)
    rng = np.random.default_rng(0)
    ws = []
    for _ in range(3):
        state, m = step(state, {"x": rng.normal(size=(32, 2)).astype(np.float32)}, {"sigma": np.float32(0.1)})
        ws.append(float(m["w"]))
    assert int(state.step) == 3 and ws == [0.5, 1.0, 1.0] and seen["step_dtype"] == jnp.int32
    assert state.model_state == {} and state.batch_stats == {}
    with pytest.raises(ValueError, match=r"batch\['x'\] must have rank 2"):
        step(state, {"x": np.zeros((4, 2, 1), np.float32)})
    with pytest.raises(ValueError, match=r"per-example shape \(2,\)"):
        step(state, {"x": np.zeros((4, 3), np.float32)})
    with pytest.raises(ValueError, match=r"'label'\] are not in the batch spec"):
        step(state, {"x": np.zeros((4, 2), np.float32), "label": np.zeros(4, np.int32)})
    with pytest.raises(ValueError, match=r"no entry \['x'\]"):
        step(state, {"image": np.zeros((4, 2), np.float32)})
    with pytest.raises(ValueError, match="floating-point"):
        step(state, {"x": np.zeros((4, 2), np.int32)})


@pytest.mark.parametrize("ret, msg", [
    (lambda e: (e, {}), "float scalar loss"),
    (lambda e: (jnp.mean(e).astype(jnp.int32), {}), "float scalar loss"),
    (lambda e: jnp.mean(e), r"must return \(loss, aux\)"),
    (lambda e: (jnp.mean(e), {"batch_stats": {}}), "optional keys 'model_state' and 'metrics'"),
    (lambda e: (jnp.mean(e), {"model_state": {"batch_stats": {}}}), "structure and shapes"),
    (lambda e: (jnp.mean(e), {"metrics": {"per_example": e}}), "non-scalar metrics"),
])
def test_bad_loss_outputs_raise_before_compiling(ret, msg):
    mlp, state = _toy_state()

    def loss_fn(params, model_state, batch, ctx):
        return ret(mlp.apply({"params": params}, batch["x"])[:, 0])

    step = gtrain.jit_train_step(loss_fn, batch_spec=POINTS, donate=False)
    with pytest.raises(ValueError, match=msg):
        step(state, {"x": np.zeros((4, 2), np.float32)})


def test_pmap_and_sharded_batches_are_checked():
    mlp, state = _toy_state()
    loss_fn = lambda p, s, b, ctx: (jnp.mean(mlp.apply({"params": p}, b["x"])), {})
    devs = jax.devices()[:N_DEV]
    pstep = gtrain.pmap_train_step(loss_fn, devices=devs, batch_spec=POINTS, donate=False)
    with pytest.raises(ValueError, match="leading device axis of size 8"):
        pstep(gtrain.replicate(state, gtrain.data_mesh(devs), device_axis=True), {"x": np.zeros((4, 2, 2), np.float32)})
    sstep = gtrain.sharded_train_step(loss_fn, gtrain.data_mesh(devs), batch_spec=POINTS, donate=False)
    with pytest.raises(ValueError, match="not divisible by the 8 devices"):
        sstep(state, {"x": np.zeros((12, 2), np.float32)})
    with pytest.raises(ValueError, match="either batch_spec or num_classes"):
        gtrain.jit_train_step(loss_fn, batch_spec=POINTS, num_classes=3)
