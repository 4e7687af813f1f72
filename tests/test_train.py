"""Training engine: pmap and sharded steps == single-device step, jit == no jit, resume == uninterrupted, divergence
guard, placement (one replicate / shard / mesh), one evaluate (host and global batches), per-example cross-entropy."""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from gradjax import data as gdata
from gradjax import train as gtrain
from gradjax.losses.classification import cross_entropy
from gradjax.models import create_model

N_DEV = 8


_CACHE = {}


def _setup(axis_name=None, width=0.125):
    """Model and initial state, built once per configuration (states are immutable; steps below don't donate),
    so that compiled functions are reused across tests: compilation dominates this file's time."""
    key = (axis_name, width)
    if key not in _CACHE:
        model = create_model("vgg4", 10, width=width, axis_name=axis_name)
        tx = optax.sgd(0.1, momentum=0.9)
        x = jax.random.normal(jax.random.PRNGKey(0), (2, 16, 16, 1))
        _CACHE[key] = (model, gtrain.create_train_state(model, tx, x, seed=0))
    return _CACHE[key]


def _step():
    if "step" not in _CACHE:
        model, _ = _setup()
        _CACHE["step"] = gtrain.jit_train_step(gtrain.classification_loss(model.apply), num_classes=10, donate=False)
    return _CACHE["step"]


def _eval_step():
    if "eval" not in _CACHE:
        _CACHE["eval"] = gtrain.make_eval_step(_setup()[0].apply)
    return _CACHE["eval"]


def _noisy_step():
    """A step whose loss uses ctx.rng (input noise), so that resuming must restore the RNG."""
    if "noisy" not in _CACHE:
        model, _ = _setup()
        ce = gtrain.classification_loss(model.apply)

        def noisy_loss(params, model_state, batch, ctx):
            noise = 0.5 * jax.random.normal(ctx.rng, batch["image"].shape)
            return ce(params, model_state, dict(batch, image=batch["image"] + noise), ctx)

        _CACHE["noisy"] = gtrain.jit_train_step(noisy_loss, num_classes=10, donate=False)
    return _CACHE["noisy"]


def _batches(n_steps, bs=16):
    rng = np.random.default_rng(0)
    return [{"image": rng.normal(size=(bs, 16, 16, 1)).astype(np.float32) * 2 + 0.5,
             "label": rng.integers(0, 10, size=(bs,)).astype(np.int32)} for _ in range(n_steps)]


@pytest.fixture(scope="module")
def reference():
    assert jax.device_count() >= N_DEV, "conftest should give 8 fake CPU devices"
    model, state = _setup()
    step = _step()
    for b in _batches(3):
        state, _ = step(state, b)
    return state


def test_pmap_step_equals_single_device(reference):
    model, state = _setup(axis_name="batch")
    mesh = gtrain.data_mesh(jax.devices()[:N_DEV])
    step = gtrain.pmap_train_step(gtrain.classification_loss(model.apply), axis_name="batch", num_classes=10,
                                  devices=jax.devices()[:N_DEV], donate=False)
    state = gtrain.replicate(state, mesh, device_axis=True)
    for b in _batches(3):
        state, metrics = step(state, gtrain.shard(b, mesh, device_axis=True))
    out = gtrain.unreplicate(state)
    assert int(out.step) == 3
    chex.assert_trees_all_close(out.params, reference.params, atol=2e-5, rtol=2e-4)
    chex.assert_trees_all_close(out.batch_stats, reference.batch_stats, atol=2e-5, rtol=2e-4)
    # BN statistics must really have moved away from their init for this test to mean something
    assert not np.allclose(out.batch_stats["block0"]["bn"]["mean"], 0.0)


def test_sharded_step_equals_single_device(reference):
    model, state = _setup()
    mesh = gtrain.data_mesh(jax.devices()[:N_DEV])
    step = gtrain.sharded_train_step(gtrain.classification_loss(model.apply), mesh, num_classes=10, donate=False)
    state = gtrain.replicate(state, mesh)
    for b in _batches(3):
        state, _ = step(state, gtrain.shard(b, mesh))
    assert int(state.step) == 3
    chex.assert_trees_all_close(state.params, reference.params, atol=2e-5, rtol=2e-4)
    chex.assert_trees_all_close(state.batch_stats, reference.batch_stats, atol=2e-5, rtol=2e-4)


