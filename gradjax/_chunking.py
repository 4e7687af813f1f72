"""One memory-bounded chunked loop: ``sum_i w_i fn(item_i)`` over probes, path points, noise samples, basis vectors.

Every estimator that averages a model evaluation over many items — integrated-gradients path points (thesis §3.2),
SmoothGrad / VarGrad / smooth-FullGrad noise samples, Hutchinson / Taylor / Hutch++ probes (thesis §5.3.2, eq. 5.9),
the basis vectors of the exact Hessian trace — goes through :func:`chunked_sum`: ``chunk`` items are evaluated
together (one batched model call), and a running sum carries across chunks, so memory does not grow with the number
of items.

How the loop runs (same math, same result up to float summation order):

* everything fits one chunk: no loop at all (XLA:CPU runs a loop body's convolutions ~1.7x slower, see
  benchmarks/saliency_cost.py);
* under a trace that stages a program (``jax.jit``, ``lax.scan``, ...): :func:`jax.lax.scan` over the chunks, so the
  compiled program holds one copy of the body and its memory is one chunk;
* eagerly (no staging trace): a Python loop over the chunks. Each chunk then runs as JAX's per-operation programs,
  which JAX compiles once per shape; an eager ``lax.scan`` would instead compile a new program on *every* call (its
  body is a fresh closure), so an eager call that is repeated compiles nothing the second time.
"""
from __future__ import annotations

from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

__all__ = ["chunked_sum", "is_staging"]


def is_staging() -> bool:
    """True inside a trace that stages a program (``jax.jit``, ``lax.scan``/``cond`` bodies, ``eval_shape``), where a
    freshly created array is a tracer; False eagerly and under eager ``vmap``/``grad``."""
    return isinstance(jnp.zeros(()), jax.core.Tracer)


def chunked_sum(fn: Callable[[Any], Any], xs: Any, weights: Optional[jax.Array] = None, *, chunk: int,
                n: Optional[int] = None) -> Any:
    """``sum_{i<n} weights[i] * fn(xs[i])``, evaluated ``chunk`` items at a time with a running sum.

    Args:
      fn: maps a chunk of items (every leaf of ``xs`` with a leading axis ``c <= chunk``) to a pytree of arrays
        with leading axis ``c`` (one output per item), e.g. the input-gradients at ``c`` path points ``[c, B, ...]``.
      xs: pytree whose leaves have a leading axis ``n`` (numbers, keys, indices, ...).
      weights: ``[n]`` (default: all ones). Items of a padded last chunk repeat the last item with weight 0, so
        the result does not depend on ``chunk``.
      chunk: items per evaluation (``>= 1``; clipped to ``n``).

    Returns the weighted sum, a pytree shaped like one item's output (leading axis removed).
    """
    leaves = jax.tree.leaves(xs)
    if n is None:
        n = int(leaves[0].shape[0]) if leaves else int(jnp.shape(weights)[0])
    if weights is None:
        weights = np.ones((n,), np.float32)
    chunk = max(1, min(int(chunk), n))
    n_chunks = -(-n // chunk)
    idx = np.minimum(np.arange(n_chunks * chunk), n - 1).reshape(n_chunks, chunk)
    w = jnp.concatenate([jnp.asarray(weights), jnp.zeros((n_chunks * chunk - n,), jnp.result_type(weights))])
    w = w.reshape(n_chunks, chunk)

    def add(acc, xc, wc):
        out = fn(xc)
        part = jax.tree.map(lambda o: jnp.tensordot(wc.astype(o.dtype), o, axes=1), out)
        return part if acc is None else jax.tree.map(jnp.add, acc, part)

    if n_chunks == 1:  # no loop
        return add(None, jax.tree.map(lambda a: a[idx[0]], xs), w[0])
    if not is_staging():  # eager: a Python loop compiles nothing new on a repeated call
        acc = None
        for c in range(n_chunks):
            acc = add(acc, jax.tree.map(lambda a: a[idx[c]], xs), w[c])
        return acc
    xs_c = jax.tree.map(lambda a: a[idx], xs)
    out_spec = jax.eval_shape(fn, jax.tree.map(lambda a: a[0], xs_c))
    init = jax.tree.map(lambda s: jnp.zeros(s.shape[1:], s.dtype), out_spec)
    acc, _ = lax.scan(lambda acc, inp: (add(acc, *inp), None), init, (xs_c, w))
    return acc
