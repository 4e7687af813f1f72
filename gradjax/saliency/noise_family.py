"""Noise family: SmoothGrad, SmoothGrad², VarGrad (Smilkov et al. 2017; Hooker et al. 2019; Adebayo et al. 2018;
the "smooth grad squared" of thesis §3.5.2).

All three are moments of the input-gradient under Gaussian input noise, :func:`noise_gradient_moments`: the noisy
gradients come from :func:`gradjax.gradients.logits_and_target_gradient`, ``chunk`` samples per model call, summed
by :func:`gradjax._chunking.chunked_sum`. Works with a plain ``logits_fn`` or a :class:`gradjax.model.ModelHandle`.
"""
from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from gradjax import _validation as V
from gradjax._chunking import chunked_sum
from gradjax.gradients import PREDICTED, Target, logits_and_target_gradient, resolve_target
from gradjax.model import as_logits_fn
from gradjax.saliency.postprocess import reduce_channels

Array = jax.Array

__all__ = ["noise_gradient_moments", "smoothgrad", "smoothgrad_squared", "vargrad", "noise_scale", "noisy_inputs",
           "NOISE_RANGES"]


NOISE_RANGES = ("example", "batch")
"""Over what the input range of the noise scale ``noise_level * (max(x) - min(x))`` is taken (:func:`noise_scale`)."""


def noise_scale(x: Array, noise_level, over: str = "example") -> Array:
    """Noise scale ``sigma = noise_level * (max(x) - min(x))``, broadcastable to ``x`` (``[B, 1, ..., 1]``).

    ``over="example"`` (default): ``sigma_b`` from each example's own range (Smilkov et al. 2017; independent of
    what else is in the batch). ``over="batch"``: one ``sigma`` from the whole batch's range, as the reference
    ``SmoothFullGrad`` (``image.max() - image.min()`` over the batch tensor); an example's noise then depends on
    the other examples of its batch.
    """
    V.check_choice(over, NOISE_RANGES, "over")
    flat = x.reshape(x.shape[0], -1)
    if over == "batch":
        rng = jnp.broadcast_to(jnp.max(flat) - jnp.min(flat), (x.shape[0],))
    else:
        rng = flat.max(axis=1) - flat.min(axis=1)
    sigma = jnp.asarray(noise_level, x.dtype) * rng
    return sigma.reshape((x.shape[0],) + (1,) * (x.ndim - 1))


def noisy_inputs(keys, x: Array, sigma: Array) -> Array:
    """``x + sigma ⊙ n_i`` for each of the ``c`` keys, stacked to one batch ``[c * B, ...]`` (sample-major).

    Draw ``i`` comes from ``keys[i]`` alone (a loop over the chunk, not ``vmap``: a vmapped RBG key draws
    differently from an unbatched one, and the result must not depend on the chunking)."""
    noise = jnp.stack([jax.random.normal(keys[i], x.shape, x.dtype) for i in range(keys.shape[0])])
    return (x[None] + noise * sigma[None]).reshape((-1,) + x.shape[1:])


def _moments(f, x: Array, t: Array, key, samples: int, noise_level, chunk: Optional[int],
             memory_budget: Optional[int] = None, loop: str = "scan") -> tuple[Array, Array]:
    sigma = noise_scale(x, noise_level)

    def moments(kc):  # c keys -> the c noisy gradients and their squares, [c, B, ...] each
        c = kc.shape[0]
        g = logits_and_target_gradient(f, noisy_inputs(kc, x, sigma), jnp.tile(t, c)).gradient
        g = g.reshape((c,) + x.shape)
        return g, g * g

    w = jnp.full((samples,), 1.0 / samples, x.dtype)
    return chunked_sum(moments, jax.random.split(key, samples), w, chunk=chunk, memory_budget=memory_budget,
                       loop=loop)