def test_single_device_pmap_and_mesh_also_work():
    """Colab's TPU runtime is one chip: both data-parallel forms must run on a single device and give the very
    update of the single-device step."""
    batch = _batches(1)[0]
    model, state = _setup()
    want, want_m = _step()(state, batch)
    assert not np.allclose(want.params["head"]["kernel"], state.params["head"]["kernel"])  # a real update
    model, pstate = _setup(axis_name="batch")
    one = gtrain.data_mesh(jax.devices()[:1])
    step = gtrain.pmap_train_step(gtrain.classification_loss(model.apply), devices=jax.devices()[:1], donate=False)
    st, m = step(gtrain.replicate(pstate, one, device_axis=True), gtrain.shard(batch, one, device_axis=True))
    st, m = gtrain.unreplicate((st, m))
    chex.assert_trees_all_close(st.params, want.params, atol=1e-6, rtol=1e-5)
    chex.assert_trees_all_close(st.batch_stats, want.batch_stats, atol=1e-6, rtol=1e-5)
    np.testing.assert_allclose(m["loss"], want_m["loss"], rtol=1e-5)
    model, state = _setup()
    st, m = gtrain.sharded_train_step(gtrain.classification_loss(model.apply), one, donate=False)(state, batch)
    chex.assert_trees_all_close(st.params, want.params, atol=1e-6, rtol=1e-5)
    np.testing.assert_allclose(m["accuracy"], want_m["accuracy"])


class TestMakeTrainStepVariants(chex.TestCase):
    """The un-jitted step of make_train_step and its jitted form make the same update (a tiny MLP, two steps)."""

    @chex.variants(with_jit=True, without_jit=True)
    def test_jit_and_no_jit_steps_agree(self):
        mlp = create_model("mlp", 3, hidden=(8,))
        state = gtrain.create_train_state(mlp, optax.adam(1e-2), jnp.zeros((2, 4)), seed=0)

        def loss_fn(params, model_state, batch, ctx):
            noisy = batch["x"] + 0.1 * jax.random.normal(ctx.rng, batch["x"].shape)  # uses ctx.rng and ctx.step
            ce = jnp.mean(cross_entropy(mlp.apply({"params": params}, noisy), batch["label"]))
            return ce * (1.0 + ctx.step), {"metrics": {"ce": ce}}

        step = self.variant(gtrain.make_train_step(loss_fn))
        x = np.linspace(-1, 1, 24, dtype=np.float32).reshape(6, 4)
        batch = {"x": x, "label": np.array([0, 1, 2, 0, 1, 2], np.int32)}
        s1, m1 = step(state, batch)
        s2, m2 = step(s1, batch)
        # reference by hand: adam updates of grad(loss) with the step's key fold_in(rng, step)
        ref, params, opt = [], state.params, state.opt_state
        for t in range(2):
            key = jax.random.fold_in(state.rng, t)
            g = jax.grad(lambda p: loss_fn(p, {}, batch, gtrain.StepContext(key, jnp.int32(t), None))[0])(params)
            upd, opt = state.tx.update(g, opt, params)
            params = optax.apply_updates(params, upd)
            ref.append(params)
        chex.assert_trees_all_close(s1.params, ref[0], atol=1e-6)
        chex.assert_trees_all_close(s2.params, ref[1], atol=1e-6)
        assert int(s2.step) == 2 and bool(m2["finite"]) and float(m2["loss"]) == pytest.approx(2 * float(m2["ce"]))


def _digits_subset():
    tr = gdata.load_digits("train", size=16)
    return tr.subset(np.arange(96))


def _run_fit(state, model, ds, ckpt_dir=None, max_steps=None, num_epochs=2, step=None):
    step = step or _step()
    return gtrain.fit(state, step, lambda e, s: gdata.batches(ds, 32, seed=5, epoch=e, start=s),
                      num_epochs=num_epochs, steps_per_epoch=3, checkpoint_dir=ckpt_dir, checkpoint_every=1,
                      max_steps=max_steps, progress=False, log_every=2)


