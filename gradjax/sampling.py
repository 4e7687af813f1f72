"""Sampling from the implicit density ``p(x | y=i) ∝ exp(f_i(x))`` of a classifier (thesis ch. 5, Figs. 5.2, 5.8).

One update, run with :func:`jax.lax.scan` over ``steps`` (explicit keys, no Python loop):

    x_{t+1} = Π( x_t + η (∇_x f_i(x_t) − λ (x_t − c)) + sqrt(2 η T) ξ_t ),    ξ_t ~ N(0, I),

with ``η`` = ``step_size``, ``λ`` = ``weight_decay`` (a Gaussian prior ``−λ/2 ‖x − c‖²`` around ``c`` =
``center``), ``T`` = ``temperature`` and ``Π`` the clip to the image box (``clip``, default ``(0, 1)``).

* :func:`langevin` (``T = 1``): unadjusted Langevin dynamics in the standard *ascent* form — its stationary density
  is ``∝ exp(f_i(x) − λ/2 ‖x − c‖²)`` for small ``η`` (the thesis's §1.5.1 prints a descent sign, which samples
  ``exp(−f_i)``; we do not copy it).
* :func:`activity_maximization` (``T = 0``): gradient ascent on ``f_i`` without added noise (Fig. 5.2's
  "activity maximization"; the authors' "SGLD" is exactly this, with ``λ = 1e-2``, ``c = 0.5``, ``η = 0.1``,
  500 steps for GAN-test samples and 1000 for visualizations: :data:`AUTHORS`).
* :func:`sample_from_noise`: either, started from ``U(0, 1)`` noise (:func:`uniform_init`).
* :func:`denoise` (Fig. 5.8): data plus ``N(0, 0.1²)`` noise, then 200 ascent steps of ``η = 0.01``.

Every function returns a :class:`SampleResult` with the samples and ``f_i`` along the trajectory (free: the value
comes with the gradient), so callers can check that ascent increases the log-density. Per-example gradients use
the sum trick (``∇_x Σ_b f_{y_b}(x)_b``), valid for eval-mode models whose examples are independent.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
from jax import lax

from gradjax import _validation as V
from gradjax.gradients import select, value_and_input_gradient
from gradjax.model import as_logits_fn

Array = jax.Array

__all__ = ["SampleResult", "uniform_init", "langevin", "activity_maximization", "sample_from_noise", "denoise",
           "AUTHORS"]

AUTHORS = {"gan_test": dict(steps=500, step_size=0.1, weight_decay=1e-2, center=0.5),
           "visualization": dict(steps=1000, step_size=0.1, weight_decay=1e-2, center=0.5),
           "denoise": dict(noise_std=0.1, steps=200, step_size=0.01)}
"""The authors' sampler settings (their code's "SGLD", which adds no noise: ``temperature=0``)."""


class SampleResult(NamedTuple):
    """What a sampler returns.

    Attributes:
      samples: final ``x_T``, shape of ``x0``.
      log_density: ``[steps + 1, B]`` — ``f_{y_b}(x_t)`` for ``t = 0 … T`` (the unnormalized log-density).
      start: ``x_0`` (the noise or noisy image the chain started from).
    """

    samples: Array
    log_density: Array
    start: Array


def uniform_init(key: Array, shape, low: float = 0.0, high: float = 1.0, dtype=jnp.float32) -> Array:
    """``U(low, high)`` starting images of ``shape`` ``[B, H, W, C]`` (the GAN-test samples start from noise)."""
    V.check_key(key, "uniform_init")
    if not low < high:
        raise ValueError(f"uniform_init needs low < high; got {low}, {high}.")
    return jax.random.uniform(key, tuple(shape), dtype, low, high)


def _check_common(x0, labels, steps, step_size, weight_decay, temperature, clip):
    x0 = V.check_input(x0)
    labels = jnp.asarray(labels)
    V.check_labels(labels, None, x0.shape[0])
    steps = V.check_count(steps, "steps", minimum=0)
    for name, v in (("step_size", step_size), ("weight_decay", weight_decay), ("temperature", temperature)):
        if V.is_concrete(v) and not float(v) >= 0:
            raise ValueError(f"{name} must be >= 0; got {v!r}.")
    if clip is not None and (len(clip) != 2 or not clip[0] < clip[1]):
        raise ValueError(f"clip must be None or (low, high) with low < high; got {clip!r}.")
    return x0, labels.astype(jnp.int32), steps


def _run(logits_fn, x0, labels, key, *, steps, step_size, weight_decay, center, temperature, clip) -> SampleResult:
    f = as_logits_fn(logits_fn)
    fy = lambda z: select(f(z), labels)
    noise_scale = jnp.sqrt(2.0 * jnp.asarray(step_size, x0.dtype) * jnp.asarray(temperature, x0.dtype))
    keys = jax.random.split(key, steps) if key is not None else None

    def step(x, k):
        v, g = value_and_input_gradient(fy, x)
        x = x + step_size * (g - weight_decay * (x - center))
        if k is not None:
            x = x + noise_scale * jax.random.normal(k, x.shape, x.dtype)
        if clip is not None:
            x = jnp.clip(x, clip[0], clip[1])
        return x, v

    x, vals = lax.scan(step, x0, keys, length=steps)
    final = fy(x)
    return SampleResult(x, jnp.concatenate([vals, final[None]], axis=0), x0)


def langevin(logits_fn, x0: Array, labels: Array, key: Array, *, steps: int, step_size: float,
             temperature: float = 1.0, weight_decay: float = 0.0, center: float = 0.5,
             clip: Optional[tuple[float, float]] = (0.0, 1.0)) -> SampleResult:
    """Unadjusted Langevin dynamics on ``f_{labels}`` from ``x0`` (ascent form; see the module docstring):
    ``x ← Π(x + η(∇f_y − λ(x − c)) + sqrt(2ηT) ξ)``, ``steps`` steps, ``ξ`` drawn from ``key`` (one split per step).
    Deterministic for a given ``key``. ``temperature=0`` is :func:`activity_maximization`. Jittable."""
    x0, labels, steps = _check_common(x0, labels, steps, step_size, weight_decay, temperature, clip)
    V.check_key(key, "langevin")
    return _run(logits_fn, x0, labels, key, steps=steps, step_size=step_size, weight_decay=weight_decay,
                center=center, temperature=temperature, clip=clip)


def activity_maximization(logits_fn, x0: Array, labels: Array, *, steps: int, step_size: float,
                          weight_decay: float = 0.0, center: float = 0.5,
                          clip: Optional[tuple[float, float]] = (0.0, 1.0)) -> SampleResult:
    """Gradient ascent on ``f_{labels}`` without added noise (Fig. 5.2 "activity maximization"; the authors'
    "SGLD"): ``x ← Π(x + η(∇f_y − λ(x − c)))``. Deterministic given ``x0``; for a concave ``f_y`` and small ``η``
    each step increases ``f_y − λ/2‖x − c‖²``. Jittable."""
    x0, labels, steps = _check_common(x0, labels, steps, step_size, weight_decay, 0.0, clip)
    return _run(logits_fn, x0, labels, None, steps=steps, step_size=step_size, weight_decay=weight_decay,
                center=center, temperature=0.0, clip=clip)


def sample_from_noise(logits_fn, labels: Array, key: Array, shape, *, steps: int, step_size: float,
                      temperature: float = 0.0, weight_decay: float = 0.0, center: float = 0.5,
                      clip: Optional[tuple[float, float]] = (0.0, 1.0)) -> SampleResult:
    """Class-conditional samples started from ``U(0, 1)`` noise of ``shape`` ``[B, ...]`` (one image per label):
    ``key`` is split into the start and (``temperature > 0``) the Langevin noise. ``temperature=0`` (default):
    activity maximization; ``1``: Langevin. Deterministic for a given ``key``. Jittable."""
    V.check_key(key, "sample_from_noise")
    k_init, k_chain = jax.random.split(key)
    x0 = uniform_init(k_init, shape)
    if V.is_concrete(temperature) and float(temperature) == 0.0:
        return activity_maximization(logits_fn, x0, labels, steps=steps, step_size=step_size,
                                     weight_decay=weight_decay, center=center, clip=clip)
    return langevin(logits_fn, x0, labels, k_chain, steps=steps, step_size=step_size, temperature=temperature,
                    weight_decay=weight_decay, center=center, clip=clip)


def denoise(logits_fn, x: Array, labels: Array, key: Array, *, noise_std: float = 0.1, steps: int = 200,
            step_size: float = 0.01, temperature: float = 0.0, weight_decay: float = 0.0, center: float = 0.5,
            clip: Optional[tuple[float, float]] = (0.0, 1.0)) -> SampleResult:
    """Denoising by ascent on the implicit density (Fig. 5.8): ``x̃ = Π(x + noise_std · ε)`` with ``ε`` from
    ``key``, then ``steps`` ascent steps on ``f_{labels}`` (``temperature > 0``: Langevin, noise from the same
    ``key``). Defaults: the authors' noise 0.1, 200 steps, ``η = 0.01``. ``SampleResult.start`` is the noisy image.
    Deterministic for a given ``key``. Jittable."""
    x = V.check_input(x)
    V.check_key(key, "denoise")
    if V.is_concrete(noise_std) and not float(noise_std) >= 0:
        raise ValueError(f"noise_std must be >= 0; got {noise_std!r}.")
    k_noise, k_chain = jax.random.split(key)
    noisy = x + noise_std * jax.random.normal(k_noise, x.shape, x.dtype)
    if clip is not None:
        noisy = jnp.clip(noisy, clip[0], clip[1])
    if V.is_concrete(temperature) and float(temperature) == 0.0:
        return activity_maximization(logits_fn, noisy, labels, steps=steps, step_size=step_size,
                                     weight_decay=weight_decay, center=center, clip=clip)
    return langevin(logits_fn, noisy, labels, k_chain, steps=steps, step_size=step_size, temperature=temperature,
                    weight_decay=weight_decay, center=center, clip=clip)
