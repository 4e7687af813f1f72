"""Property: the key a train step hands to the loss (``ctx.rng``) is fresh every step and equals its documented
derivation from the state, ``fold_in(state.rng, state.step)`` (then ``fold_in(., device index)`` under ``pmap``),
for the jit, pmap and sharded steps and across a checkpoint resume of :func:`gradjax.train.fit`.

The loss returns the key's words through integer metrics (integers are never averaged over devices, so under pmap
each device reports its own key). A step that hands the same key every time (identical dropout masks, identical
probes), forgets the step or the device fold-in, or restores a different key after a resume fails here.
"""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from gradjax import train
from gradjax.models import create_model

pytestmark = pytest.mark.usefixtures("fast_compilation")  # checks values, not speed

N_STEPS = 3
NUM_CLASSES = 3


def _key_words(key):
    """The raw uint32 words of a key (typed or legacy)."""
    if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        key = jax.random.key_data(key)
    return jnp.asarray(key)


def _observing_loss(apply_fn):
    """A real loss (mean squared logits) that also reports ctx.rng's words and ctx.step as int32 metrics."""

    def loss_fn(params, model_state, batch, ctx):
        logits = apply_fn({"params": params, **model_state}, batch["image"], train=False)
        noise = jax.random.normal(ctx.rng, logits.shape)  # the loss really uses the key
        loss = jnp.mean(jnp.square(logits + 0.01 * noise))
        words = jax.lax.bitcast_convert_type(_key_words(ctx.rng).reshape(-1), jnp.int32)
        metrics = {f"key{i}": words[i] for i in range(words.shape[0])}
        metrics["ctx_step"] = jnp.asarray(ctx.step, jnp.int32)
        return loss, {"metrics": metrics}

    return loss_fn


def _expected_words(base_rng, step, device=None):
    k = jax.random.fold_in(base_rng, step)
    if device is not None:
        k = jax.random.fold_in(k, device)
    return np.asarray(jax.lax.bitcast_convert_type(_key_words(k).reshape(-1), jnp.int32))


def _observed_words(metrics):
    n = len([k for k in metrics if k.startswith("key")])
    return np.stack([np.asarray(metrics[f"key{i}"]) for i in range(n)], axis=-1)


@pytest.fixture(scope="module")
def setup():
    model = create_model("mlp", NUM_CLASSES, hidden=(4,))
    x = np.zeros((2, 2, 2, 1), np.float32)
    state = train.create_train_state(model, optax.sgd(0.1), x, seed=3)
    rng = np.random.default_rng(0)
    batches = [{"image": rng.normal(size=(8, 2, 2, 1)).astype(np.float32),
                "label": rng.integers(0, NUM_CLASSES, size=(8,)).astype(np.int32)} for _ in range(2 * N_STEPS)]
    step = train.jit_train_step(_observing_loss(model.apply), num_classes=NUM_CLASSES, donate=False)
    return model, state, batches, step  # one compiled jit step shared by the jit and resume tests


def _assert_fresh_and_derived(observed, base_rng, steps, device=None):
    """observed: [n_steps, words]; every step's key is the documented derivation and all keys differ."""
    for i, t in enumerate(steps):
        np.testing.assert_array_equal(observed[i], _expected_words(base_rng, t, device),
                                      err_msg=f"ctx.rng at step {t} (device {device}) is not its derivation")
    assert len({tuple(o) for o in observed}) == len(steps), "ctx.rng repeated between steps"


def test_jit_step_key_is_fold_in_of_state_rng_and_step(setup):
    model, state, batches, step = setup
    base = state.rng
    obs, ctx_steps = [], []
    for t in range(N_STEPS):
        state, m = step(state, batches[t])
        obs.append(_observed_words(m))
        ctx_steps.append(int(m["ctx_step"]))
    assert ctx_steps == list(range(N_STEPS))
    np.testing.assert_array_equal(np.asarray(state.rng), np.asarray(base))  # the base key itself is not consumed
    _assert_fresh_and_derived(np.stack(obs), base, range(N_STEPS))