def test_resume_mid_run_gives_same_final_parameters(tmp_path):
    """The loss draws noise from ctx.rng, and the run resumes into a state built from *another* seed (other
    parameters and RNG): only a checkpoint that restores everything, the RNG included, continues the same run."""
    ds = _digits_subset()
    step = _noisy_step()
    model, state = _setup()
    full, _ = _run_fit(state, model, ds, step=step)
    ckpt = str(tmp_path / "ckpt")
    part, _ = _run_fit(state, model, ds, ckpt_dir=ckpt, max_steps=4, step=step)  # "interrupted" mid-epoch 1
    assert int(part.step) == 4
    fresh = gtrain.create_train_state(model, state.tx, jnp.zeros((2, 16, 16, 1)), seed=1)
    assert not np.array_equal(jax.random.key_data(fresh.rng), jax.random.key_data(state.rng))
    resumed, _ = _run_fit(fresh, model, ds, ckpt_dir=ckpt, step=step)
    assert int(resumed.step) == int(full.step) == 6
    np.testing.assert_array_equal(jax.random.key_data(resumed.rng), jax.random.key_data(full.rng))
    for field in ("params", "model_state", "opt_state"):
        chex.assert_trees_all_close(getattr(resumed, field), getattr(full, field), atol=1e-6, rtol=1e-6)


def test_resume_of_a_sharded_run_reuses_the_compiled_step(tmp_path):
    """A resumed run puts the restored state where the given state lived (replicated over the mesh), so the
    already built sharded step is called with the same input placement: the loss function is traced once for the
    interrupted run and the resumed run together."""
    ds = _digits_subset()
    model, state = _setup()
    mesh = gtrain.data_mesh(jax.devices()[:2])
    ce = gtrain.classification_loss(model.apply)
    traces = []

    def counted(params, model_state, batch, ctx):
        traces.append(1)  # a Python side effect: runs only while jit traces the step
        return ce(params, model_state, batch, ctx)

    step = gtrain.sharded_train_step(counted, mesh, num_classes=10, donate=False)
    placed = gtrain.replicate(state, mesh)
    ckpt = str(tmp_path / "ckpt")
    part, _ = _run_fit(placed, model, ds, ckpt_dir=ckpt, max_steps=2, step=step)
    assert int(part.step) == 2 and len(traces) == 1
    resumed, _ = _run_fit(placed, model, ds, ckpt_dir=ckpt, num_epochs=1, step=step)
    assert int(resumed.step) == 3 and len(traces) == 1
    for got, given in zip(jax.tree.leaves(resumed), jax.tree.leaves(placed)):
        assert got.sharding.is_equivalent_to(given.sharding, got.ndim)
    # and it continued the run: the same as 3 uninterrupted steps
    full, _ = _run_fit(placed, model, ds, num_epochs=1, step=step)
    chex.assert_trees_all_close(resumed.params, full.params, atol=1e-6, rtol=1e-6)


def test_nonfinite_step_changes_nothing_and_is_sticky():
    """The divergence guard keeps parameters, model state *and* optimizer state (the momentum of a NaN step would be
    NaN) and the step counter; after it, even good batches change nothing."""
    model, state = _setup()
    raw = _step().compiled  # the jitted step without host validation (the NaN batch must reach the guard)
    good = _batches(3)
    s1, _ = raw(state, good[0], None)
    s2, m = raw(s1, dict(good[1], image=np.full_like(good[1]["image"], np.nan)), None)
    assert not bool(m["finite"]) and bool(s2.diverged) and not bool(s1.diverged)
    s3, m3 = raw(s2, good[2], None)
    assert not bool(m3["finite"]) and bool(s3.diverged)
    for s in (s2, s3):
        assert int(s.step) == 1
        for field in ("params", "model_state", "opt_state", "rng"):
            chex.assert_trees_all_equal(getattr(s, field), getattr(s1, field))
    assert jax.tree.leaves(s1.opt_state)  # sgd with momentum: there is a trace to protect