def noise_gradient_moments(model, x: Array, target: Target = PREDICTED, *, key=None, samples: int = 16,
                           noise_level: float = 0.15, chunk: Optional[int] = None, images: bool = False,
                           memory_budget: Optional[int] = None, loop: str = "scan") -> tuple[Array, Array]:
    """First and second moments of the input-gradient under Gaussian input noise (raw, shape ``x.shape``).

    ``m1 = E[g]`` and ``m2 = E[g ⊙ g]`` over ``g = grad f_t(x + n)``, ``n ~ N(0, sigma_b^2 I)`` with the
    per-example scale ``sigma_b = noise_level * (max(x_b) - min(x_b))`` (:func:`noise_scale`), estimated with
    ``samples`` draws; the target is resolved once at the clean ``x``. Draw ``i`` uses
    ``jax.random.split(key, samples)[i]``, so the result does not depend on ``chunk``. ``images=True`` requires
    NHWC images. Exactly ``samples`` gradients, ``chunk`` samples per batched model call (``chunk=None``, the
    default: as many as ``memory_budget`` bytes allow, :func:`gradjax._chunking.auto_chunk`); ``loop``: ``"scan"``
    or ``"unroll"`` for several chunks under ``jit`` (:func:`gradjax._chunking.chunked_sum`).
    """
    x = V.check_input(x, images=images, min_rank=2)
    samples = V.check_count(samples, "samples")
    chunk = None if chunk is None else V.check_count(chunk, "chunk")
    key = V.check_key(key, "noise_gradient_moments")
    f = as_logits_fn(model)
    return _moments(f, x, resolve_target(f(x), target), key, samples, noise_level, chunk, memory_budget, loop)


def smoothgrad(model, x: Array, target: Target = PREDICTED, *, key=None, samples: int = 16,
               noise_level: float = 0.15, chunk: Optional[int] = None, reduce: Optional[str] = "abs_sum",
               memory_budget: Optional[int] = None, loop: str = "scan") -> Array:
    """SmoothGrad ``reduce(m1)``, ``m1 = E_n[grad f_t(x + n)]`` (Smilkov et al. 2017), per-example noise scale
    ``noise_level * (max - min)``; see :func:`noise_gradient_moments`. ``[B, H, W]``."""
    m1, _ = noise_gradient_moments(model, x, target, key=key, samples=samples, noise_level=noise_level,
                                   chunk=chunk, images=reduce is not None, memory_budget=memory_budget,
                                   loop=loop)
    return reduce_channels(m1, reduce)


def smoothgrad_squared(model, x: Array, target: Target = PREDICTED, *, key=None, samples: int = 16,
                       noise_level: float = 0.15, chunk: Optional[int] = None, reduce: Optional[str] = "sum",
                       memory_budget: Optional[int] = None, loop: str = "scan") -> Array:
    """SmoothGrad² ``reduce(m2)``, ``m2 = E_n[grad f_t(x + n)^2]`` (Hooker et al. 2019; the "smooth grad squared"
    of thesis §3.5.2). Non-negative; the default ``reduce="sum"`` sums the per-channel squared means.
    ``[B, H, W]``."""
    _, m2 = noise_gradient_moments(model, x, target, key=key, samples=samples, noise_level=noise_level,
                                   chunk=chunk, images=reduce is not None, memory_budget=memory_budget,
                                   loop=loop)
    return reduce_channels(m2, reduce)


def vargrad(model, x: Array, target: Target = PREDICTED, *, key=None, samples: int = 16,
            noise_level: float = 0.15, chunk: Optional[int] = None, reduce: Optional[str] = "sum",
            memory_budget: Optional[int] = None, loop: str = "scan") -> Array:
    """VarGrad ``reduce(Var_n[grad f_t(x + n)])`` (Adebayo et al. 2018): ``m2 - m1^2`` per element (the
    population variance over the ``samples`` draws, clipped at 0). ``[B, H, W]``."""
    m1, m2 = noise_gradient_moments(model, x, target, key=key, samples=samples, noise_level=noise_level,
                                    chunk=chunk, images=reduce is not None, memory_budget=memory_budget,
                                    loop=loop)
    return reduce_channels(jnp.maximum(m2 - m1 * m1, 0), reduce)