def test_pmap_step_key_differs_per_device_and_step(setup):
    model, state, batches, _ = setup
    n_dev = min(2, jax.local_device_count())
    devices = jax.local_devices()[:n_dev]
    mesh = train.data_mesh(devices)
    step = train.pmap_train_step(_observing_loss(model.apply), devices=devices, num_classes=NUM_CLASSES,
                                 donate=False)
    base = state.rng
    per_step = []
    for t in range(N_STEPS):
        # the state at step t, freshly replicated (a pmap output has another placement than replicate()'s and
        # would cost a second compile; the step counter's increment is checked here and in the jit test)
        rstate = train.replicate(state.replace(step=jnp.asarray(t, state.step.dtype)), mesh, device_axis=True)
        rstate, m = step(rstate, train.shard(batches[t], mesh, device_axis=True))
        np.testing.assert_array_equal(np.asarray(rstate.step), np.full(n_dev, t + 1))
        np.testing.assert_array_equal(np.asarray(m["ctx_step"]), np.full(n_dev, t))
        per_step.append(_observed_words(m))  # [devices, words]
    per_step = np.stack(per_step)  # [steps, devices, words]
    if n_dev == 1:  # one device: pmap folds in device index 0
        _assert_fresh_and_derived(per_step[:, 0], base, range(N_STEPS), device=0)
        return
    for d in range(n_dev):
        _assert_fresh_and_derived(per_step[:, d], base, range(N_STEPS), device=d)
    flat = {tuple(w) for w in per_step.reshape(-1, per_step.shape[-1])}
    assert len(flat) == N_STEPS * n_dev, "two devices (or steps) drew the same key"


def test_sharded_step_key_is_the_single_device_key(setup):
    model, state, batches, _ = setup
    n_dev = min(2, jax.device_count())
    mesh = train.data_mesh(jax.devices()[:n_dev])
    step = train.sharded_train_step(_observing_loss(model.apply), mesh, num_classes=NUM_CLASSES, donate=False)
    base = state.rng
    st = train.replicate(state, mesh)
    obs = []
    for t in range(N_STEPS):
        st, m = step(st, train.shard(batches[t], mesh))
        assert int(m["ctx_step"]) == t
        obs.append(_observed_words(m))
    _assert_fresh_and_derived(np.stack(obs), base, range(N_STEPS))


def test_resumed_fit_continues_the_key_sequence(setup, tmp_path):
    """fit interrupted after 2 steps and resumed from its checkpoint hands the loss exactly the keys of an
    uninterrupted run: fold_in(rng, t) for t = 0..5, all distinct (the restored state carries rng and step, even
    when the state given to the resumed fit has another key)."""
    model, state, batches, step = setup
    spe = len(batches)

    def epoch_batches(epoch, start):
        return iter(batches[start:])

    kw = dict(num_epochs=1, steps_per_epoch=spe, log_every=1, progress=False)

    def keys_of(records):
        recs = [r for r in records if "key0" in r]
        n = len([k for k in recs[0] if k.startswith("key")])
        return ([int(r["step"]) for r in recs],
                np.array([[int(round(r[f"key{i}"])) for i in range(n)] for r in recs], np.int64))

    _, full = train.fit(state, step, epoch_batches, **kw)
    steps_full, keys_full = keys_of(full)
    ckpt = str(tmp_path / "ckpt")
    _, part = train.fit(state, step, epoch_batches, checkpoint_dir=ckpt, max_steps=2, **kw)
    # the resumed run is given a state with another base key: the checkpoint's key (and step) must win
    other = state.replace(rng=jax.random.fold_in(state.rng, 12345))
    _, rest = train.fit(other, step, epoch_batches, checkpoint_dir=ckpt, **kw)
    steps_a, keys_a = keys_of(part)
    steps_b, keys_b = keys_of(rest)
    assert steps_full == list(range(1, spe + 1)) and steps_a + steps_b == steps_full
    resumed = np.concatenate([keys_a, keys_b])
    np.testing.assert_array_equal(resumed, keys_full)
    _assert_fresh_and_derived(keys_full.astype(np.int32), state.rng, range(spe))