def test_divergence_guard_stops_and_keeps_last_good_checkpoint(tmp_path):
    model, state = _setup()
    good = _batches(4)
    bad = dict(good[2], image=np.full_like(good[2]["image"], np.nan))
    stream = [good[0], good[1], bad, good[3]]
    step = _step()
    ckpt = str(tmp_path / "ckpt")
    with pytest.raises(gtrain.TrainingDivergedError, match="non-finite"):
        gtrain.fit(state, step, lambda e, s: iter(stream[s:]), num_epochs=1, steps_per_epoch=4,
                   checkpoint_dir=ckpt, log_every=4, progress=False)
    # reference: the two good steps only
    ref = state
    for b in good[:2]:
        ref, _ = step(ref, b)
    mgr = gtrain.Checkpointer(ckpt)
    assert mgr.latest_step() == 2
    restored = mgr.restore(state)
    mgr.close()
    assert int(restored.step) == 2 and bool(restored.diverged)
    for field in ("params", "model_state", "opt_state"):
        chex.assert_trees_all_close(getattr(restored, field), getattr(ref, field), atol=1e-7, rtol=1e-7)
        chex.assert_tree_all_finite(getattr(restored, field))


def _eval_by_hand(state, images, labels):
    logits = np.asarray(state.apply_fn(state.variables, images, train=False))
    logp = logits - logits.max(-1, keepdims=True)
    logp = logp - np.log(np.exp(logp).sum(-1, keepdims=True))
    return float(np.mean(logits.argmax(-1) == labels)), float(-np.mean(logp[np.arange(len(labels)), labels]))


def test_metrics_jsonl_and_eval(tmp_path):
    ds = _digits_subset()
    model, state = _setup()
    step = _step()
    log = tmp_path / "m.jsonl"
    state, records = gtrain.fit(state, step, lambda e, s: gdata.batches(ds, 32, epoch=e, start=s), num_epochs=1,
                                steps_per_epoch=3, log_path=str(log), log_every=1, progress=False,
                                eval_fn=lambda s: gtrain.evaluate(
                                    s, gdata.batches(ds, 50, shuffle=False, drop_remainder=False), _eval_step()))
    lines = log.read_text().strip().splitlines()
    assert len(lines) == len(records) == 4  # 3 train records + 1 eval
    assert [r["step"] for r in records[:3]] == [1, 2, 3] and all(np.isfinite(r["loss"]) for r in records[:3])
    acc, ce = _eval_by_hand(state, ds.images, ds.labels)
    assert records[-1]["eval_count"] == 96
    assert records[-1]["eval_accuracy"] == pytest.approx(acc, abs=1e-9)
    assert records[-1]["eval_cross_entropy"] == pytest.approx(ce, rel=1e-5)


def test_one_evaluate_for_host_padded_and_global_batches(reference):
    """Uneven host batches, a padded batch with a zero mask, and global batches split over a mesh
    (gradjax.distributed.global_batches, padded last batch) give the same accuracy and cross-entropy as by hand."""
    from gradjax import distributed as gdist

    ds = _digits_subset().subset(np.arange(36))
    acc, ce = _eval_by_hand(reference, ds.images, ds.labels)
    ev = _eval_step()
    host = gtrain.evaluate(reference, gdata.batches(ds, 16, shuffle=False, drop_remainder=False), ev)
    pad = {"image": np.concatenate([ds.images, ds.images[:4]]), "label": np.concatenate([ds.labels, ds.labels[:4]]),
           "mask": np.r_[np.ones(36), np.zeros(4)].astype(np.float32)}
    padded = gtrain.evaluate(reference, [pad], ev)
    mesh = gtrain.data_mesh(jax.devices()[:4])
    glob = gtrain.evaluate(gtrain.replicate(reference, mesh),
                           gdist.global_batches(ds, 16, mesh, shuffle=False, drop_remainder=False), ev)
    for got in (host, padded, glob):
        assert got["count"] == 36
        assert got["accuracy"] == pytest.approx(acc, abs=1e-9)
        assert got["cross_entropy"] == pytest.approx(ce, rel=1e-5)
    assert 0 < acc < 1  # the masked padding (a copy of real examples) would change the mean if it counted
    with pytest.raises(ValueError, match="no examples"):
        gtrain.evaluate(reference, [], ev)


