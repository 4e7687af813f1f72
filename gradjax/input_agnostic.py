"""Input-agnostic saliency (seed 003): one perturbation per class, accumulated from gradients on random inputs.

**This is a reconstruction from the paper's abstract** (seed 003 is an abstract only; no code, equations or
hyper-parameters of the authors were available). It implements every statement of the abstract ("we nudge independent
data points over the model loss surface towards the local minima associated by a human-understandable concept
[...] With a systematic projection, scaling and refinement process, this information is transformed into an
interpretable visualization without compromising its model-fidelity") as specified in ``DESIGN.md``
("Input-agnostic saliency"). Each stage is a pure function of this module; the numbered equations below are the
ones their docstrings cite.

* **Nudge** (:func:`nudge`). Each iteration ``t`` draws ``S`` fresh i.i.d. samples ``X_s`` from an *unrestricted*
  distribution ``D`` over the input box ``[low, high]`` (``"uniform"`` pixel noise, ``"lowfreq"`` noise — uniform
  values on a coarse grid, bilinearly upsampled — or ``"mixed"``, each sample one or the other with probability
  1/2) and takes the input-gradient of the cross-entropy towards the concept, class ``c``, at the perturbed samples::

      (IA.1)  g_t = 1/S sum_s grad_rho CE(f(clip(X_s + rho_t, low, high)), c)                       [H, W, C]

  (``clip``'s gradient is zero where a pixel saturates, so ``g_t`` is the exact gradient of the batch loss).
* **Integrate and project** (:func:`optimizer`, :func:`project_step`, :func:`integrate`, :func:`project`). The
  gradients are integrated into one perturbation with moment-normalized steps and projected onto the norm ball
  after every step, ``rho_0 = 0``::

      (IA.2)  m_t = b1 m_{t-1} + (1 - b1) g_t ,  m^_t = m_t / (1 - b1^t)   (first moment, optax.ema)
              "global":      u_t = -lr * m^_t / ||m^_t||_2                    (optax.normalize_by_update_norm)
              "coordinate":  u_t = -lr * m^_t / (sqrt(v^_t) + eps)             (Adam, optax.adam; v = EMA of g^2)
      (IA.3)  rho_{t+1} = P_{||.|| <= r}(rho_t + (r / eta) u_t)   (optax.projections.projection_l2/_linf_ball)

  with ``r = eta`` (the ball radius ``radius``) in the main phase. ``"global"`` (the default for the l2 ball)
  normalizes the whole step by one number, so the map keeps the spatial distribution of the gradient's magnitude
  (where the evidence for ``c`` is strongest); per-coordinate Adam (``"coordinate"``, the default for l_inf, where it
  is the sign-like PGD step) moves every pixel at the same rate and spreads the map over the whole image.
* **Scale** (:func:`scale`, :func:`scale_to_unit`, :func:`heatmap`)::

      (IA.4)  display = (rho - min rho) / (max rho - min rho) ,   heatmap = sum_channels |rho|   [H, W]

  one global min-max to ``[0, 1]`` (colour ratios kept).
* **Refine** (:func:`refine`, :func:`fidelity`, :func:`gaussian_blur`). Up to ``refine_steps`` smoothing steps
  ``rho <- P_eta(G_sigma * rho)`` (depthwise Gaussian blur), each accepted only if the *fidelity* (the targeted
  success rate on a fixed set ``X_F`` of ``fidelity_samples`` fresh samples) stays within ``tolerance`` of the
  unrefined one::

      (IA.5)  F(rho) = mean_{x in X_F} [argmax f(clip(x + rho)) = c] ,   accept iff F(cand) >= F(rho_unrefined) - tol

  Refinement stops at the first rejected step. Because the
  comparison is on the same ``X_F``, the returned fidelity never drops below the unrefined one by more than
  ``tolerance`` (a guarantee, not an expectation).
* **Radius-to-success curve** (:func:`radius_curve`). From the unrefined map, a continuation over the shrinking radii::

      (IA.6)  r_j = eta * curve_fractions[j]:  rho <- P_{r_j}(rho), then curve_steps steps of (IA.1-3) at r = r_j

  (warm started, the optimizer state carried over, each step scaled by ``r_j / eta`` as in (IA.3)) records ``F`` at
  every radius: ``radii [R]`` and ``success [R]`` (the first point is ``eta`` itself). A trojaned class keeps a high
  success down to a much smaller radius (its trigger is a small perturbation that works on any input);
  :mod:`gradjax.backdoor` turns the curves into per-class statistics and a MAD anomaly index.

**Calling.** ``input_agnostic(model, input_shape, target_class, *, key, options=InputAgnosticOptions(...))``:
``model`` is a plain ``logits_fn(x [B, H, W, C]) -> [B, K]`` (eval mode) or a :class:`gradjax.model.ModelHandle`;
``target_class`` is an int (one class; result fields unbatched) or an int array ``[K']`` / ``"all"`` (every class of
the model), in which case the single-class computation is ``jax.vmap``-ed over the classes — one compiled program —
with the *same* key for every class (common random numbers, so classes are compared on the same samples and the
batched call equals the per-class calls). Every option lives in one frozen :class:`InputAgnosticOptions` (validated
when it is built); the stage functions take the same object. The function is pure and never jits itself: wrap it,
e.g. ``jax.jit(lambda k: input_agnostic(logits_fn, (32, 32, 1), "all", key=k))``.

**Memory.** Every sum over samples runs ``chunk`` samples at a time with a running sum
(:func:`gradjax._chunking.chunked_sum`, the loop every estimator of gradjax shares); ``chunk=None`` (the default)
sizes the chunk from ``memory_budget`` bytes (:func:`gradjax._chunking.auto_chunk`). Each sample is drawn from its
own key, so results do not depend on ``chunk`` (up to float summation order). Deterministic for a key.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, NamedTuple, Optional, Sequence, Union

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

__all__ = ["InputAgnosticOptions", "InputAgnosticResult", "Refinement", "RadiusCurve", "input_agnostic", "nudge",
           "optimizer", "project_step", "integrate", "project", "scale", "scale_to_unit", "heatmap", "refine",
           "radius_curve", "fidelity", "draw_samples", "gaussian_blur", "DISTRIBUTIONS", "NORMS", "NORMALIZATIONS",
           "DEFAULT_CURVE_FRACTIONS"]

DISTRIBUTIONS = ("uniform", "lowfreq", "mixed")
NORMS = ("l2", "linf")
NORMALIZATIONS = ("global", "coordinate")
DEFAULT_CURVE_FRACTIONS = tuple(round(0.7 ** k, 4) for k in range(1, 10))  # 0.7 ... 0.04, geometric


# ------------------------------------------------------------------------------------------------ options
def _check_positive(value, name: str) -> None:
    if value is not None and V.is_concrete(value) and not float(value) > 0:
        raise ValueError(f"{name} must be > 0; got {value}.")


@dataclasses.dataclass(frozen=True)
class InputAgnosticOptions:
    """Every option of :func:`input_agnostic` and its stages (frozen; validated on construction).

    Derive variants with ``dataclasses.replace(options, steps=50)`` (validated again). ``low``, ``high``, ``radius``
    and ``learning_rate`` may be arrays (``low``/``high``: scalars or per-channel ``[C]``) and even traced values
    (e.g. a radius passed into ``jax.jit``: its check is skipped while traced); every other field is a Python value
    (counts fix array shapes).

    Attributes:
      low, high: the input box (for standardized images the normalized values of raw 0 and 1). Samples are drawn in
        it and ``clip(X + rho)`` stays in it.
      distribution: ``"uniform" | "lowfreq" | "mixed"`` (eq. IA.1); lowfreq_factor: the coarse grid is
        ``H/f x W/f``.
      norm, radius: the ball ``||rho||_norm <= radius`` (eq. IA.3); ``radius=None``:
        ``0.15 * sqrt(HWC) * mean(high - low)`` for l2 and ``0.3 * mean(high - low)`` for l_inf
        (:meth:`resolve`).
      steps: main-phase steps at ``radius``; samples: fresh samples per step (``S`` of eq. IA.1).
      learning_rate: step size ``lr`` (eq. IA.2); ``None``: ``0.05 * radius`` (``"global"``: the l2 length of a
        step) or ``0.02 * mean(high - low)`` (``"coordinate"``: each pixel moves at most ~2 % of the range per step).
      normalization: ``"global"`` or ``"coordinate"`` (eq. IA.2); ``None``: ``"global"`` for l2, ``"coordinate"``
        for l_inf. momentum: ``b1`` in ``[0, 1)``.
      refine_steps, refine_sigma, tolerance: smoothing steps (Gaussian blur of std ``refine_sigma`` pixels),
        accepted only while fidelity ``>= unrefined fidelity - tolerance`` (eq. IA.5); ``refine_steps=0`` turns
        refinement off. fidelity_samples: size of the fixed fidelity set ``X_F``.
      curve_fractions: radii of the radius-to-success curve as fractions of ``radius``, each in ``(0, 1)``
        (eq. IA.6; ``()`` for no curve); curve_steps: continuation steps at each of them.
      chunk: samples per batched model call (``>= 1``), or ``None`` (default): as many as ``memory_budget`` bytes
        allow (:func:`gradjax._chunking.auto_chunk`); memory_budget: bytes for ``chunk=None`` (``None``:
        :data:`gradjax._chunking.DEFAULT_MEMORY_BUDGET`). The result does not depend on either (up to float
        summation order).

    Raises:
      ValueError: an unknown ``distribution``/``norm``/``normalization``, a non-positive ``radius`` or
        ``learning_rate``, ``high <= low`` somewhere, a count that is not a Python int ``>=`` its minimum,
        ``momentum`` outside ``[0, 1)``, ``tolerance`` outside ``[0, 1]``, ``refine_sigma <= 0``, a curve fraction
        outside ``(0, 1)``.
    """

    low: Any = 0.0
    high: Any = 1.0
    distribution: str = "mixed"
    lowfreq_factor: int = 4
    norm: str = "l2"
    radius: Any = None
    steps: int = 200
    samples: int = 32
    learning_rate: Any = None
    normalization: Optional[str] = None
    momentum: float = 0.9
    refine_steps: int = 4
    refine_sigma: float = 0.5
    tolerance: float = 0.02
    fidelity_samples: int = 256
    curve_fractions: Sequence[float] = DEFAULT_CURVE_FRACTIONS
    curve_steps: int = 25
    chunk: Optional[int] = None
    memory_budget: Optional[int] = None

    def __post_init__(self):
        V.check_choice(self.distribution, DISTRIBUTIONS, "distribution")
        V.check_choice(self.norm, NORMS, "norm")
        if self.normalization is not None:
            V.check_choice(self.normalization, NORMALIZATIONS, "normalization")
        _check_positive(self.radius, "radius")
        _check_positive(self.learning_rate, "learning_rate")
        if V.is_concrete(self.low) and V.is_concrete(self.high):
            lo, hi = np.asarray(self.low, np.float32), np.asarray(self.high, np.float32)
            try:
                ok = bool(np.all(hi > lo))
            except ValueError:
                raise ValueError(f"low and high must broadcast together (scalars or per-channel [C]); got shapes "
                                 f"{lo.shape} and {hi.shape}.") from None
            if not ok:
                raise ValueError("high must exceed low everywhere (the input box).")
        for name, minimum in (("steps", 1), ("samples", 1), ("lowfreq_factor", 1), ("refine_steps", 0),
                              ("fidelity_samples", 1), ("curve_steps", 1)):
            V.check_count(getattr(self, name), name, minimum)
        if self.chunk is not None:
            V.check_count(self.chunk, "chunk")
        if self.memory_budget is not None:
            V.check_count(self.memory_budget, "memory_budget")
        if not 0 <= self.momentum < 1:
            raise ValueError(f"momentum must lie in [0, 1); got {self.momentum}.")
        if not self.refine_sigma > 0:
            raise ValueError(f"refine_sigma must be > 0; got {self.refine_sigma}.")
        if not 0 <= self.tolerance <= 1:
            raise ValueError(f"tolerance must lie in [0, 1] (a drop in success rate); got {self.tolerance}.")
        fractions = tuple(float(f) for f in self.curve_fractions)
        if any(not 0 < f < 1 for f in fractions):
            raise ValueError(f"curve_fractions must lie in (0, 1) (radii below `radius`); got {fractions}.")
        object.__setattr__(self, "curve_fractions", fractions)

    def box(self, input_shape: Sequence[int]) -> tuple[Array, Array]:
        """``(low, high)`` broadcast to ``input_shape`` ``(H, W, C)`` as float32 arrays."""
        shape = tuple(int(s) for s in input_shape)
        return (jnp.broadcast_to(jnp.asarray(self.low, jnp.float32), shape),
                jnp.broadcast_to(jnp.asarray(self.high, jnp.float32), shape))

    def resolve(self, input_shape: Sequence[int]) -> "InputAgnosticOptions":
        """These options with the defaults that depend on the input filled in: ``radius``, ``normalization``,
        ``learning_rate`` (rules in the class docstring). Idempotent; every stage function calls it."""
        if self.radius is not None and self.normalization is not None and self.learning_rate is not None:
            return self
        lo, hi = self.box(input_shape)
        span = jnp.mean(hi - lo)
        radius = self.radius
        if radius is None:
            radius = 0.15 * math.sqrt(float(np.prod(input_shape))) * span if self.norm == "l2" else 0.3 * span
        normalization = self.normalization
        if normalization is None:
            normalization = "global" if self.norm == "l2" else "coordinate"
        lr = self.learning_rate
        if lr is None:
            lr = 0.05 * radius if normalization == "global" else 0.02 * span
        return dataclasses.replace(self, radius=radius, normalization=normalization, learning_rate=lr)


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


class Refinement(NamedTuple):
    """What :func:`refine` returns: map ``[H, W, C]`` (refined), fidelity ``[]`` (of ``map``), fidelity_unrefined
    ``[]`` (of the input map), accepted ``[]`` int (smoothing steps kept)."""

    map: Array
    fidelity: Array
    fidelity_unrefined: Array
    accepted: Array


class RadiusCurve(NamedTuple):
    """What :func:`radius_curve` returns: radii ``[R]`` (``radii[0] = radius``), success ``[R]`` (fidelity at each
    radius), maps ``[R, H, W, C]`` (``maps[0]`` = the map the continuation started from)."""

    radii: Array
    success: Array
    maps: Array


# ------------------------------------------------------------------------------------------------ sampling
def _draw_one(key: Array, shape: tuple, low: Array, high: Array, distribution: str, lowfreq_factor: int) -> Array:
    ku, kl, km = jax.random.split(key, 3)
    h, w, c = shape
    u = jax.random.uniform(ku, shape)
    if distribution != "uniform":
        coarse = (max(1, h // lowfreq_factor), max(1, w // lowfreq_factor), c)
        z = jax.image.resize(jax.random.uniform(kl, coarse), shape, method="bilinear")
        u = z if distribution == "lowfreq" else jnp.where(jax.random.bernoulli(km, 0.5), u, z)
    return low + (high - low) * u


def _sampler(shape: tuple, options: InputAgnosticOptions):
    """``keys [n] -> samples [n, H, W, C]`` of the distribution ``D`` of eq. IA.1, and the box ``(lo, hi)``."""
    lo, hi = options.box(shape)
    draw = lambda keys: jax.vmap(lambda k: _draw_one(k, shape, lo, hi, options.distribution,  # noqa: E731
                                                     options.lowfreq_factor))(keys)
    return draw, lo, hi


def draw_samples(key: Array, n: int, input_shape: Sequence[int], *, low=0.0, high=1.0, distribution: str = "mixed",
                 lowfreq_factor: int = 4) -> Array:
    """``n`` i.i.d. samples ``[n, H, W, C]`` of the unrestricted distribution ``D`` of eq. IA.1 (sample ``i`` from
    ``split(key, n)[i]`` alone, so draws do not depend on how they are chunked)."""
    shape = tuple(int(s) for s in input_shape)
    opts = InputAgnosticOptions(low=low, high=high, distribution=distribution, lowfreq_factor=lowfreq_factor)
    draw, _, _ = _sampler(shape, opts)
    return draw(jax.random.split(key, n))


# ------------------------------------------------------------------------------------------------ stages
def nudge(model: Model, rho: Array, target_class, *, key: Array,
          options: InputAgnosticOptions = InputAgnosticOptions()) -> tuple[Array, Array]:
    """Nudge (eq. IA.1): the mean cross-entropy towards ``target_class`` and its gradient w.r.t. ``rho [H, W, C]``
    over ``options.samples`` fresh samples ``X_s ~ D`` (sample ``s`` from ``split(key, samples)[s]``):

        (loss, g) = 1/S sum_s (CE, grad_rho CE)(f(clip(X_s + rho, low, high)), c)

    ``options.chunk`` samples per model call (:func:`gradjax._chunking.chunked_sum`). Returns
    ``(loss [], g [H, W, C])``.
    Pure; jittable."""
    logits_fn = as_logits_fn(model)
    draw, lo, hi = _sampler(tuple(rho.shape), options)

    def chunk_fn(keys):
        # per-sample CE and its gradient w.r.t. that sample's copy of rho (= its input-gradient through the clip):
        # one VJP for the chunk (sum trick; eval-mode samples are independent)
        x = draw(keys)

        def per_sample_ce(r):
            logits = logits_fn(jnp.clip(x + r, lo, hi))
            return optax.softmax_cross_entropy_with_integer_labels(logits, jnp.full((x.shape[0],), target_class))

        return value_and_input_gradient(per_sample_ce, jnp.broadcast_to(rho, x.shape))

    total, g = chunked_sum(chunk_fn, jax.random.split(key, options.samples), chunk=options.chunk,
                           memory_budget=options.memory_budget)
    return total / options.samples, g / options.samples


def optimizer(options: InputAgnosticOptions, input_shape: Sequence[int]) -> optax.GradientTransformation:
    """The moment-normalized step of eq. IA.2 as an optax transformation (its updates are ``u_t``):
    ``"global"``: ``chain(ema(b1, debias=True), normalize_by_update_norm(), scale(-lr))``; ``"coordinate"``:
    ``adam(lr, b1=b1)``. ``lr``, ``b1``, the normalization: ``options.resolve(input_shape)``."""
    o = options.resolve(input_shape)
    if o.normalization == "global":
        return optax.chain(optax.ema(o.momentum, debias=True), optax.normalize_by_update_norm(),
                           optax.scale(-o.learning_rate))
    return optax.adam(o.learning_rate, b1=o.momentum)


def project(rho: Array, radius, norm: str) -> Array:
    """Euclidean projection onto ``{||rho||_p <= radius}``, ``p = 2 | inf`` (the ``P`` of eq. IA.3; optax's ball
    projections)."""
    if norm == "l2":
        return optax.projections.projection_l2_ball(rho, radius)
    if norm == "linf":
        return optax.projections.projection_linf_ball(rho, radius)
    raise ValueError(f"norm must be one of {NORMS}; got {norm!r}.")


def project_step(rho: Array, updates: Array, *, ball_radius, radius, norm: str) -> Array:
    """Project (eq. IA.3): ``P_{||.|| <= r}(rho + (r / eta) u)`` with ``r = ball_radius``, ``eta = radius`` (the
    main-phase radius). In the main phase ``r = eta`` and the step is ``u`` itself; on a continuation ball
    ``r < eta`` (eq. IA.6) the step shrinks in proportion to the ball, so a ``"global"`` step keeps the same
    length relative to the radius, ``||(r/eta) u||_2 = lr * r / eta``."""
    return project(rho + updates * (ball_radius / radius), ball_radius, norm)


def integrate(model: Model, rho: Array, opt_state, target_class, *, key: Array, ball_radius, steps: int,
              options: InputAgnosticOptions = InputAgnosticOptions()) -> tuple[Array, Any, Array]:
    """``steps`` iterations of nudge (eq. IA.1), moment-normalized step (eq. IA.2) and projection on the ball of
    radius ``ball_radius`` (eq. IA.3) from ``(rho, opt_state)`` (``opt_state`` of :func:`optimizer`), in one
    ``lax.scan``; step ``t`` nudges with ``split(key, steps)[t]``. Returns ``(rho, opt_state, loss [steps])``."""
    o = options.resolve(rho.shape)
    tx = optimizer(o, rho.shape)

    def step(carry, inp):
        r_map, state = carry
        step_key, r = inp
        loss, g = nudge(model, r_map, target_class, key=step_key, options=o)
        updates, state = tx.update(g, state, r_map)
        return (project_step(r_map, updates, ball_radius=r, radius=o.radius, norm=o.norm), state), loss

    (rho, opt_state), losses = lax.scan(step, (rho, opt_state), (jax.random.split(key, steps),
                                                                  jnp.full((steps,), ball_radius, jnp.float32)))
    return rho, opt_state, losses


def scale_to_unit(rho: Array) -> Array:
    """Scale (eq. IA.4): ``(rho - min) / (max - min)`` over the whole array (one global min-max; zeros if ``rho``
    is constant)."""
    lo, hi = jnp.min(rho), jnp.max(rho)
    span = hi - lo
    return jnp.where(span > 0, (rho - lo) / jnp.where(span > 0, span, 1.0), jnp.zeros_like(rho))


def heatmap(rho: Array) -> Array:
    """Heat map (eq. IA.4): ``sum_channels |rho|``: ``[..., H, W, C] -> [..., H, W]``."""
    return jnp.sum(jnp.abs(rho), axis=-1)


def scale(rho: Array) -> tuple[Array, Array]:
    """Scale (eq. IA.4): ``(display, heatmap)`` of a map ``rho [H, W, C]``: :func:`scale_to_unit` and
    :func:`heatmap`."""
    return scale_to_unit(rho), heatmap(rho)


def _gaussian_kernel(sigma: float) -> np.ndarray:
    r = max(1, int(math.ceil(2.0 * sigma)))
    t = np.arange(-r, r + 1, dtype=np.float64)
    k = np.exp(-0.5 * (t / sigma) ** 2)
    return (k / k.sum()).astype(np.float32)


def gaussian_blur(rho: Array, sigma: float) -> Array:
    """Depthwise Gaussian blur ``G_sigma * rho`` of ``rho [H, W, C]`` (eq. IA.5's smoothing; separable, radius
    ``ceil(2 sigma)``, zero padding; the kernel sums to 1, so the l2 and l_inf norms do not grow)."""
    k1 = jnp.asarray(_gaussian_kernel(float(sigma)), rho.dtype)
    c = rho.shape[-1]
    x = rho[None]
    for kern in (k1[:, None], k1[None, :]):
        w = jnp.broadcast_to(kern[:, :, None, None], kern.shape + (1, c))
        x = lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                     feature_group_count=c)
    return x[0]


def fidelity(model: Model, rho: Array, target_class, *, key: Array,
             options: InputAgnosticOptions = InputAgnosticOptions()) -> Array:
    """Fidelity (eq. IA.5): the targeted success rate ``mean_s [argmax f(clip(X_s + rho, low, high)) = c]`` over
    ``options.fidelity_samples`` samples ``X_s ~ D`` (sample ``s`` from ``split(key, fidelity_samples)[s]``, so one
    ``key`` is one fixed set ``X_F``). Pure; jittable."""
    logits_fn = as_logits_fn(model)
    draw, lo, hi = _sampler(tuple(rho.shape), options)

    def hits(keys):
        pred = jnp.argmax(logits_fn(jnp.clip(draw(keys) + rho, lo, hi)), axis=-1)
        return (pred == target_class).astype(jnp.float32)

    n = options.fidelity_samples
    return chunked_sum(hits, jax.random.split(key, n), chunk=options.chunk, memory_budget=options.memory_budget) / n


def refine(model: Model, rho: Array, target_class, *, key: Array,
           options: InputAgnosticOptions = InputAgnosticOptions()) -> Refinement:
    """Refine (eq. IA.5): up to ``options.refine_steps`` smoothing steps ``cand = P_eta(G_sigma * rho)``
    (``sigma = refine_sigma``, ``eta = radius``), each accepted iff ``F(cand) >= F(rho_0) - tolerance`` on the one
    fidelity set drawn from ``key`` (:func:`fidelity`); the first rejected step stops refinement. So the returned
    fidelity is ``>= F(rho_0) - tolerance`` whatever happens. Returns :class:`Refinement`."""
    o = options.resolve(rho.shape)
    fid = lambda m: fidelity(model, m, target_class, key=key, options=o)  # noqa: E731
    f0 = fid(rho)

    def body(carry, _):
        r_map, f_cur, n_acc, stopped = carry
        cand = project(gaussian_blur(r_map, o.refine_sigma), o.radius, o.norm)
        f_c = fid(cand)
        ok = jnp.logical_and(jnp.logical_not(stopped), f_c >= f0 - o.tolerance)
        return (jnp.where(ok, cand, r_map), jnp.where(ok, f_c, f_cur), n_acc + ok.astype(jnp.int32),
                jnp.logical_or(stopped, jnp.logical_not(ok))), None

    if not o.refine_steps:
        return Refinement(rho, f0, f0, jnp.zeros((), jnp.int32))
    (refined, f_ref, n_acc, _), _ = lax.scan(body, (rho, f0, jnp.zeros((), jnp.int32), jnp.zeros((), bool)), None,
                                             length=o.refine_steps)
    return Refinement(refined, f_ref, f0, n_acc)


def radius_curve(model: Model, rho: Array, opt_state, target_class, *, key: Array, fidelity_key: Array,
                 options: InputAgnosticOptions = InputAgnosticOptions(),
                 fidelity_start: Optional[Array] = None) -> RadiusCurve:
    """Radius-to-success curve (eq. IA.6): from ``(rho, opt_state)`` at radius ``eta``, for each
    ``r_j = eta * curve_fractions[j]`` in turn: project onto the smaller ball, run ``curve_steps`` steps of
    :func:`integrate` there (steps scaled by ``r_j / eta``, eq. IA.3; keys ``split(key, R - 1)[j]``), and record
    the fidelity (:func:`fidelity` on ``fidelity_key``'s set). ``fidelity_start``: ``F(rho)`` if already known
    (computed otherwise). Returns :class:`RadiusCurve` with ``R = 1 + len(curve_fractions)`` points, the first
    ``(eta, F(rho), rho)``."""
    o = options.resolve(rho.shape)
    f0 = fidelity(model, rho, target_class, key=fidelity_key, options=o) if fidelity_start is None else fidelity_start
    eta = jnp.reshape(o.radius, (1,)).astype(jnp.float32)
    if not o.curve_fractions:
        return RadiusCurve(eta, f0[None], rho[None])

    def stage(carry, inp):
        r, stage_key = inp
        r_map, state, _ = integrate(model, project(carry[0], r, o.norm), carry[1], target_class, key=stage_key,
                                    ball_radius=r, steps=o.curve_steps, options=o)
        return (r_map, state), (fidelity(model, r_map, target_class, key=fidelity_key, options=o), r_map)

    stage_radii = o.radius * jnp.asarray(o.curve_fractions, jnp.float32)
    _, (succ, maps) = lax.scan(stage, (rho, opt_state),
                               (stage_radii, jax.random.split(key, len(o.curve_fractions))))
    return RadiusCurve(jnp.concatenate([eta, stage_radii]), jnp.concatenate([f0[None], succ]),
                       jnp.concatenate([rho[None], maps]))


# ------------------------------------------------------------------------------------------------ the method
def _one_class(model: Model, c, key: Array, options: InputAgnosticOptions, input_shape: tuple
               ) -> InputAgnosticResult:
    """All stages for one class ``c``: nudge/integrate/project at ``radius``, refine, curve, scale."""
    k_opt, k_fid, k_curve = jax.random.split(key, 3)
    rho0 = jnp.zeros(input_shape, jnp.float32)
    rho, opt_state, losses = integrate(model, rho0, optimizer(options, input_shape).init(rho0), c, key=k_opt,
                                       ball_radius=options.radius, steps=options.steps, options=options)
    ref = refine(model, rho, c, key=k_fid, options=options)
    curve = radius_curve(model, rho, opt_state, c, key=k_curve, fidelity_key=k_fid, options=options,
                         fidelity_start=ref.fidelity_unrefined)
    display, heat = scale(ref.map)
    return InputAgnosticResult(map=ref.map, display=display, heatmap=heat, fidelity=ref.fidelity,
                               fidelity_unrefined=ref.fidelity_unrefined, refine_accepted=ref.accepted,
                               radii=curve.radii, success=curve.success, curve_maps=curve.maps, loss=losses)


def input_agnostic(model: Model, input_shape: Sequence[int], target_class: Union[int, Array, Sequence[int], str], *,
                   key: Array, options: Optional[InputAgnosticOptions] = None) -> InputAgnosticResult:
    """Input-agnostic saliency map(s) of class(es) ``target_class`` (reconstruction from the seed-003 abstract;
    the stages and their equations IA.1-IA.6 are in the module docstring): :func:`integrate` (nudge, step,
    project) at ``radius`` from ``rho = 0``, :func:`refine`, :func:`radius_curve`, :func:`scale`.

    Args:
      model: ``logits_fn(x [B, H, W, C]) -> logits [B, K]`` (eval mode) or a :class:`~gradjax.model.ModelHandle`.
      input_shape: ``(H, W, C)`` of one input.
      target_class: an int ``c`` (one map, unbatched fields), an int array ``[K']``, or ``"all"`` (``range(K)``):
        the per-class computation vmapped over classes (one program, the same ``key`` for every class).
      key: ``jax.random`` key; everything random derives from it: ``k_opt, k_fid, k_curve = split(key, 3)`` (main
        phase, the fidelity set, the continuation).
      options: :class:`InputAgnosticOptions` (``None``: the defaults).

    Returns:
      :class:`InputAgnosticResult`.

    Raises:
      ValueError: bad ``input_shape``, a class out of range, a model that does not return ``[B, K]`` logits, and
        the option errors of :class:`InputAgnosticOptions`.
    """
    options = InputAgnosticOptions() if options is None else options
    if not isinstance(options, InputAgnosticOptions):
        raise ValueError(f"options must be an InputAgnosticOptions; got {type(options).__name__}.")
    input_shape = tuple(int(s) for s in input_shape)
    if len(input_shape) != 3 or any(s < 1 for s in input_shape):
        raise ValueError(f"input_shape must be (H, W, C) with positive sizes; got {input_shape}.")
    logits_fn = as_logits_fn(model)
    out = jax.eval_shape(logits_fn, jax.ShapeDtypeStruct((1,) + input_shape, jnp.float32))
    if len(out.shape) != 2:
        raise ValueError(f"the model must return logits of shape [B, K]; got shape {out.shape} for input "
                         f"{(1,) + input_shape}.")
    lo, hi = options.box(input_shape)  # low/high must broadcast to the input (per-channel [C] or scalars)
    if V.is_concrete(lo) and V.is_concrete(hi) and not bool(jnp.all(hi > lo)):
        raise ValueError("high must exceed low everywhere (the input box).")
    classes, single = V.normalize_classes(target_class, int(out.shape[1]))
    options = options.resolve(input_shape)
    one = lambda c: _one_class(logits_fn, c, key, options, input_shape)  # noqa: E731
    return one(classes[0]) if single else jax.vmap(one)(classes)
