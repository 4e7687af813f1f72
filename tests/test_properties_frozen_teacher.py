"""Property: a frozen teacher stays frozen. Every matching loss that takes the teacher as a callable
(``teacher_fn`` / ``teacher_features``) is differentiated w.r.t. the parameters the teacher closes over: the
gradient must be exactly zero (the docstrings: "the teacher's values are wrapped in stop_gradient"), while the
student's gradient is not (so the check is not vacuous).

The functions are enumerated from the modules of :mod:`gradjax.losses` by signature, so a new matching loss
without an entry in ``CALLS`` fails :func:`test_every_teacher_taking_loss_is_covered`. The training-loss terms
(teacher variables in ``ctx.frozen["teacher"]``) are covered in ``test_properties_loss_terms.py``.
"""
import importlib
import inspect
import pkgutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gradjax.losses
from gradjax.losses import attention as LA
from gradjax.losses import distillation as LD

pytestmark = pytest.mark.usefixtures("fast_compilation")

B, H, W, C, K = 4, 4, 4, 3, 3
TEACHER_ARGS = ("teacher_fn", "teacher_features")


def _params(seed):
    rng = np.random.default_rng(seed)
    return {"w1": jnp.asarray(rng.normal(size=(C, 6)) / 2, jnp.float32),
            "w2": jnp.asarray(rng.normal(size=(H * W * 6, K)) / 4, jnp.float32)}


def _features(p, x):  # a 1x1 convolution + tanh: [B, H, W, C] -> [B, H, W, 6]
    return jnp.tanh(jnp.einsum("bhwc,cd->bhwd", x, p["w1"]))


def _logits(p, x):
    return _features(p, x).reshape(x.shape[0], -1) @ p["w2"]


CALLS = {  # name -> [(label, fn(student_fn, teacher_fn, student_feat, teacher_feat, x, labels, key) -> [B])]
    "jacobian_matching": [
        (f"output={o}", lambda s, t, sf, tf, x, y, k, o=o: LD.jacobian_matching(s, t, x, output=o, labels=y))
        for o in ("target", "top", "full")],
    "normalized_jacobian_matching": [
        (f"output={o}", lambda s, t, sf, tf, x, y, k, o=o: LD.normalized_jacobian_matching(s, t, x, output=o,
                                                                                             labels=y))
        for o in ("target", "top")],
    "jacobian_matching_cross_entropy": [
        (f"output={o}", lambda s, t, sf, tf, x, y, k, o=o: LD.jacobian_matching_cross_entropy(
            s, t, x, sigma=0.5, temperature=2.0, output=o, labels=y)) for o in ("full", "target")],
    "stochastic_jacobian_matching": [
        (f"probe_space={ps}", lambda s, t, sf, tf, x, y, k, ps=ps: LD.stochastic_jacobian_matching(
            s, t, x, k, num_probes=2, probe_space=ps)) for ps in ("input", "output")],
    "noisy_activation_matching": [
        (f"antithetic={a}", lambda s, t, sf, tf, x, y, k, a=a: LD.noisy_activation_matching(
            s, t, x, k, sigma=0.3, num_samples=2, antithetic=a)) for a in (True, False)],
    "attention_jacobian_matching": [
        ("", lambda s, t, sf, tf, x, y, k: LA.attention_jacobian_matching(sf, tf, x, divisor=2))],
}

CASES = [(name, label, fn) for name, entries in CALLS.items() for label, fn in entries]


def _teacher_taking_functions():
    found = set()
    for info in pkgutil.iter_modules(gradjax.losses.__path__):
        mod = importlib.import_module(f"gradjax.losses.{info.name}")
        for name in getattr(mod, "__all__", []):
            fn = getattr(mod, name, None)
            if not inspect.isfunction(fn):
                continue
            if any(p in inspect.signature(fn).parameters for p in TEACHER_ARGS):
                found.add(name)
    return found


def test_every_teacher_taking_loss_is_covered():
    found = _teacher_taking_functions()
    assert {"jacobian_matching", "attention_jacobian_matching"} <= found  # the enumeration works
    missing = found - set(CALLS)
    assert not missing, f"matching losses without a frozen-teacher check: {sorted(missing)} (add them to CALLS)"


@pytest.fixture(scope="module")
def setup():
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(B, H, W, C)), jnp.float32)
    y = jnp.asarray(rng.integers(0, K, size=(B,)), jnp.int32)
    return _params(1), _params(2), x, y, jax.random.PRNGKey(3)


@pytest.fixture(scope="module")
def gradients(setup):
    """(student grad, teacher grad) of every case, from one compiled function."""
    sp, tp, x, y, key = setup

    def all_grads(sp, tp):
        out = []
        for _, _, fn in CASES:
            def loss(sp, tp, fn=fn):
                s = lambda z: _logits(sp, z)  # noqa: E731
                t = lambda z: _logits(tp, z)  # noqa: E731
                sf = lambda z: _features(sp, z)  # noqa: E731
                tf = lambda z: _features(tp, z)  # noqa: E731
                v = fn(s, t, sf, tf, x, y, key)
                assert v.shape == (B,)
                return jnp.mean(v)
            out.append(jax.grad(loss, argnums=(0, 1))(sp, tp))
        return out

    return jax.device_get(jax.jit(all_grads)(sp, tp))


@pytest.mark.parametrize("i", range(len(CASES)), ids=[f"{n}-{l}" if l else n for n, l, _ in CASES])
def test_teacher_gradient_is_exactly_zero(gradients, i):
    name, label, _ = CASES[i]
    gs, gt = gradients[i]
    for leaf in jax.tree.leaves(gt):
        assert np.all(np.asarray(leaf) == 0.0), f"{name}({label}): the teacher's parameters get a gradient"
    assert max(float(np.max(np.abs(l))) for l in jax.tree.leaves(gs)) > 0, "the student gets no gradient"
