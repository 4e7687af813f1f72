"""Neural Cleanse (Wang et al., "Neural Cleanse: Identifying and Mitigating Backdoor Attacks in Neural Networks",
IEEE S&P 2019) — the baseline backdoor detector.

For every class ``c`` Neural Cleanse reverse-engineers the smallest trigger that flips clean images to ``c``:
a mask ``m in [0, 1]^{H x W}`` and a pattern ``p in [low, high]^{H x W x C}`` applied as

    A(x, m, p) = (1 - m) * x + m * p,

found by minimizing over a mini-batch of clean images

    L(m, p) = 1/B sum_i CE(f(A(x_i, m, p)), c) + lambda * ||m||_1

with Adam on unconstrained variables (``m = (tanh(a) + 1) / 2``, ``p = low + (high - low) (tanh(b) + 1) / 2``).
The weight ``lambda`` is adapted as in the authors' code: it starts at ``init_cost``; after ``patience``
consecutive steps with batch attack success ``>= success_threshold`` it is multiplied by ``cost_multiplier``, after
``patience`` consecutive steps below it divided by ``cost_multiplier ** 1.5``. The result is the mask of smallest
``||m||_1`` among the steps that reached the success threshold (the last mask if none did). The trojaned class is
the one whose ``||m||_1`` is an outlier on the small side: MAD anomaly index ``> 2``
(:func:`gradjax.backdoor.detect` on ``l1`` with ``side="low"``).

Differences from the authors' Keras code, stated: one Adam step per mini-batch with the cost schedule checked per
step (theirs per epoch of mini-batches), a fixed number of steps (no early stop), and the same key (same batches)
for every class when run for all classes at once (vmapped, one compiled program). Pure; the caller jits.
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import optax
from jax import lax

from gradjax import _validation as V
from gradjax._chunking import chunked_sum
from gradjax.model import Model, as_logits_fn

Array = jax.Array

__all__ = ["NeuralCleanseResult", "neural_cleanse", "apply_trigger"]


class NeuralCleanseResult(NamedTuple):
    """mask ``[H, W]``, pattern ``[H, W, C]`` (the best trigger), l1 ``[]`` = ``sum m``, success ``[]`` (attack
    success of the best trigger on all the given images), reached ``[]`` bool (the batch success threshold was
    reached at some step), cost ``[]`` (final lambda). With several classes every field has a leading ``[K']``."""

    mask: Array
    pattern: Array
    l1: Array
    success: Array
    reached: Array
    cost: Array


def apply_trigger(x: Array, mask: Array, pattern: Array) -> Array:
    """``(1 - m) * x + m * p`` for ``x [B, H, W, C]``, ``mask [H, W]``, ``pattern [H, W, C]``."""
    m = mask[..., None]
    return (1.0 - m) * x + m * pattern


def neural_cleanse(model: Model, images: Array, target_class: Union[int, Array, Sequence[int], str], *, key: Array,
                   low=0.0, high=1.0, steps: int = 300, batch_size: int = 32, learning_rate: float = 0.1,
                   init_cost: float = 1e-3, success_threshold: float = 0.99, patience: int = 10,
                   cost_multiplier: float = 1.5, chunk: Optional[int] = None,
                   memory_budget: Optional[int] = None) -> NeuralCleanseResult:
    """Reverse-engineer the minimal trigger of ``target_class`` (an int, an int array ``[K']`` or ``"all"``) from
    clean ``images [N, H, W, C]`` (see the module docstring for the objective and schedule).

    The final attack success on all ``N`` images is evaluated ``chunk`` images per model call
    (:func:`gradjax._chunking.chunked_sum`); ``chunk=None`` (default) sizes the chunk from ``memory_budget`` bytes
    (``None``: :data:`gradjax._chunking.DEFAULT_MEMORY_BUDGET`). Neither changes the result.

    Raises ``ValueError`` for non-image input, a class out of range, or non-positive counts."""
    logits_fn = as_logits_fn(model)
    V.check_images(images, "images")
    n, h, w, c = images.shape
    for name, v in (("steps", steps), ("batch_size", batch_size), ("patience", patience)):
        if int(v) != v or v < 1:
            raise ValueError(f"{name} must be an integer >= 1; got {v!r}.")
    chunk = None if chunk is None else V.check_count(chunk, "chunk")
    memory_budget = None if memory_budget is None else V.check_count(memory_budget, "memory_budget")
    if not 0 < success_threshold <= 1:
        raise ValueError(f"success_threshold must lie in (0, 1]; got {success_threshold}.")
    num_classes = int(jax.eval_shape(logits_fn, jax.ShapeDtypeStruct((1, h, w, c), images.dtype)).shape[-1])
    classes, single = V.normalize_classes(target_class, num_classes)

    lo = jnp.broadcast_to(jnp.asarray(low, jnp.float32), (h, w, c))
    hi = jnp.broadcast_to(jnp.asarray(high, jnp.float32), (h, w, c))
    images = jnp.asarray(images)
    tx = optax.adam(learning_rate, b1=0.5, b2=0.9)  # the authors' Adam settings
    k_init, k_batch = jax.random.split(key)
    batch_idx = jax.random.randint(k_batch, (steps, batch_size), 0, n)
    init = {"a": jax.random.uniform(k_init, (h, w), minval=-2.0, maxval=2.0),
            "b": jax.random.uniform(jax.random.fold_in(k_init, 1), (h, w, c), minval=-2.0, maxval=2.0)}

    def decode(v):
        return (jnp.tanh(v["a"]) + 1) / 2, lo + (hi - lo) * (jnp.tanh(v["b"]) + 1) / 2

    def one_class(cls):
        def loss_fn(v, cost, x):
            m, p = decode(v)
            logits = logits_fn(apply_trigger(x, m, p))
            ce = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.full((x.shape[0],), cls))
            acc = jnp.mean(jnp.argmax(logits, -1) == cls)
            return jnp.mean(ce) + cost * jnp.sum(m), (acc, jnp.sum(m))

        def step(carry, idx):
            v, opt_state, cost, up, down, best_l1, best_v, reached = carry
            (_, (acc, l1)), g = jax.value_and_grad(loss_fn, has_aux=True)(v, cost, images[idx])
            ok = acc >= success_threshold
            better = ok & (l1 < best_l1)
            best_v = jax.tree.map(lambda a, b: jnp.where(better, a, b), v, best_v)
            best_l1 = jnp.where(better, l1, best_l1)
            up = jnp.where(ok, up + 1, 0)
            down = jnp.where(ok, 0, down + 1)
            cost = jnp.where(up >= patience, cost * cost_multiplier,
                             jnp.where(down >= patience, cost / cost_multiplier ** 1.5, cost))
            up = jnp.where(up >= patience, 0, up)
            down = jnp.where(down >= patience, 0, down)
            updates, opt_state = tx.update(g, opt_state, v)
            v = optax.apply_updates(v, updates)
            return (v, opt_state, cost, up, down, best_l1, best_v, reached | ok), None

        zero = jnp.zeros((), jnp.int32)
        carry = (init, tx.init(init), jnp.asarray(init_cost, jnp.float32), zero, zero, jnp.asarray(jnp.inf),
                 init, jnp.zeros((), bool))
        (v, _, cost, _, _, best_l1, best_v, reached), _ = lax.scan(step, carry, batch_idx)
        final = jax.tree.map(lambda a, b: jnp.where(reached, a, b), best_v, v)
        m, p = decode(final)

        success = _success_rate(logits_fn, images, m, p, cls, chunk, memory_budget)
        return NeuralCleanseResult(mask=m, pattern=p, l1=jnp.sum(m), success=success, reached=reached, cost=cost)

    if single:
        return one_class(classes[0])
    return jax.vmap(one_class)(classes)


def _success_rate(logits_fn, images, m, p, cls, chunk, memory_budget):
    """Fraction of ``images`` classified as ``cls`` after applying the trigger, ``chunk`` images per call."""
    def hits(x):
        return (jnp.argmax(logits_fn(apply_trigger(x, m, p)), -1) == cls).astype(jnp.float32)

    return chunked_sum(hits, images, chunk=chunk, memory_budget=memory_budget) / images.shape[0]
