"""gradjax._chunking: exactly n evaluations (no padding), chunk-independent sums, the memory-budget chunk size."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gradjax import _chunking as C


def _fn(xc):  # a pytree output with one row per item
    return {"a": jnp.sin(xc)[:, None] * jnp.arange(3.0), "b": xc ** 2}


@pytest.mark.parametrize("n,chunk", [(1, 1), (7, 3), (8, 4), (8, 8), (50, 8), (5, 100)])
def test_sum_matches_direct_eager_and_jit_and_counts_exact_items(n, chunk):
    xs = np.linspace(-1.0, 2.0, n).astype(np.float32)
    w = np.linspace(0.5, 1.5, n).astype(np.float32)
    ref = jax.tree.map(lambda o: np.tensordot(w, np.asarray(o), axes=1), _fn(jnp.asarray(xs)))
    seen = []

    def counting(xc):
        seen.append(int(xc.shape[0]))
        return _fn(xc)

    eager = C.chunked_sum(counting, xs, w, chunk=chunk)
    assert sum(seen) == n  # eager: the chunks seen cover exactly n items, the last one not padded
    jitted = jax.jit(lambda a, b: C.chunked_sum(_fn, a, b, chunk=chunk))(xs, w)
    for got in (eager, jitted):
        for k in ref:
            np.testing.assert_allclose(np.asarray(got[k]), ref[k], rtol=1e-5, atol=1e-6)


def _scan_lengths(jaxpr):
    return [e.params["length"] for e in jaxpr.eqns if e.primitive.name == "scan"]


def test_staged_plan_is_one_scan_of_full_chunks_plus_one_remainder_call():
    """Under jit: 50 items in chunks of 8 = one scan of 6 chunks + one call on the last 2 items (50 evaluations,
    not 56); one full chunk = no loop."""
    xs = np.arange(50, dtype=np.float32)
    calls = []

    def f(xc):
        calls.append(int(xc.shape[0]))
        return xc * 2.0

    jaxpr = jax.make_jaxpr(lambda a: C.chunked_sum(f, a, chunk=8))(xs).jaxpr
    assert _scan_lengths(jaxpr) == [6]
    assert calls[-1] == 2 and set(calls) == {8, 2}
    assert C.chunk_plan(50, 8) == (8, 6, 2)
    assert _scan_lengths(jax.make_jaxpr(lambda a: C.chunked_sum(f, a, chunk=50))(xs).jaxpr) == []
    assert _scan_lengths(jax.make_jaxpr(lambda a: C.chunked_sum(f, a, chunk=25))(xs).jaxpr) == [2]


def test_item_bytes_counts_intermediates_and_auto_chunk_follows_the_budget():
    xs = np.zeros((12, 1000), np.float32)
    f = lambda xc: jnp.sin(xc) * 2.0  # noqa: E731  two [1, 1000] float32 intermediates per item
    assert C.item_bytes(f, xs) == 2 * 4000
    assert C.auto_chunk(f, xs, 12, memory_budget=10**9) == 12  # everything fits: one chunk
    assert C.auto_chunk(f, xs, 12, memory_budget=1) == 1
    # 5 items fit -> 3 chunks needed -> evened out to 4 items per chunk (4+4+4, not 5+5+2)
    assert C.auto_chunk(f, xs, 12, memory_budget=5 * 8000) == 4
    got = C.chunked_sum(f, xs + 1.0, chunk=None, memory_budget=5 * 8000)
    np.testing.assert_allclose(np.asarray(got), np.asarray(f(xs + 1.0).sum(0)), rtol=1e-6)


def test_item_bytes_sees_nested_jaxprs():
    inner = jax.jit(lambda a: jnp.cos(a) + 1.0)
    assert C.item_bytes(lambda xc: inner(xc), np.zeros((3, 100), np.float32)) >= 2 * 400


@pytest.mark.parametrize("bad", [0, -5, 1.5, True, "1GB"])
def test_bad_memory_budget_is_a_clear_error(bad):
    with pytest.raises(ValueError, match="memory_budget must be a positive int"):
        C.chunked_sum(lambda xc: xc, np.zeros(4, np.float32), chunk=None, memory_budget=bad)


def test_unrolled_loop_same_sum_no_scan_and_bad_loop_is_an_error():
    xs = np.arange(10, dtype=np.float32)
    f = lambda xc: jnp.sin(xc)  # noqa: E731
    jaxpr = jax.make_jaxpr(lambda a: C.chunked_sum(f, a, chunk=3, loop="unroll"))(xs).jaxpr
    assert _scan_lengths(jaxpr) == []
    got = jax.jit(lambda a: C.chunked_sum(f, a, chunk=3, loop="unroll"))(xs)
    np.testing.assert_allclose(float(got), float(np.sin(xs).sum()), rtol=1e-5)
    with pytest.raises(ValueError, match="loop must be one of"):
        C.chunked_sum(f, xs, chunk=3, loop="while")


def _has_remat(jaxpr) -> bool:
    for e in jaxpr.eqns:
        if e.primitive.name in ("remat2", "checkpoint"):
            return True
        for p in e.params.values():
            for sub in (p if isinstance(p, (tuple, list)) else (p,)):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns") and _has_remat(inner):
                    return True
    return False


def test_checkpointed_apply_keeps_the_maps_and_is_a_real_remat():
    """CheckpointedApply (jax.checkpoint around a model's apply) gives the same batched IG chunk and gradient as
    the plain model, is hashable (a static handle field under jit), really stages a remat, and rejects an unknown
    policy."""
    from gradjax import saliency
    from gradjax.model import ModelHandle
    from gradjax.models import create_model

    model = create_model("vgg4", 3, width=0.125, activation="softplus")
    x = jax.random.uniform(jax.random.PRNGKey(0), (2, 8, 8, 1))
    variables = model.init(jax.random.PRNGKey(1), x, train=False)
    ig = jax.jit(lambda h, xb: saliency.integrated_gradients(h, xb, 0, steps=4, chunk=4, reduce=None))
    ref = np.asarray(ig(ModelHandle(model.apply, variables), x))
    assert np.abs(ref).max() > 0
    for policy in ("dots", "nothing"):
        wrapped = C.CheckpointedApply(model.apply, policy)
        assert hash(wrapped) == hash(C.CheckpointedApply(model.apply, policy))
        got = np.asarray(ig(ModelHandle(wrapped, variables), x))
        np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6 * np.abs(ref).max())
    grad = lambda f: jax.make_jaxpr(jax.grad(lambda z: f(variables, z).sum()))(x).jaxpr  # noqa: E731
    assert _has_remat(grad(C.CheckpointedApply(model.apply, "dots"))) and not _has_remat(grad(model.apply))
    with pytest.raises(ValueError, match="policy must be one of"):
        C.CheckpointedApply(model.apply, "dots_saveable")
