"""One memory-bounded chunked loop: ``sum_i w_i fn(item_i)`` over probes, path points, noise samples, basis vectors.

Every estimator that averages a model evaluation over many items — integrated-gradients path points (thesis §3.2),
SmoothGrad / VarGrad / smooth-FullGrad noise samples, Hutchinson / Taylor / Hutch++ probes (thesis §5.3.2, eq. 5.9),
the basis vectors of the exact Hessian trace — goes through :func:`chunked_sum`: ``chunk`` items are evaluated
together (one batched model call on ``chunk`` times the batch), and a running sum carries across chunks, so memory
is that of one chunk, whatever the number of items.

**One spelling, one default, library-wide.** Every public function of gradjax that evaluates many items in
memory-bounded pieces (path points, noise samples, probes, random inputs, images) takes the two keyword-only
options

* ``chunk: int | None = None`` — items per batched call (``>= 1``; clipped to the number of items);
* ``memory_budget: int | None = None`` — bytes for the automatic choice,

and ``chunk=None`` (the default) means "sized from ``memory_budget`` by :func:`auto_chunk`", with
``memory_budget=None`` meaning :data:`DEFAULT_MEMORY_BUDGET`. An explicit ``chunk`` wins over the budget. Results
never depend on either (items are drawn from their own keys; sums differ only in float summation order). No other
spelling (``chunk_size``, ``batch_size`` for a memory chunk, ``eval_chunk``) and no other fixed default.

Every pass counts: ``n`` items cost exactly ``n`` item evaluations. ``n = q * chunk + r``: the ``q`` full chunks run
in one loop and the ``r`` leftover items in one smaller call after it (never padded up to a full chunk, which made
50 integrated-gradients steps cost 56 evaluations with ``chunk=8``).

Chunk size from a memory budget (``chunk=None``): :func:`auto_chunk` traces ``fn`` on one item (tracing only, no
compilation) and takes the bytes of all its intermediate values as the cost of an item, an upper bound of what a
compiled chunk keeps alive per item (XLA fuses elementwise steps away; measured 1.5-4x above the compiled program's
temporary memory for the VGG gradients of benchmarks/chunking_cost.py: 2.3x at batch 32).
``chunk = floor(budget / bytes per item)``, clipped to ``[1, n]``, then evened out over the chunks it needs
(``ceil(n / ceil(n / chunk))``). The default budget, :data:`DEFAULT_MEMORY_BUDGET`, is 4 GiB of that estimate (about
1.7 GiB of compiled temporaries for a VGG): a batch of 32 CIFAR-sized images with 50 IG steps then runs in one chunk,
i.e. as one batched call with no loop — on XLA:CPU a loop of two chunks took 2.4x the time of one chunk of the same
work (docs/BENCHMARKS.md). Pass ``memory_budget`` (or an explicit ``chunk``) where memory is tighter.

How the loop runs (same math, same result up to float summation order):

* everything fits one chunk: no loop at all (XLA:CPU runs a loop body's convolutions slower, see
  benchmarks/chunking_cost.py);
* under a trace that stages a program (``jax.jit``, ``lax.scan``, ...): :func:`jax.lax.scan` over the full chunks,
  so the compiled program holds one copy of the body and its memory is one chunk;
* eagerly (no staging trace): a Python loop over the chunks. Each chunk then runs as JAX's per-operation programs,
  which JAX compiles once per shape; an eager ``lax.scan`` would instead compile a new program on *every* call (its
  body is a fresh closure), so an eager call that is repeated compiles nothing the second time.

A bigger chunk in the same memory (:class:`CheckpointedApply`): a model ``apply`` under ``jax.checkpoint`` with a
rematerialisation policy keeps fewer of the forward pass's values for the backward pass and recomputes the rest.
With ``policy="dots"`` (keep convolution/matmul outputs, recompute the elementwise chains) a softplus ResNet-18's
batched IG chunk needed 0.77x the compiled memory at unchanged FLOPs, so under a 45 MB budget 32 path points fit in
one call instead of a scan of two chunks of 16: 2.1x faster (benchmarks/remat_layouts.py, docs/BENCHMARKS.md §4).
On a ReLU VGG it saved 2-3 %, and in a double-backprop train step every policy cost memory: use it for the
memory-bounded multi-pass methods of smooth networks, with an explicit ``chunk`` (the budget estimate of
:func:`auto_chunk` reads the jaxpr and does not see the saving).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

__all__ = ["chunked_sum", "is_staging", "auto_chunk", "item_bytes", "chunk_plan", "DEFAULT_MEMORY_BUDGET", "LOOPS",
           "REMAT_POLICIES", "CheckpointedApply"]

LOOPS = ("scan", "unroll")
"""How :func:`chunked_sum` runs its full chunks under a staging trace."""

DEFAULT_MEMORY_BUDGET = 4 << 30
"""Bytes of intermediate values one chunk may hold when the chunk size is chosen automatically (``chunk=None``)."""

REMAT_POLICIES = {
    "dots": jax.checkpoint_policies.dots_saveable,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "nothing": jax.checkpoint_policies.nothing_saveable,
    "everything": jax.checkpoint_policies.everything_saveable,
}
"""Names of :class:`CheckpointedApply`'s policies: ``"dots"`` keeps the outputs of ``dot_general`` and
``conv_general_dilated`` (``jax.checkpoint_policies.dots_saveable``), ``"dots_no_batch"`` only matmuls without batch
dimensions, ``"nothing"`` keeps only the inputs, ``"everything"`` keeps all."""


@dataclasses.dataclass(frozen=True)
class CheckpointedApply:
    """``apply_fn`` under ``jax.checkpoint(policy=REMAT_POLICIES[policy])``: the same outputs (up to float
    round-off), fewer residuals kept for the backward pass, more recomputation.

    ``ModelHandle(CheckpointedApply(model.apply, "dots"), variables)`` is a drop-in handle for every saliency
    method; frozen and hashable, so it can be the static ``apply_fn`` of a handle under ``jax.jit``. Measured gain
    and limits: module docstring."""

    apply_fn: Callable
    policy: str = "dots"

    def __post_init__(self):
        if not callable(self.apply_fn):
            raise ValueError(f"apply_fn must be callable; got {type(self.apply_fn).__name__}.")
        if self.policy not in REMAT_POLICIES:
            raise ValueError(f"policy must be one of {sorted(REMAT_POLICIES)}; got {self.policy!r}.")

    def __call__(self, variables: Any, x: jax.Array, *args, **kwargs) -> Any:
        def body(v, z):
            return self.apply_fn(v, z, *args, **kwargs)
        return jax.checkpoint(body, policy=REMAT_POLICIES[self.policy])(variables, x)


def is_staging() -> bool:
    """True inside a trace that stages a program (``jax.jit``, ``lax.scan``/``cond`` bodies, ``eval_shape``), where a
    freshly created array is a tracer; False eagerly and under eager ``vmap``/``grad``."""
    return isinstance(jnp.zeros(()), jax.core.Tracer)


def _jaxpr_bytes(jaxpr) -> int:
    """Bytes of every value produced by the equations of ``jaxpr`` and of the jaxprs nested in them (a call's
    body counted once)."""
    total = 0
    for eqn in jaxpr.eqns:
        for v in eqn.outvars:
            aval = getattr(v, "aval", None)
            shape, dtype = getattr(aval, "shape", None), getattr(aval, "dtype", None)
            if shape is not None and dtype is not None:
                try:
                    size = np.dtype(dtype).itemsize
                except TypeError:  # extended dtypes (PRNG keys): negligible next to the model's values
                    size = 0
                total += int(math.prod(shape)) * size
        for p in eqn.params.values():
            for sub in (p if isinstance(p, (tuple, list)) else (p,)):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    total += _jaxpr_bytes(inner)
    return total


def item_bytes(fn: Callable[[Any], Any], xs: Any) -> int:
    """Bytes of all intermediate values of ``fn`` on a chunk of one item (``xs[:1]``): the per-item memory
    estimate behind :func:`auto_chunk`. Traces ``fn`` once (``jax.make_jaxpr``); compiles and runs nothing."""
    one = jax.tree.map(lambda a: a[:1], xs)
    return max(1, _jaxpr_bytes(jax.make_jaxpr(fn)(one).jaxpr))


def auto_chunk(fn: Callable[[Any], Any], xs: Any, n: int, memory_budget: Optional[int] = None) -> int:
    """Items per chunk for ``n`` items within ``memory_budget`` bytes (default :data:`DEFAULT_MEMORY_BUDGET`):
    ``floor(budget / item_bytes)`` clipped to ``[1, n]`` and evened out, ``ceil(n / ceil(n / chunk))``, so the
    chunks it needs are as equal as possible."""
    budget = DEFAULT_MEMORY_BUDGET if memory_budget is None else memory_budget
    if isinstance(budget, bool) or not isinstance(budget, (int, np.integer)) or budget < 1:
        raise ValueError(f"memory_budget must be a positive int (bytes); got {budget!r}.")
    chunk = max(1, min(n, int(budget) // item_bytes(fn, xs)))
    return -(-n // -(-n // chunk))


def chunk_plan(n: int, chunk: int) -> tuple[int, int, int]:
    """``(chunk, full_chunks, rest)`` with ``n = full_chunks * chunk + rest``, ``0 <= rest < chunk`` (``chunk``
    clipped to ``[1, n]``): the evaluations :func:`chunked_sum` makes — exactly ``n`` items."""
    chunk = max(1, min(int(chunk), int(n)))
    return chunk, n // chunk, n % chunk


def chunked_sum(fn: Callable[[Any], Any], xs: Any, weights: Optional[jax.Array] = None, *,
                chunk: Optional[int], n: Optional[int] = None, memory_budget: Optional[int] = None,
                loop: str = "scan") -> Any:
    """``sum_{i<n} weights[i] * fn(xs[i])``, evaluated ``chunk`` items at a time with a running sum.

    Args:
      fn: maps a chunk of items (every leaf of ``xs`` with a leading axis ``c <= chunk``) to a pytree of arrays
        with leading axis ``c`` (one output per item), e.g. the input-gradients at ``c`` path points ``[c, B, ...]``.
      xs: pytree whose leaves have a leading axis ``n`` (numbers, keys, indices, ...).
      weights: ``[n]`` (default: all ones).
      chunk: items per evaluation (``>= 1``; clipped to ``n``), or ``None``: chosen from ``memory_budget``
        (:func:`auto_chunk`).
      memory_budget: bytes for ``chunk=None`` (default :data:`DEFAULT_MEMORY_BUDGET`).
      loop: how full chunks run under a staging trace: ``"scan"`` (default; one copy of the body, memory of one
        chunk) or ``"unroll"`` (one copy per chunk and no while loop: XLA:CPU runs a loop body's convolutions
        slower, but the compiled program may hold every chunk's temporaries at once — measured in
        benchmarks/chunking_cost.py).

    Returns the weighted sum, a pytree shaped like one item's output (leading axis removed). Exactly ``n`` items
    are evaluated: ``n // chunk`` full chunks, then one call on the ``n % chunk`` remaining items; the result does
    not depend on ``chunk`` (up to float summation order).
    """
    leaves = jax.tree.leaves(xs)
    if n is None:
        n = int(leaves[0].shape[0]) if leaves else int(jnp.shape(weights)[0])
    if weights is None:
        weights = np.ones((n,), np.float32)
    if loop not in LOOPS:
        raise ValueError(f"loop must be one of {LOOPS}; got {loop!r}.")
    if chunk is None:
        chunk = auto_chunk(fn, xs, n, memory_budget)
    chunk, q, r = chunk_plan(n, chunk)
    w = jnp.asarray(weights)

    def add(acc, xc, wc):
        out = fn(xc)
        part = jax.tree.map(lambda o: jnp.tensordot(wc.astype(o.dtype), o, axes=1), out)
        return part if acc is None else jax.tree.map(jnp.add, acc, part)

    take = lambda lo, hi: (jax.tree.map(lambda a: a[lo:hi], xs), w[lo:hi])  # noqa: E731
    if q == 1 and r == 0:  # no loop
        return add(None, *take(0, n))
    acc = None
    if not is_staging() or loop == "unroll":  # eager: a Python loop compiles nothing new on a repeated call
        for c in range(q):
            acc = add(acc, *take(c * chunk, (c + 1) * chunk))
    elif q == 1:
        acc = add(None, *take(0, chunk))
    else:
        xs_c = jax.tree.map(lambda a: a[: q * chunk].reshape((q, chunk) + a.shape[1:]), xs)
        w_c = w[: q * chunk].reshape(q, chunk)
        out_spec = jax.eval_shape(fn, jax.tree.map(lambda a: a[0], xs_c))
        init = jax.tree.map(lambda s: jnp.zeros(s.shape[1:], s.dtype), out_spec)
        acc, _ = lax.scan(lambda a, inp: (add(a, *inp), None), init, (xs_c, w_c))
    if r:
        acc = add(acc, *take(q * chunk, n))
    return acc
