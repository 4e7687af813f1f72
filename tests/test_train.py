"""Training engine: pmap and sharded steps == single-device step, resume == uninterrupted, divergence guard."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from gradjax import data as gdata
from gradjax import train as gtrain
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


def _assert_trees_close(a, b, atol=2e-5, rtol=2e-4):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=atol, rtol=rtol)


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
    step = gtrain.pmap_train_step(gtrain.classification_loss(model.apply), axis_name="batch", num_classes=10,
                                  devices=jax.devices()[:N_DEV], donate=False)
    state = gtrain.replicate(state, jax.devices()[:N_DEV])
    for b in _batches(3):
        state, metrics = step(state, gtrain.shard_batch(b, N_DEV))
    out = gtrain.unreplicate(state)
    assert int(out.step) == 3
    _assert_trees_close(out.params, reference.params)
    _assert_trees_close(out.batch_stats, reference.batch_stats)
    # BN statistics must really have moved away from their init for this test to mean something
    assert not np.allclose(out.batch_stats["block0"]["bn"]["mean"], 0.0)


def test_sharded_step_equals_single_device(reference):
    model, state = _setup()
    mesh = gtrain.data_mesh(jax.devices()[:N_DEV])
    step = gtrain.sharded_train_step(gtrain.classification_loss(model.apply), mesh, num_classes=10, donate=False)
    state = gtrain.put_replicated(state, mesh)
    for b in _batches(3):
        state, _ = step(state, gtrain.put_sharded(b, mesh))
    assert int(state.step) == 3
    _assert_trees_close(state.params, reference.params)
    _assert_trees_close(state.batch_stats, reference.batch_stats)


def test_single_device_pmap_and_mesh_also_work():
    """Colab's TPU runtime is one chip: both data-parallel forms must run on a single device."""
    model, state = _setup(axis_name="batch")
    step = gtrain.pmap_train_step(gtrain.classification_loss(model.apply), devices=jax.devices()[:1], donate=False)
    st = gtrain.replicate(state, jax.devices()[:1])
    st, m = step(st, gtrain.shard_batch(_batches(1)[0], 1))
    assert int(gtrain.unreplicate(st).step) == 1
    model, state = _setup()
    mesh = gtrain.data_mesh(jax.devices()[:1])
    st, m = gtrain.sharded_train_step(gtrain.classification_loss(model.apply), mesh, donate=False)(state, _batches(1)[0])
    assert int(st.step) == 1


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
    _assert_trees_close(resumed.params, full.params, atol=1e-6, rtol=1e-6)
    _assert_trees_close(resumed.batch_stats, full.batch_stats, atol=1e-6, rtol=1e-6)
    _assert_trees_close(resumed.opt_state, full.opt_state, atol=1e-6, rtol=1e-6)


def test_resume_of_a_sharded_run_reuses_the_compiled_step(tmp_path):
    """A resumed run puts the restored state where the given state lived (replicated over the mesh), so the already
    compiled sharded step is called with the same input placement and does not compile again."""
    ds = _digits_subset()
    model, state = _setup()
    mesh = gtrain.data_mesh(jax.devices()[:2])
    step = gtrain.sharded_train_step(gtrain.classification_loss(model.apply), mesh, num_classes=10, donate=False)
    placed = gtrain.put_replicated(state, mesh)
    ckpt = str(tmp_path / "ckpt")
    part, _ = _run_fit(placed, model, ds, ckpt_dir=ckpt, max_steps=2, step=step)
    assert int(part.step) == 2 and step.compiled._cache_size() == 1
    resumed, _ = _run_fit(placed, model, ds, ckpt_dir=ckpt, num_epochs=1, step=step)
    assert int(resumed.step) == 3
    assert step.compiled._cache_size() == 1


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
            _assert_trees_close(getattr(s, field), getattr(s1, field), atol=0, rtol=0)
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
        _assert_trees_close(getattr(restored, field), getattr(ref, field), atol=1e-7, rtol=1e-7)
        assert all(np.all(np.isfinite(np.asarray(p))) for p in jax.tree.leaves(getattr(restored, field)))


def test_metrics_jsonl_and_eval(tmp_path):
    ds = _digits_subset()
    model, state = _setup()
    step = _step()
    log = tmp_path / "m.jsonl"
    state, records = gtrain.fit(state, step, lambda e, s: gdata.batches(ds, 32, epoch=e, start=s), num_epochs=1,
                                steps_per_epoch=3, log_path=str(log), log_every=1, progress=False,
                                eval_fn=lambda s: gtrain.evaluate(s, gdata.batches(ds, 50, shuffle=False, drop_remainder=False)))
    lines = log.read_text().strip().splitlines()
    assert len(lines) == len(records) == 4  # 3 train records + 1 eval
    assert "eval_accuracy" in records[-1] and records[-1]["eval_count"] == 96


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


def test_shard_batch_indivisible():
    with pytest.raises(ValueError, match="not divisible"):
        gtrain.shard_batch({"image": np.zeros((10, 2, 2, 1), np.float32)}, 8)