def test_placement_replicate_and_shard():
    """One replicate and one shard: values and shardings for the sharded step and the pmap layout."""
    mesh = gtrain.data_mesh(jax.devices()[:4])
    assert mesh.axis_names == ("data",) and mesh.shape["data"] == 4
    tree = {"w": np.arange(6, dtype=np.float32).reshape(2, 3), "s": np.float32(2.5)}
    rep = gtrain.replicate(tree, mesh)
    assert all(x.sharding.is_fully_replicated and len(x.sharding.device_set) == 4 for x in jax.tree.leaves(rep))
    chex.assert_trees_all_equal(jax.device_get(rep), tree)
    stacked = gtrain.replicate(tree, mesh, device_axis=True)
    assert stacked["w"].shape == (4, 2, 3) and stacked["w"].sharding.spec == P("data")
    chex.assert_trees_all_equal(jax.device_get(gtrain.unreplicate(stacked)), tree)
    np.testing.assert_array_equal(np.asarray(stacked["w"][3]), tree["w"])
    batch = {"x": np.arange(16, dtype=np.float32).reshape(8, 2), "y": np.arange(8, dtype=np.int32)}
    split = gtrain.shard(batch, mesh)
    assert split["x"].sharding.spec == P("data")
    assert [s.data.shape for s in split["x"].addressable_shards] == [(2, 2)] * 4
    chex.assert_trees_all_equal(jax.device_get(split), batch)
    dev = gtrain.shard(batch, mesh, device_axis=True)
    chex.assert_trees_all_equal(jax.device_get(dev), {k: v.reshape((4, 2) + v.shape[1:]) for k, v in batch.items()})
    with pytest.raises(ValueError, match="global batch size 10 is not divisible by the 4 devices"):
        gtrain.shard({"x": np.zeros((10, 2), np.float32)}, mesh)
    with pytest.raises(ValueError, match="not divisible"):
        gtrain.shard({"image": np.zeros((10, 2, 2, 1), np.float32)}, gtrain.data_mesh(jax.devices()[:8]),
                     device_axis=True)


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_cross_entropy_per_example_values(smoothing):
    """losses.classification.cross_entropy: -sum_i y_i log softmax(f)_i per example, y one-hot smoothed to
    (1 - a) onehot + a / K; classification_loss reports its batch mean."""
    logits = jnp.array([[2.0, 0.5, -1.0], [0.0, 0.0, 0.0], [-3.0, 4.0, 1.0]])
    labels = jnp.array([0, 2, 1])
    logp = np.asarray(jax.nn.log_softmax(logits))
    y = np.eye(3)[np.asarray(labels)] * (1 - smoothing) + smoothing / 3
    want = -(y * logp).sum(-1)
    got = cross_entropy(logits, labels, label_smoothing=smoothing)
    assert got.shape == (3,)
    np.testing.assert_allclose(got, want, rtol=1e-6)
    np.testing.assert_allclose(got[1], np.log(3.0), rtol=1e-6)  # uniform logits: log K whatever the smoothing
    with pytest.raises(ValueError, match="label_smoothing"):
        cross_entropy(logits, labels, label_smoothing=1.0)
    with pytest.raises(ValueError, match="logits"):
        cross_entropy(logits[0], labels)


@pytest.mark.parametrize("batch, msg", [
    ({"image": np.zeros((4, 16, 16), np.float32), "label": np.zeros(4, np.int32)}, "rank 4"),
    ({"image": np.zeros((4, 16, 16, 1), np.uint8), "label": np.zeros(4, np.int32)}, "floating-point"),
    ({"image": np.zeros((4, 16, 16, 1), np.float32), "label": np.array([0, 1, 2, 10], np.int32)}, r"\[0, 10\)"),
    ({"image": np.zeros((4, 16, 16, 1), np.float32), "label": np.zeros(4, np.float32)}, "integer"),
    ({"image": np.zeros((4, 16, 16, 1), np.float32), "label": np.zeros(3, np.int32)}, "same batch size"),
    ({"image": np.full((4, 16, 16, 1), np.nan, np.float32), "label": np.zeros(4, np.int32)}, "non-finite"),
])
def test_bad_batches_raise_clear_errors(batch, msg):
    model, state = _setup()
    # a fresh step: validation runs (and fails) on the host before anything is compiled
    step = gtrain.jit_train_step(gtrain.classification_loss(model.apply), num_classes=10, donate=False)
    with pytest.raises(ValueError, match=msg):
        step(state, batch)
