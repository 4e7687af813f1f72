"""Input-agnostic saliency (seed 003): one perturbation per class, accumulated from gradients on random inputs.

**This is a reconstruction from the paper's abstract** (seed 003 is an abstract only; no code, equations or
hyper-parameters of the authors were available). It implements every statement of the abstract as specified in
``DESIGN.md`` ("Input-agnostic saliency"):

* **Nudge.** Each iteration ``t`` draws ``S`` fresh i.i.d. samples ``X_s`` from an *unrestricted* distribution
  ``D`` over the input box ``[low, high]`` (``"uniform"`` pixel noise, ``"lowfreq"`` noise — uniform values on a
  coarse grid, bilinearly upsampled — or ``"mixed"``, each sample one or the other with probability 1/2) and takes
  the input-gradient of the cross-entropy towards the concept, class ``c``, at the perturbed samples:

      g_t = 1/S sum_s grad_rho CE(f(clip(X_s + rho_t, low, high)), c)                       [H, W, C]

  (``clip``'s gradient is zero where a pixel saturates, so ``g_t`` is the exact gradient of the batch loss).
* **Integrate and project.** The gradients are integrated into one perturbation with moment-normalized
  steps and projected onto the norm ball after every step, ``rho_0 = 0``:

      m_t = b1 m_{t-1} + (1 - b1) g_t ,  m^_t = m_t / (1 - b1^t)   (first moment, optax.ema)
      "global":      u_t = -lr * m^_t / ||m^_t||_2                    (optax.normalize_by_update_norm)
      "coordinate":  u_t = -lr * m^_t / (sqrt(v^_t) + eps)             (Adam, optax.adam; v = EMA of g^2)
      rho_{t+1} = P_{||.|| <= eta}(rho_t + u_t)       (optax.projections.projection_l2_ball / _linf_ball)

  ``"global"`` (the default for the l2 ball) normalizes the whole step by one number, so the map keeps the
  spatial distribution of the gradient's magnitude (where the evidence for ``c`` is strongest); per-coordinate
  Adam (``"coordinate"``, the default for l_inf, where it is the sign-like PGD step) moves every pixel at the same
  rate and spreads the map over the whole image.
* **Scale.** ``display = (rho - min rho) / (max rho - min rho)``: one global min-max to ``[0, 1]`` (colour ratios
  kept); ``heatmap = sum_channels |rho|`` ``[H, W]``.
* **Refine.** Up to ``refine_steps`` smoothing steps ``rho <- P(G_sigma * rho)`` (depthwise Gaussian blur),
  each accepted only if the *fidelity* — the targeted success rate
  ``F(rho) = mean_{x in X_F} [argmax f(clip(x + rho)) = c]`` on a fixed set ``X_F`` of ``fidelity_samples`` fresh
  samples — stays ``>= F(rho_unrefined) - tolerance``; refinement stops at the first rejected step. Because the
  comparison is on the same ``X_F``, the returned fidelity never drops below the unrefined one by more than
  ``tolerance`` (a guarantee, not an expectation).
* **Radius-to-success curve.** From the unrefined map, a continuation over the shrinking radii
  ``eta * curve_fractions`` (``curve_steps`` further steps at each, with the step size scaled by ``r / eta``, projected on the
  smaller ball, warm started) records ``F`` at every radius: ``radii [R]`` and ``success [R]`` (the first point is ``eta`` itself).
  A trojaned class keeps a high success down to a much smaller radius (its trigger is a small perturbation that
  works on any input); :mod:`gradjax.backdoor` turns the curves into per-class statistics and a MAD anomaly index.

**Calling.** ``input_agnostic(model, target_class, *, key, input_shape, **options)``: ``model`` is a plain
``logits_fn(x [B, H, W, C]) -> [B, K]`` (eval mode) or a :class:`gradjax.model.ModelHandle`; ``target_class`` is an
int (one class; result fields unbatched) or an int array ``[K']`` / ``"all"`` (every class of the model), in which
case the single-class computation is ``jax.vmap``-ed over the classes — one compiled program — with the *same*
key for every class (common random numbers, so classes are compared on the same samples and the batched call
equals the per-class calls). The function is pure and never jits itself: wrap it, e.g.
``jax.jit(lambda k: input_agnostic(logits_fn, "all", key=k, input_shape=(32, 32, 1)))``. Memory is bounded in
the number of samples: every sum over samples runs ``chunk_size`` samples at a time in a ``lax.scan`` with a
running sum (:func:`gradjax._chunking.chunked_sum`, the loop every estimator of gradjax shares). Each sample is drawn from its own key, so results do not depend on ``chunk_size``
(up to float summation order). Deterministic for a key.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

from gradjax import _validation as V
from gradjax._chunking import chunked_sum
from gradjax.gradients import value_and_input_gradient
from gradjax.model import Model, as_logits_fn

Array = jax.Array

__all__ = ["InputAgnosticResult", "input_agnostic", "draw_samples", "fidelity", "scale_to_unit", "heatmap",
           "gaussian_blur", "project", "DISTRIBUTIONS", "NORMS", "NORMALIZATIONS", "DEFAULT_CURVE_FRACTIONS"]

DISTRIBUTIONS = ("uniform", "lowfreq", "mixed")
NORMS = ("l2", "linf")
NORMALIZATIONS = ("global", "coordinate")
DEFAULT_CURVE_FRACTIONS = tuple(round(0.7 ** k, 4) for k in range(1, 10))  # 0.7 ... 0.04, geometric


class InputAgnosticResult(NamedTuple):
    """What :func:`input_agnostic` returns (a pytree; with several classes every field has a leading ``[K']``).

    map: ``rho`` after refinement ``[H, W, C]``; display: ``rho`` min-max scaled to ``[0, 1]``; heatmap:
    ``sum_c |rho|`` ``[H, W]``; fidelity: targeted success rate of ``map`` on the fidelity samples ``[]``;
    fidelity_unrefined: the same before refinement; refine_accepted: number of accepted smoothing steps;
    radii: ``[R]`` ball radii of the continuation curve (``radii[0] = radius``); success: ``[R]`` fidelity at each
    radius; curve_maps: ``[R, H, W, C]`` the perturbation at each radius (``curve_maps[0]`` = unrefined map);
    loss: ``[steps]`` mean cross-entropy of each main-phase step.
    """

    map: Array
    display: Array
    heatmap: Array
    fidelity: Array
    fidelity_unrefined: Array
    refine_accepted: Array
    radii: Array
    success: Array
    curve_maps: Array
    loss: Array


# ------------------------------------------------------------------------------------------------ pieces
def scale_to_unit(rho: Array) -> Array:
    """``(rho - min) / (max - min)`` over the whole array (one global min-max; zeros if ``rho`` is constant)."""
    lo, hi = jnp.min(rho), jnp.max(rho)
    span = hi - lo
    return jnp.where(span > 0, (rho - lo) / jnp.where(span > 0, span, 1.0), jnp.zeros_like(rho))


def heatmap(rho: Array) -> Array:
    """``sum_channels |rho|``: ``[..., H, W, C] -> [..., H, W]``."""
    return jnp.sum(jnp.abs(rho), axis=-1)


def project(rho: Array, radius, norm: str) -> Array:
    """Euclidean projection onto ``{||rho||_p <= radius}``, ``p = 2 | inf`` (optax's ball projections)."""
    if norm == "l2":
        return optax.projections.projection_l2_ball(rho, radius)
    if norm == "linf":
        return optax.projections.projection_linf_ball(rho, radius)
    raise ValueError(f"norm must be one of {NORMS}; got {norm!r}.")


def _gaussian_kernel(sigma: float) -> np.ndarray:
    r = max(1, int(math.ceil(2.0 * sigma)))
    t = np.arange(-r, r + 1, dtype=np.float64)
    k = np.exp(-0.5 * (t / sigma) ** 2)
    return (k / k.sum()).astype(np.float32)


def gaussian_blur(rho: Array, sigma: float) -> Array:
    """Depthwise Gaussian blur of ``rho [H, W, C]`` (separable, zero padding; the kernel sums to 1, so the l2 and
    l_inf norms do not grow)."""
    k1 = jnp.asarray(_gaussian_kernel(float(sigma)), rho.dtype)
    c = rho.shape[-1]
    x = rho[None]
    for kern in (k1[:, None], k1[None, :]):
        w = jnp.broadcast_to(kern[:, :, None, None], kern.shape + (1, c))
        x = lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                     feature_group_count=c)
    return x[0]


def _draw_one(key: Array, shape: tuple, low: Array, high: Array, distribution: str, lowfreq_factor: int) -> Array:
    ku, kl, km = jax.random.split(key, 3)
    h, w, c = shape
    u = jax.random.uniform(ku, shape)
    if distribution != "uniform":
        coarse = (max(1, h // lowfreq_factor), max(1, w // lowfreq_factor), c)
        z = jax.image.resize(jax.random.uniform(kl, coarse), shape, method="bilinear")
        u = z if distribution == "lowfreq" else jnp.where(jax.random.bernoulli(km, 0.5), u, z)
    return low + (high - low) * u


def draw_samples(key: Array, n: int, input_shape: Sequence[int], *, low=0.0, high=1.0, distribution: str = "mixed",
                 lowfreq_factor: int = 4) -> Array:
    """``n`` i.i.d. samples ``[n, H, W, C]`` of the unrestricted distribution (sample ``i`` from
    ``split(key, n)[i]`` alone, so draws do not depend on how they are chunked)."""
    shape = tuple(int(s) for s in input_shape)
    lo, hi = _box(low, high, shape)
    keys = jax.random.split(key, n)
    return jax.vmap(lambda k: _draw_one(k, shape, lo, hi, distribution, lowfreq_factor))(keys)


def _box(low, high, shape) -> tuple[Array, Array]:
    lo = jnp.broadcast_to(jnp.asarray(low, jnp.float32), shape)
    hi = jnp.broadcast_to(jnp.asarray(high, jnp.float32), shape)
    return lo, hi


def fidelity(model: Model, rho: Array, target_class, *, key: Array, samples: int = 256, low=0.0, high=1.0,
             distribution: str = "mixed", lowfreq_factor: int = 4, chunk_size: int = 128) -> Array:
    """Targeted success rate ``mean_s [argmax f(clip(X_s + rho, low, high)) = c]`` over ``samples`` fresh
    samples drawn from ``key`` (pure; jittable)."""
    logits_fn = as_logits_fn(model)
    shape = tuple(rho.shape)
    lo, hi = _box(low, high, shape)

    def hits(keys):
        x = jax.vmap(lambda k: _draw_one(k, shape, lo, hi, distribution, lowfreq_factor))(keys)
        pred = jnp.argmax(logits_fn(jnp.clip(x + rho, lo, hi)), axis=-1)
        return (pred == target_class).astype(jnp.float32)

    return chunked_sum(hits, jax.random.split(key, samples), chunk=chunk_size) / samples


# ------------------------------------------------------------------------------------------------ the method
def _check_options(input_shape, radius, norm, distribution, steps, samples, chunk_size, refine_steps, refine_sigma,
                   tolerance, fidelity_samples, curve_fractions, curve_steps, learning_rate, lowfreq_factor):
    if len(input_shape) != 3 or any(int(s) < 1 for s in input_shape):
        raise ValueError(f"input_shape must be (H, W, C) with positive sizes; got {tuple(input_shape)}.")
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {NORMS}; got {norm!r}.")
    if distribution not in DISTRIBUTIONS:
        raise ValueError(f"distribution must be one of {DISTRIBUTIONS}; got {distribution!r}.")
    if radius is not None and V.is_concrete(radius) and not float(radius) > 0:
        raise ValueError(f"radius must be > 0; got {radius}.")
    for name, v, lo in (("steps", steps, 1), ("samples", samples, 1), ("chunk_size", chunk_size, 1),
                        ("refine_steps", refine_steps, 0), ("fidelity_samples", fidelity_samples, 1),
                        ("curve_steps", curve_steps, 1), ("lowfreq_factor", lowfreq_factor, 1)):
        if int(v) != v or v < lo:
            raise ValueError(f"{name} must be an integer >= {lo}; got {v!r}.")
    if not refine_sigma > 0:
        raise ValueError(f"refine_sigma must be > 0; got {refine_sigma}.")
    if not 0 <= tolerance <= 1:
        raise ValueError(f"tolerance must lie in [0, 1] (a drop in success rate); got {tolerance}.")
    if any(not 0 < f < 1 for f in curve_fractions):
        raise ValueError(f"curve_fractions must lie in (0, 1) (radii below `radius`); got {tuple(curve_fractions)}.")
    if learning_rate is not None and V.is_concrete(learning_rate) and not float(learning_rate) > 0:
        raise ValueError(f"learning_rate must be > 0; got {learning_rate}.")


def input_agnostic(model: Model, target_class: Union[int, Array, Sequence[int], str], *, key: Array,
                   input_shape: Sequence[int], low=0.0, high=1.0, distribution: str = "mixed", lowfreq_factor: int = 4,
                   norm: str = "l2", radius: Optional[float] = None, steps: int = 200, samples: int = 32,
                   chunk_size: int = 64, learning_rate: Optional[float] = None, normalization: Optional[str] = None,
                   momentum: float = 0.9, refine_steps: int = 4,
                   refine_sigma: float = 0.5, tolerance: float = 0.02, fidelity_samples: int = 256,
                   curve_fractions: Sequence[float] = DEFAULT_CURVE_FRACTIONS, curve_steps: int = 25,
                   ) -> InputAgnosticResult:
    """Input-agnostic saliency map(s) of class(es) ``target_class`` (reconstruction from the seed-003 abstract;
    the algorithm and its math are in the module docstring).

    Args:
      model: ``logits_fn(x [B, H, W, C]) -> logits [B, K]`` (eval mode) or a :class:`~gradjax.model.ModelHandle`.
      target_class: an int ``c`` (one map, unbatched fields), an int array ``[K']``, or ``"all"`` (``range(K)``):
        the per-class computation vmapped over classes (one program, the same ``key`` for every class).
      key: ``jax.random`` key; everything random (samples, fidelity set) derives from it.
      input_shape: ``(H, W, C)`` of one input.
      low, high: the input box (scalars or per-channel ``[C]``; for standardized images the normalized values of
        raw 0 and 1). Samples are drawn in it and ``clip(X + rho)`` stays in it.
      distribution: ``"uniform" | "lowfreq" | "mixed"``; lowfreq_factor: the coarse grid is ``H/f x W/f``.
      norm, radius: the ball ``||rho||_norm <= radius``; default radius ``0.15 * sqrt(HWC) * mean(high - low)``
        for l2 and ``0.3 * mean(high - low)`` for l_inf.
      steps: main-phase steps at ``radius``; samples: fresh samples per step; chunk_size: samples per model
        call (memory bound).
      normalization: ``"global"`` (default for l2) or ``"coordinate"`` (Adam; default for l_inf), see above;
        momentum: ``b1``.
      learning_rate: step size; default ``0.05 * radius`` (``"global"``: the l2 length of a step) or
        ``0.02 * mean(high - low)`` (``"coordinate"``: each pixel moves at most ~2 % of the range per step).
      refine_steps, refine_sigma, tolerance: smoothing steps (Gaussian blur of std ``refine_sigma`` pixels),
        accepted only while fidelity ``>= unrefined fidelity - tolerance``; ``refine_steps=0`` turns it off.
      fidelity_samples: size of the fixed fidelity set.
      curve_fractions: radii of the radius-to-success curve as fractions of ``radius`` (each in (0, 1));
        curve_steps: continuation steps at each of them.

    Returns:
      :class:`InputAgnosticResult`.

    Raises:
      ValueError: bad ``input_shape``, ``norm``, ``distribution``, ``radius <= 0``, a class out of range, a model
        that does not return ``[B, K]`` logits, non-positive counts.
    """
    logits_fn = as_logits_fn(model)
    input_shape = tuple(int(s) for s in input_shape)
    curve_fractions = tuple(float(f) for f in curve_fractions)
    _check_options(input_shape, radius, norm, distribution, steps, samples, chunk_size, refine_steps, refine_sigma,
                   tolerance, fidelity_samples, curve_fractions, curve_steps, learning_rate, lowfreq_factor)
    out = jax.eval_shape(logits_fn, jax.ShapeDtypeStruct((1,) + input_shape, jnp.float32))
    if len(out.shape) != 2:
        raise ValueError(f"the model must return logits of shape [B, K]; got shape {out.shape} for input "
                         f"{(1,) + input_shape}.")
    num_classes = int(out.shape[1])
    lo, hi = _box(low, high, input_shape)
    if V.is_concrete(lo) and V.is_concrete(hi) and not bool(jnp.all(hi > lo)):
        raise ValueError("high must exceed low everywhere (the input box).")
    span = jnp.mean(hi - lo)
    dim = float(np.prod(input_shape))
    if radius is None:
        radius = 0.15 * math.sqrt(dim) * span if norm == "l2" else 0.3 * span
    if normalization is None:
        normalization = "global" if norm == "l2" else "coordinate"
    if normalization not in NORMALIZATIONS:
        raise ValueError(f"normalization must be one of {NORMALIZATIONS}; got {normalization!r}.")
    if not 0 <= momentum < 1:
        raise ValueError(f"momentum must lie in [0, 1); got {momentum}.")
    if learning_rate is not None:
        lr = learning_rate
    else:
        lr = 0.05 * radius if normalization == "global" else 0.02 * span

    classes, single = V.normalize_classes(target_class, num_classes)

    k_opt, k_fid, k_curve = jax.random.split(key, 3)
    fid_keys = jax.random.split(k_fid, fidelity_samples)
    draw = lambda keys: jax.vmap(lambda k: _draw_one(k, input_shape, lo, hi, distribution, lowfreq_factor))(keys)
    if normalization == "global":
        tx = optax.chain(optax.ema(momentum, debias=True), optax.normalize_by_update_norm(), optax.scale(-lr))
    else:
        tx = optax.adam(lr, b1=momentum)

    def one_class(c):
        def loss_and_grad(rho, step_key):
            def chunk_fn(keys):
                # per-sample CE and its gradient w.r.t. that sample's copy of rho (= its input-gradient through
                # the clip): one VJP for the chunk (sum trick; eval-mode samples are independent)
                x = draw(keys)

                def per_sample_ce(r):
                    logits = logits_fn(jnp.clip(x + r, lo, hi))
                    return optax.softmax_cross_entropy_with_integer_labels(logits, jnp.full((x.shape[0],), c))

                rho_b = jnp.broadcast_to(rho, x.shape)
                return value_and_input_gradient(per_sample_ce, rho_b)

            total, g = chunked_sum(chunk_fn, jax.random.split(step_key, samples), chunk=chunk_size)
            return total / samples, g / samples

        def fid(rho):
            def hits(keys):
                pred = jnp.argmax(logits_fn(jnp.clip(draw(keys) + rho, lo, hi)), axis=-1)
                return (pred == c).astype(jnp.float32)

            return chunked_sum(hits, fid_keys, chunk=max(chunk_size, 1)) / fidelity_samples

        def ia_step(carry, inp):
            rho, opt_state = carry
            step_key, r = inp
            loss, g = loss_and_grad(rho, step_key)
            updates, opt_state = tx.update(g, opt_state, rho)
            return (project(rho + updates * (r / radius), r, norm), opt_state), loss

        rho0 = jnp.zeros(input_shape, jnp.float32)
        carry = (rho0, tx.init(rho0))
        step_keys = jax.random.split(k_opt, steps)
        (rho, opt_state), losses = lax.scan(ia_step, carry, (step_keys, jnp.full((steps,), radius, jnp.float32)))
        f0 = fid(rho)

        # refinement: smoothing steps accepted only while fidelity >= f0 - tolerance (on the same fidelity set)
        def refine(carry, _):
            r_map, f_cur, n_acc, stopped = carry
            cand = project(gaussian_blur(r_map, refine_sigma), radius, norm)
            f_c = fid(cand)
            ok = jnp.logical_and(jnp.logical_not(stopped), f_c >= f0 - tolerance)
            return (jnp.where(ok, cand, r_map), jnp.where(ok, f_c, f_cur), n_acc + ok.astype(jnp.int32),
                    jnp.logical_or(stopped, jnp.logical_not(ok))), None

        if refine_steps:
            (refined, f_ref, n_acc, _), _ = lax.scan(refine, (rho, f0, jnp.zeros((), jnp.int32), jnp.zeros((), bool)),
                                                     None, length=refine_steps)
        else:
            refined, f_ref, n_acc = rho, f0, jnp.zeros((), jnp.int32)

        # radius-to-success curve: continuation over shrinking balls, warm-started from the unrefined map
        def stage(carry, inp):
            r, stage_key = inp
            carry = (project(carry[0], r, norm), carry[1])
            carry, _ = lax.scan(ia_step, carry, (jax.random.split(stage_key, curve_steps),
                                                   jnp.full((curve_steps,), r, jnp.float32)))
            return carry, (fid(carry[0]), carry[0])

        if curve_fractions:
            stage_radii = radius * jnp.asarray(curve_fractions, jnp.float32)
            _, (succ, cmaps) = lax.scan(stage, (rho, opt_state),
                                        (stage_radii, jax.random.split(k_curve, len(curve_fractions))))
            radii = jnp.concatenate([jnp.reshape(radius, (1,)).astype(jnp.float32), stage_radii])
            success = jnp.concatenate([f0[None], succ])
            curve_maps = jnp.concatenate([rho[None], cmaps])
        else:
            radii, success, curve_maps = jnp.reshape(radius, (1,)).astype(jnp.float32), f0[None], rho[None]
        return InputAgnosticResult(map=refined, display=scale_to_unit(refined), heatmap=heatmap(refined),
                                   fidelity=f_ref, fidelity_unrefined=f0, refine_accepted=n_acc, radii=radii,
                                   success=success, curve_maps=curve_maps, loss=losses)

    if single:
        return one_class(classes[0])
    return jax.vmap(one_class)(classes)
