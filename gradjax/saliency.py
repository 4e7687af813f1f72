"""Saliency maps: gradient, grad x input, integrated gradients, SmoothGrad / SmoothGrad² / VarGrad, guided
backprop, Grad-CAM and FullGrad (thesis ch. 3, eq. 3.2), with one call shape for all of them.

**The call shape.** Every method in :data:`SALIENCY_METHODS` is called as

    ``method(model, x, target=PREDICTED, *, key=None, **options) -> saliency``

* ``model`` — either a plain callable ``logits_fn(x [B, ...]) -> logits [B, K]`` (eval mode, closing over the
  parameters; enough for the gradient-only methods) or a :class:`ModelHandle` ``(apply_fn, variables)`` of a
  Flax Linen model (needed by the methods that look inside the network: Grad-CAM, guided backprop and the
  FullGrad family; also accepted by every other method through :meth:`ModelHandle.logits`).
* ``x`` — ``[B, H, W, C]`` float images (NHWC).
* ``target`` — int array ``[B]`` (or a Python/0-d int, broadcast to the batch) of classes to explain, or
  :data:`PREDICTED` (the arg-max class of each example at ``x``). For path and noise methods the target is
  resolved once at the clean input ``x``, so every sample explains the same class.
* ``key`` — a ``jax.random`` key; required by the stochastic methods (:data:`STOCHASTIC_METHODS`), ignored by
  the others. No hidden randomness.
* returns ``[B, H, W]``: one spatial map per example. The gradient-type methods (``gradient``,
  ``grad_x_input``, ``integrated_gradients``, ``smoothgrad``, ``smoothgrad_sq``, ``vargrad``,
  ``guided_backprop``) reduce the channel axis with ``reduce=`` (see :func:`reduce_channels`: ``"abs_sum"``
  (default), ``"sum"`` (signed), ``"abs_max"`` (Simonyan et al. 2013), ``"sq_sum"``); ``reduce=None`` returns the
  raw attribution of shape ``x.shape`` (and then accepts any ``[B, ...]`` input, e.g. vectors for an MLP).

Per-example gradients use the *sum trick*: ``grad_x sum_b f_{t_b}(x)_b`` (one backward pass for the batch),
valid because eval-mode examples do not interact (see :mod:`gradjax.gradients`). Path/noise methods evaluate
their ``steps``/``samples`` in chunks of ``chunk`` points (one model call on ``chunk * B`` inputs) inside
:func:`jax.lax.scan` with a running sum, so memory does not grow with the number of steps/samples.

Called eagerly with a :class:`ModelHandle`, a method runs its value checks and then a cached ``jax.jit`` of itself
(compiled once per shapes/options, instead of op-by-op execution); inside a trace, or with a plain callable, it
runs inline. ``with jax.disable_jit():`` forces op-by-op execution. Everything is jittable: close over ``model``
and the options, e.g.
``jax.jit(lambda x, k: smoothgrad(handle, x, key=k, samples=32))``. :class:`ModelHandle` is also a pytree
(``variables`` are its leaves, ``apply_fn`` is static), so it can be passed through ``jit`` as an argument.
Value checks (NaN input, target range) run on concrete arguments only; under ``jit`` the static checks
(rank, dtype, batch size) still run.
"""
from __future__ import annotations

import functools
from typing import Any, Callable, Mapping, NamedTuple, Optional, Sequence, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from gradjax import _validation as V
from gradjax import fullgrad as _fg
from gradjax.gradients import PREDICTED, resolve_target, select
from gradjax.models.layers import Activation
from gradjax.model import ModelHandle, as_logits_fn as _logits_fn, require_handle as _need_handle

Array = jax.Array
Target = Union[Array, int, str]

__all__ = [
    "PREDICTED", "ModelHandle", "SALIENCY_METHODS", "STOCHASTIC_METHODS", "INTERNAL_METHODS", "REDUCTIONS",
    "POSTPROCESS", "get_method", "compute_saliency",
    "reduce_channels", "bilinear_upsample", "postprocess_map",
    "random_saliency", "input_gradient", "gradient_x_input", "integrated_gradients",
    "integrated_gradients_with_delta", "smoothgrad", "smoothgrad_squared", "vargrad", "noise_gradient_moments",
    "guided_backprop", "gradcam", "gradcam_layers", "FullGradMaps", "fullgrad_maps", "fullgrad",
    "fullgrad_noabs", "fullgrad_simple", "smooth_fullgrad", "tap_gradients",
]

REDUCTIONS = ("abs_sum", "sum", "abs_max", "sq_sum")
"""Channel reductions of a gradient-type attribution ``[B, H, W, C] -> [B, H, W]`` (or ``None``: no reduction)."""

POSTPROCESS = ("abs_rescale", "abs", "rescale", "none")
"""FullGrad post-processing ``psi`` before the bilinear upsampling (thesis §3.4.2 and §3.6):
``"abs_rescale"`` = ``rescale(abs(.))`` (eq. 3.2, the thesis default), ``"abs"`` (``psi_mnist``, §3.6),
``"rescale"`` (min-max rescale of the signed map), ``"none"`` (``psi_m``, the minimal post-processing of §3.6 /
§3.10.1: bilinear upsampling only, signed)."""


# ----------------------------------------------------------------------------------------------------------------
# Boundary checks and small helpers
# ----------------------------------------------------------------------------------------------------------------

def _check_x(x, *, images: bool = True) -> Array:
    if not hasattr(x, "shape"):
        x = jnp.asarray(x)
    if images:
        V.check_images(x, "x")
    else:
        if jnp.ndim(x) < 2:
            raise ValueError(f"x must be a batch [B, ...] with rank >= 2; got shape {tuple(jnp.shape(x))}.")
        V.check_floating(x, "x")
        V.check_finite(x, "x")
    return x


def _check_target(target, batch: int):
    """Static target checks; returns ``PREDICTED`` or an int array ``[B]`` (scalars broadcast)."""
    return V.normalize_target(target, batch)


def _resolve(logits: Array, target) -> Array:
    """Class indices ``[B]``: checks the range on concrete targets, resolves :data:`PREDICTED` to the arg-max."""
    if jnp.ndim(logits) != 2:
        raise ValueError(f"the model must return logits of shape [B, K]; got shape {tuple(jnp.shape(logits))}.")
    if not isinstance(target, str):
        V.check_labels(target, logits.shape[1], logits.shape[0], "target")
    return resolve_target(logits, target)


def _check_key(key, method: str):
    if key is None:
        raise ValueError(f"{method} is stochastic: pass an explicit key=jax.random.key(seed) (or PRNGKey).")
    return key


def _check_positive_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive int; got {value!r}.")
    return int(value)


def _target_grad(logits_fn: Callable, x: Array, t: Array) -> Array:
    """``grad_{x_b} f_{t_b}(x_b)`` for a batch (sum trick: one vjp with a one-hot cotangent)."""
    logits, pullback = jax.vjp(logits_fn, x)
    (g,) = pullback(jax.nn.one_hot(t, logits.shape[-1], dtype=logits.dtype))
    return g


def _bcast(v: Array, like: Array) -> Array:
    """Broadcast a per-example vector ``[B]`` against ``like`` ``[B, ...]``."""
    return jnp.reshape(v, (v.shape[0],) + (1,) * (like.ndim - 1))


def _per_example_scale(x: Array, noise_level) -> Array:
    """``sigma_b = noise_level * (max(x_b) - min(x_b))``, shape ``[B]`` (Smilkov et al. 2017)."""
    flat = x.reshape(x.shape[0], -1)
    return jnp.asarray(noise_level, x.dtype) * (flat.max(axis=1) - flat.min(axis=1))


def _draw_noise(keys, x: Array) -> Array:
    """Standard normal noise ``[c, *x.shape]``, draw ``i`` from ``keys[i]`` alone (a loop, not ``vmap``: a
    vmapped RBG key draws differently from an unbatched one, and the result must not depend on the chunking)."""
    return lax.map(lambda k: jax.random.normal(k, x.shape, x.dtype), keys)


def _chunked_sum(fn: Callable, xs: Any, weights: Array, chunk: int) -> Any:
    """``sum_i weights[i] * fn(xs[i])`` evaluated ``chunk`` items at a time inside :func:`jax.lax.scan`.

    ``xs``: pytree whose leaves have a leading axis ``n`` (numbers, keys, ...); ``fn`` maps a chunk (leading
    axis ``c``) to a pytree of arrays with leading axis ``c``. The running sum keeps memory independent of ``n``;
    the last chunk is padded with repeats of the last item carrying weight 0.
    """
    n = int(weights.shape[0])
    chunk = max(1, min(int(chunk), n))
    n_chunks = -(-n // chunk)
    idx = np.minimum(np.arange(n_chunks * chunk), n - 1).reshape(n_chunks, chunk)
    xs_c = jax.tree.map(lambda a: a[idx], xs)
    w_c = jnp.concatenate([weights, jnp.zeros((n_chunks * chunk - n,), weights.dtype)]).reshape(n_chunks, chunk)
    out_spec = jax.eval_shape(fn, jax.tree.map(lambda a: a[0], xs_c))
    init = jax.tree.map(lambda s: jnp.zeros(s.shape[1:], s.dtype), out_spec)

    def body(acc, inp):
        xc, wc = inp
        out = fn(xc)
        return jax.tree.map(lambda a, o: a + jnp.tensordot(wc.astype(o.dtype), o, axes=1), acc, out), None

    if n_chunks == 1:  # no loop: XLA:CPU runs a loop body's convolutions ~1.7x slower (benchmarks/saliency_cost)
        return body(init, jax.tree.map(lambda a: a[0], (xs_c, w_c)))[0]
    acc, _ = lax.scan(body, init, (xs_c, w_c))
    return acc


_JITTED: dict = {}
_NUM_CLASSES: dict = {}


def _is_tracer_tree(tree) -> bool:
    return any(isinstance(leaf, jax.core.Tracer) for leaf in jax.tree.leaves(tree))


def _is_dynamic(value) -> bool:
    return hasattr(value, "shape") and hasattr(value, "dtype")


def _num_classes(handle: "ModelHandle", x: Array) -> int:
    """Number of classes of ``handle`` at input shape ``x`` (``jax.eval_shape``, cached per signature)."""
    leaves, treedef = jax.tree.flatten(handle.variables)
    sig = (handle.apply_fn, handle.apply_kwargs, treedef, tuple((jnp.shape(l), str(jnp.result_type(l))) for l in leaves),
           tuple(x.shape), str(x.dtype))
    if sig not in _NUM_CLASSES:
        out = jax.eval_shape(handle.logits, jax.ShapeDtypeStruct(x.shape, x.dtype))
        if len(out.shape) != 2:
            raise ValueError(f"the model must return logits of shape [B, K]; got shape {out.shape}.")
        _NUM_CLASSES[sig] = int(out.shape[1])
    return _NUM_CLASSES[sig]


def _auto_jit(fn: Callable) -> Callable:
    """Run a :class:`ModelHandle` method called outside any trace through a cached :func:`jax.jit`.

    Called eagerly, a saliency method would otherwise execute op by op (one small compilation per new primitive
    and shape, then one dispatch per op). The wrapper first runs the value checks that ``jit`` would skip (NaN
    input, target range), then calls ``jax.jit(fn)`` with the handle's variables, ``x``, an array ``target`` and
    array-valued options (``key``, an array ``baseline``) as arguments and everything else (``apply_fn``,
    :data:`PREDICTED`, ``steps``, ``layer``, ...) static; the compiled function is reused for later calls with
    the same shapes and options. Inside a trace (the caller's ``jit``/``vmap``/``grad``), with a plain logits
    callable, or with unhashable options it calls ``fn`` directly: same results either way.
    """

    @functools.wraps(fn)
    def wrapper(model, x, target=PREDICTED, **options):
        dyn = {k: v for k, v in options.items() if _is_dynamic(v)}
        static = tuple(sorted((k, v) for k, v in options.items() if k not in dyn))
        if (not isinstance(model, ModelHandle) or not _is_dynamic(x)
                or _is_tracer_tree((model.variables, x, target, dyn))):
            return fn(model, x, target, **options)
        try:
            hash(static)
        except TypeError:
            return fn(model, x, target, **options)
        x = _check_x(x, images=False)
        target = _check_target(target, x.shape[0])
        if not isinstance(target, str):
            V.check_labels(target, _num_classes(model, x), x.shape[0], "target")
        jitted = _JITTED.get(fn)
        if jitted is None:
            def inner(model_, x_, target_dyn, dyn_, *, target_static, static_):
                t = target_static if target_dyn is None else target_dyn
                return fn(model_, x_, t, **dict(static_), **dyn_)

            jitted = _JITTED[fn] = jax.jit(inner, static_argnames=("target_static", "static_"))
        if isinstance(target, str):
            return jitted(model, x, None, dyn, target_static=target, static_=static)
        return jitted(model, x, target, dyn, target_static=None, static_=static)

    return wrapper


# ----------------------------------------------------------------------------------------------------------------
# Post-processing
# ----------------------------------------------------------------------------------------------------------------

def reduce_channels(a: Array, reduce: Optional[str] = "abs_sum") -> Array:
    """Reduce the channel axis of an attribution ``[B, H, W, C] -> [B, H, W]``.

    ``"abs_sum"``: ``sum_c |a_c|``; ``"sum"``: ``sum_c a_c`` (signed); ``"abs_max"``: ``max_c |a_c|`` (Simonyan
    et al. 2013); ``"sq_sum"``: ``sum_c a_c^2``; ``None``: ``a`` unchanged (any shape).
    """
    if reduce is None:
        return a
    if reduce not in REDUCTIONS:
        raise ValueError(f"reduce must be one of {REDUCTIONS} or None; got {reduce!r}.")
    if jnp.ndim(a) != 4:
        raise ValueError(f"reduce={reduce!r} needs NHWC images [B, H, W, C]; got an attribution of shape "
                         f"{tuple(jnp.shape(a))}. Use reduce=None for non-image inputs.")
    if reduce == "abs_sum":
        return jnp.sum(jnp.abs(a), axis=-1)
    if reduce == "sum":
        return jnp.sum(a, axis=-1)
    if reduce == "abs_max":
        return jnp.max(jnp.abs(a), axis=-1)
    return jnp.sum(jnp.square(a), axis=-1)


def _interp_matrix(n_out: int, n_in: int, align_corners: bool) -> np.ndarray:
    """Linear-interpolation matrix ``[n_out, n_in]`` along one axis."""
    if n_in == 1:
        return np.ones((n_out, 1), np.float32)
    if align_corners:
        src = np.arange(n_out) * ((n_in - 1) / (n_out - 1)) if n_out > 1 else np.zeros(1)
    else:  # half-pixel centres, clamped at the border
        src = np.clip((np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5, 0, n_in - 1)
    i0 = np.clip(np.floor(src).astype(int), 0, n_in - 1)
    i1 = np.minimum(i0 + 1, n_in - 1)
    w1 = src - i0
    m = np.zeros((n_out, n_in), np.float64)
    np.add.at(m, (np.arange(n_out), i0), 1.0 - w1)
    np.add.at(m, (np.arange(n_out), i1), w1)
    return m.astype(np.float32)


def bilinear_upsample(maps: Array, size: Sequence[int], *, align_corners: bool = True) -> Array:
    """Bilinear resize of ``[B, h, w]`` (or ``[B, h, w, c]``) maps to spatial ``size = (H, W)``.

    ``align_corners=True`` (default) matches the reference FullGrad code
    (``F.interpolate(..., mode='bilinear', align_corners=True)``): corners map to corners. ``False`` uses
    half-pixel centres (as :func:`jax.image.resize`). Implemented as two small interpolation matrices, so it is
    linear, exact, jittable and differentiable.
    """
    H, W = int(size[0]), int(size[1])
    h, w = maps.shape[1], maps.shape[2]
    if (h, w) == (H, W):
        return maps
    mh = jnp.asarray(_interp_matrix(H, h, align_corners), maps.dtype)
    mw = jnp.asarray(_interp_matrix(W, w, align_corners), maps.dtype)
    if maps.ndim == 3:
        return jnp.einsum("Hh,bhw,Ww->bHW", mh, maps, mw)
    return jnp.einsum("Hh,bhwc,Ww->bHWc", mh, maps, mw)


def _rescale(a: Array, axes: tuple) -> Array:
    """Min-max rescale to [0, 1] over ``axes`` (per example); a constant map becomes 0 (no NaN)."""
    lo = jnp.min(a, axis=axes, keepdims=True)
    hi = jnp.max(a, axis=axes, keepdims=True)
    rng = hi - lo
    return jnp.where(rng > 0, (a - lo) / jnp.where(rng > 0, rng, 1), 0)


def postprocess_map(m: Array, size: Sequence[int], *, postprocess: str = "abs_rescale", rescale: str = "layer",
                    align_corners: bool = True) -> Array:
    """FullGrad's ``sum_c psi(m_c)`` for one layer map ``m`` ``[B, h, w, c]`` -> ``[B, H, W]`` (thesis eq. 3.2).

    ``psi = bilinearUpsample o rescale o abs`` for ``postprocess="abs_rescale"`` (thesis §3.4.2); see
    :data:`POSTPROCESS` for the §3.6 variants. ``rescale="layer"`` rescales each example's whole layer map (all
    channels jointly) to [0, 1], as the reference code does; ``"channel"`` rescales every channel separately, the
    literal reading of eq. 3.2's ``sum_c psi(f^b_c)``. The channel sum is taken before upsampling (upsampling is
    linear, so the order does not matter).
    """
    if postprocess not in POSTPROCESS:
        raise ValueError(f"postprocess must be one of {POSTPROCESS}; got {postprocess!r}.")
    if rescale not in ("layer", "channel"):
        raise ValueError(f"rescale must be 'layer' or 'channel'; got {rescale!r}.")
    if m.ndim != 4:
        raise ValueError(f"a FullGrad layer map must be [B, h, w, c]; got shape {m.shape}.")
    if postprocess in ("abs_rescale", "abs"):
        m = jnp.abs(m)
    if postprocess in ("abs_rescale", "rescale"):
        m = _rescale(m, (1, 2, 3) if rescale == "layer" else (1, 2))
    return bilinear_upsample(jnp.sum(m, axis=-1), size, align_corners=align_corners)


# ----------------------------------------------------------------------------------------------------------------
# Gradient methods
# ----------------------------------------------------------------------------------------------------------------

@_auto_jit
def random_saliency(model, x: Array, target: Target = PREDICTED, *, key=None) -> Array:
    """Random baseline: i.i.d. ``U(0, 1)`` scores ``[B, H, W]`` (ranking pixels uniformly at random).

    The model and target are ignored; ``key`` is required. Used as the "Random" column of thesis Tables 3.1/3.2
    and the random-removal baseline of §3.5.1/§3.5.2.
    """
    x = _check_x(x)
    _check_target(target, x.shape[0])
    return jax.random.uniform(_check_key(key, "random_saliency"), x.shape[:3], dtype=x.dtype)


@_auto_jit
def input_gradient(model, x: Array, target: Target = PREDICTED, *, key=None,
                   reduce: Optional[str] = "abs_sum") -> Array:
    """Input-gradient saliency ``reduce(grad_x f_t(x))`` (Simonyan et al. 2013; thesis §3.2).

    Shape ``[B, H, W]`` (``reduce=None``: ``x.shape``).
    """
    x = _check_x(x, images=reduce is not None)
    target = _check_target(target, x.shape[0])
    f = _logits_fn(model)
    logits, pullback = jax.vjp(f, x)
    t = _resolve(logits, target)
    (g,) = pullback(jax.nn.one_hot(t, logits.shape[-1], dtype=logits.dtype))
    return reduce_channels(g, reduce)


@_auto_jit
def gradient_x_input(model, x: Array, target: Target = PREDICTED, *, key=None,
                     reduce: Optional[str] = "abs_sum") -> Array:
    """Gradient x input ``reduce(grad_x f_t(x) ⊙ x)`` (the input term of FullGrad, thesis eq. 3.2/3.3).

    For a bias-free ReLU network its sum equals ``f_t(x)`` (thesis Proposition 8). ``[B, H, W]``.
    """
    g = input_gradient(model, x, target, reduce=None)
    return reduce_channels(g * x, reduce)


def _ig_nodes(steps: int, rule: str) -> tuple[np.ndarray, np.ndarray]:
    """Quadrature nodes ``alpha_k`` and weights ``w_k`` on [0, 1] for ``steps`` intervals."""
    m = steps
    if rule == "midpoint":
        return (np.arange(m) + 0.5) / m, np.full(m, 1.0 / m)
    if rule == "trapezoid":
        w = np.full(m + 1, 1.0 / m)
        w[0] = w[-1] = 0.5 / m
        return np.arange(m + 1) / m, w
    if rule == "left":
        return np.arange(m) / m, np.full(m, 1.0 / m)
    if rule == "right":
        return np.arange(1, m + 1) / m, np.full(m, 1.0 / m)
    raise ValueError(f"rule must be 'midpoint', 'trapezoid', 'left' or 'right'; got {rule!r}.")


@_auto_jit
def integrated_gradients_with_delta(model, x: Array, target: Target = PREDICTED, *, key=None, baseline=0.0,
                                    steps: int = 32, rule: str = "midpoint", chunk: int = 8,
                                    reduce: Optional[str] = "abs_sum") -> tuple[Array, Array]:
    """Integrated gradients and their completeness error (Sundararajan et al. 2017; thesis §3.2, §3.3).

    ``IG(x) = (x - x') ⊙ int_0^1 grad f_t(x' + a (x - x')) da``, the integral approximated by a quadrature on
    ``steps`` intervals: ``rule="midpoint"`` (Riemann midpoint, ``steps`` evaluations, error ``O(steps^-2)``),
    ``"trapezoid"`` (``steps + 1`` evaluations, ``O(steps^-2)``), ``"left"``/``"right"`` Riemann sums (``O(1/steps)``).
    Evaluated ``chunk`` nodes at a time (one model call on ``chunk * B`` inputs) in a :func:`jax.lax.scan` with a
    running sum.

    Args:
      baseline: ``x'``: a scalar (default ``0.0``, the black image for [0, 1] data) or an array broadcastable to
        ``x``.
      target: classes, resolved at ``x`` (:data:`PREDICTED` = arg-max at ``x``).

    Returns:
      ``(map, delta)``: ``map`` is ``reduce_channels(IG, reduce)`` (``[B, H, W]``; raw ``IG`` for
      ``reduce=None``) and ``delta = sum(IG) - (f_t(x) - f_t(x'))`` ``[B]``, the per-example completeness error
      of the quadrature (0 for the exact integral).
    """
    x = _check_x(x, images=reduce is not None)
    target = _check_target(target, x.shape[0])
    steps = _check_positive_int(steps, "steps")
    chunk = _check_positive_int(chunk, "chunk")
    alphas, weights = _ig_nodes(steps, rule)
    f = _logits_fn(model)
    base = jnp.asarray(baseline, x.dtype)
    try:
        base = jnp.broadcast_to(base, x.shape)
    except ValueError as e:
        raise ValueError(f"baseline of shape {base.shape} does not broadcast to x of shape {x.shape}.") from e
    V.check_finite(base, "baseline")
    logits_x = f(x)
    t = _resolve(logits_x, target)
    diff = x - base
    B = x.shape[0]

    def grads(a):  # a: [c] -> gradients at the c path points, [c, B, ...]
        c = a.shape[0]
        pts = base[None] + a.reshape((c,) + (1,) * x.ndim).astype(x.dtype) * diff[None]
        g = _target_grad(f, pts.reshape((c * B,) + x.shape[1:]), jnp.tile(t, c))
        return g.reshape((c,) + x.shape)

    avg_grad = _chunked_sum(grads, jnp.asarray(alphas, x.dtype), jnp.asarray(weights, x.dtype), chunk)
    attr = diff * avg_grad
    delta = attr.reshape(B, -1).sum(axis=1) - (select(logits_x, t) - select(f(base), t))
    return reduce_channels(attr, reduce), delta


@_auto_jit
def integrated_gradients(model, x: Array, target: Target = PREDICTED, *, key=None, baseline=0.0,
                         steps: int = 32, rule: str = "midpoint", chunk: int = 8,
                         reduce: Optional[str] = "abs_sum") -> Array:
    """Integrated-gradients map ``[B, H, W]``; see :func:`integrated_gradients_with_delta` (same options)."""
    return integrated_gradients_with_delta(model, x, target, baseline=baseline, steps=steps, rule=rule,
                                           chunk=chunk, reduce=reduce)[0]


@_auto_jit
def noise_gradient_moments(model, x: Array, target: Target = PREDICTED, *, key, samples: int = 16,
                           noise_level: float = 0.15, chunk: int = 8) -> tuple[Array, Array]:
    """First and second moments of the input-gradient under Gaussian input noise (raw, shape ``x.shape``).

    ``E[g]`` and ``E[g ⊙ g]`` over ``g = grad f_t(x + n)``, ``n ~ N(0, sigma_b^2 I)`` with the per-example scale
    ``sigma_b = noise_level * (max(x_b) - min(x_b))`` (Smilkov et al. 2017), estimated with ``samples`` draws.
    Draw ``i`` uses ``jax.random.split(key, samples)[i]``, so the result does not depend on ``chunk``.
    """
    x = _check_x(x, images=False)
    target = _check_target(target, x.shape[0])
    samples = _check_positive_int(samples, "samples")
    chunk = _check_positive_int(chunk, "chunk")
    keys = jax.random.split(_check_key(key, "noise_gradient_moments"), samples)
    f = _logits_fn(model)
    t = _resolve(f(x), target)
    sigma = _bcast(_per_example_scale(x, noise_level), x)
    B = x.shape[0]

    def moments(kc):
        c = kc.shape[0]
        noise = _draw_noise(kc, x) * sigma[None]
        g = _target_grad(f, (x[None] + noise).reshape((c * B,) + x.shape[1:]), jnp.tile(t, c))
        g = g.reshape((c,) + x.shape)
        return g, g * g

    w = jnp.full((samples,), 1.0 / samples, x.dtype)
    return _chunked_sum(moments, keys, w, chunk)


@_auto_jit
def smoothgrad(model, x: Array, target: Target = PREDICTED, *, key=None, samples: int = 16,
               noise_level: float = 0.15, chunk: int = 8, reduce: Optional[str] = "abs_sum") -> Array:
    """SmoothGrad ``reduce(E_n[grad f_t(x + n)])`` (Smilkov et al. 2017), per-example noise scale
    ``noise_level * (max - min)``; see :func:`noise_gradient_moments`. ``[B, H, W]``."""
    m1, _ = noise_gradient_moments(model, x, target, key=key, samples=samples, noise_level=noise_level, chunk=chunk)
    return reduce_channels(m1, reduce)


@_auto_jit
def smoothgrad_squared(model, x: Array, target: Target = PREDICTED, *, key=None, samples: int = 16,
                       noise_level: float = 0.15, chunk: int = 8, reduce: Optional[str] = "sum") -> Array:
    """SmoothGrad² ``reduce(E_n[grad f_t(x + n)^2])`` (Hooker et al. 2019; the "smooth grad squared" of thesis
    §3.5.2). Non-negative; the default ``reduce="sum"`` sums the per-channel squared means. ``[B, H, W]``."""
    _, m2 = noise_gradient_moments(model, x, target, key=key, samples=samples, noise_level=noise_level, chunk=chunk)
    return reduce_channels(m2, reduce)


@_auto_jit
def vargrad(model, x: Array, target: Target = PREDICTED, *, key=None, samples: int = 16,
            noise_level: float = 0.15, chunk: int = 8, reduce: Optional[str] = "sum") -> Array:
    """VarGrad ``reduce(Var_n[grad f_t(x + n)])`` (Adebayo et al. 2018): ``E[g^2] - E[g]^2`` per element (the
    population variance over the ``samples`` draws, clipped at 0). ``[B, H, W]``."""
    m1, m2 = noise_gradient_moments(model, x, target, key=key, samples=samples, noise_level=noise_level, chunk=chunk)
    return reduce_channels(jnp.maximum(m2 - m1 * m1, 0), reduce)


# ----------------------------------------------------------------------------------------------------------------
# Guided backprop
# ----------------------------------------------------------------------------------------------------------------

@jax.custom_vjp
def _guided_relu(z):
    return jax.nn.relu(z)


def _guided_relu_fwd(z):
    return jax.nn.relu(z), z


def _guided_relu_bwd(z, g):
    # ReLU's backward rule (z > 0) combined with the deconvnet rule (g > 0): Springenberg et al. 2015.
    return (jnp.where((z > 0) & (g > 0), g, jnp.zeros_like(g)),)


_guided_relu.defvjp(_guided_relu_fwd, _guided_relu_bwd)


@jax.custom_vjp
def _guided_softplus(z, beta):
    return jax.nn.softplus(beta * z) / beta


def _guided_softplus_fwd(z, beta):
    return jax.nn.softplus(beta * z) / beta, (z, beta)


def _guided_softplus_bwd(res, g):
    z, beta = res
    return (jnp.where(g > 0, g * jax.nn.sigmoid(beta * z), jnp.zeros_like(g)), jnp.zeros_like(beta))


_guided_softplus.defvjp(_guided_softplus_fwd, _guided_softplus_bwd)


def _guided_interceptor(next_fun, args, kwargs, context):
    module = context.module
    if context.method_name == "__call__" and isinstance(module, Activation):
        z = args[0]
        if module.kind == "relu":
            return _guided_relu(z)
        if module.kind == "softplus":
            return _guided_softplus(z, jnp.asarray(module.beta, z.dtype))
    return next_fun(*args, **kwargs)


@_auto_jit
def guided_backprop(model, x: Array, target: Target = PREDICTED, *, key=None,
                    reduce: Optional[str] = "abs_sum") -> Array:
    """Guided backpropagation (Springenberg et al. 2015): the input-gradient with every ReLU's backward rule
    ``g_in = g_out * [z > 0]`` replaced by ``g_in = g_out * [z > 0] * [g_out > 0]``.

    The forward pass is unchanged. Implemented by intercepting ``__call__`` of every
    :class:`gradjax.models.layers.Activation` with :func:`flax.linen.intercept_methods` and swapping in a ReLU with
    a :func:`jax.custom_vjp` backward rule (the model code is not modified). Softplus activations get the analogous
    rule ``g_in = g_out * sigmoid(beta z) * [g_out > 0]``. Needs a :class:`ModelHandle`. ``[B, H, W]``.
    """
    handle = _need_handle(model, "guided_backprop")
    x = _check_x(x, images=reduce is not None)
    target = _check_target(target, x.shape[0])
    logits, pullback = jax.vjp(lambda z: handle.logits(z, interceptor=_guided_interceptor), x)
    t = _resolve(logits, target)
    (g,) = pullback(jax.nn.one_hot(t, logits.shape[-1], dtype=logits.dtype))
    return reduce_channels(g, reduce)


# ----------------------------------------------------------------------------------------------------------------
# Grad-CAM
# ----------------------------------------------------------------------------------------------------------------

def _module_path(module) -> str:
    return "/".join(str(p) for p in module.path)


def gradcam_layers(model: ModelHandle, x: Array) -> list[tuple[str, tuple]]:
    """Modules of ``model`` with their output shapes, in the order their ``__call__`` returns:
    ``[(path, shape), ...]`` (paths joined with ``"/"``, e.g. ``"block3"``, ``"block3/conv"``). Nothing is
    computed (:func:`jax.eval_shape`)."""
    handle = _need_handle(model, "gradcam_layers")
    x = _check_x(x, images=False)
    seen: list = []

    def ic(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        if context.method_name == "__call__" and hasattr(out, "shape"):
            seen.append((_module_path(context.module), tuple(out.shape)))
        return out

    jax.eval_shape(lambda v, z: handle.replace(variables=v).logits(z, interceptor=ic), handle.variables,
                   jax.ShapeDtypeStruct(x.shape, x.dtype))
    return [(p, s) for p, s in seen if p]


def _resolve_layer(handle: ModelHandle, x: Array, layer) -> tuple[str, tuple]:
    layers = gradcam_layers(handle, x)
    spatial = [(p, s) for p, s in layers if len(s) == 4]
    if layer is None:
        if not spatial:
            raise ValueError("gradcam: the model has no module with a spatial [B, h, w, c] output.")
        return spatial[-1]
    path = layer if isinstance(layer, str) else "/".join(layer)
    hits = [(p, s) for p, s in layers if p == path]
    if not hits:
        names = ", ".join(sorted({p for p, s in spatial}))
        raise ValueError(f"gradcam: no module at path {path!r}; modules with spatial outputs: {names}.")
    if len(hits) > 1:
        raise ValueError(f"gradcam: module {path!r} is called {len(hits)} times; choose a module called once.")
    if len(hits[0][1]) != 4:
        raise ValueError(f"gradcam: module {path!r} outputs shape {hits[0][1]}, not a spatial map [B, h, w, c].")
    return hits[0]


@_auto_jit
def gradcam(model, x: Array, target: Target = PREDICTED, *, key=None, layer=None, relu: bool = True,
            upsample: bool = True, align_corners: bool = True) -> Array:
    """Grad-CAM (Selvaraju et al. 2017): ``relu(sum_c w_c A_c)`` with ``w_c = mean_{h,w} d f_t / d A_{hwc}``.

    ``A = [B, h, w, c]`` is the output of the module at path ``layer`` (e.g. ``"block3"`` of a VGG,
    ``"stage3_block1"`` of the ResNet; default: the last module, in call order, with a spatial output — the
    last convolutional block). The activation and its gradient come from one forward/backward pass: a Linen
    method interceptor adds a zero array to that module's output and the gradient w.r.t. it is ``d f_t / d A``.
    The map is bilinearly upsampled to the input size (``upsample=False``: ``[B, h, w]``). Needs a
    :class:`ModelHandle`. ``[B, H, W]``, non-negative when ``relu=True``.
    """
    handle = _need_handle(model, "gradcam")
    x = _check_x(x)
    target = _check_target(target, x.shape[0])
    path, shape = _resolve_layer(handle, x, layer)

    def forward(delta):
        captured = []

        def ic(next_fun, args, kwargs, context):
            out = next_fun(*args, **kwargs)
            if context.method_name == "__call__" and _module_path(context.module) == path:
                captured.append(out)
                return out + delta
            return out

        logits = handle.logits(x, interceptor=ic)
        return logits, captured[0]

    logits, pullback, act = jax.vjp(forward, jnp.zeros(shape, x.dtype), has_aux=True)
    t = _resolve(logits, target)
    (g,) = pullback(jax.nn.one_hot(t, logits.shape[-1], dtype=logits.dtype))
    weights = jnp.mean(g, axis=(1, 2))  # [B, c]
    cam = jnp.einsum("bhwc,bc->bhw", act, weights)
    if relu:
        cam = jax.nn.relu(cam)
    if upsample:
        cam = bilinear_upsample(cam, x.shape[1:3], align_corners=align_corners)
    return cam


# ----------------------------------------------------------------------------------------------------------------
# FullGrad
# ----------------------------------------------------------------------------------------------------------------

class FullGradMaps(NamedTuple):
    """FullGrad saliency with its parts (thesis eq. 3.2).

    Attributes:
      saliency: ``[B, H, W]`` — ``input_map + sum_l layer_maps[l]``.
      input_map: ``[B, H, W]`` — ``sum_c psi(grad_x f ⊙ x)_c``.
      layer_maps: ``{path: [B, H, W]}`` — ``sum_c psi(f^b_l)_c`` for each spatial (convolutional) bias site.
      decomposition: the raw :class:`gradjax.fullgrad.FullGradients` (pre-``psi``; includes the non-spatial Dense
        terms, which eq. 3.2 leaves out of the map).
    """

    saliency: Array
    input_map: Array
    layer_maps: dict
    decomposition: Any


def _aggregate(input_term: Array, layer_terms: Mapping[str, Array], size, postprocess, rescale, align_corners):
    kw = dict(postprocess=postprocess, rescale=rescale, align_corners=align_corners)
    input_map = postprocess_map(input_term, size, **kw)
    layer_maps = {k: postprocess_map(v, size, **kw) for k, v in layer_terms.items() if v.ndim == 4}
    total = input_map
    for m in layer_maps.values():
        total = total + m
    return total, input_map, layer_maps


def _fullgrad_inputs(model, x, target, method):
    handle = _need_handle(model, method)
    x = _check_x(x)
    target = _check_target(target, x.shape[0])
    return handle, x, target


@_auto_jit
def fullgrad_maps(model, x: Array, target: Target = PREDICTED, *, key=None, postprocess: str = "abs_rescale",
                  rescale: str = "layer", merge: str = "none", align_corners: bool = True) -> FullGradMaps:
    """FullGrad (thesis §3.4.2, eq. 3.2) with its per-layer maps:

        ``S_f(x) = psi(grad_x f(x) ⊙ x) + sum_{l in L} sum_{c in c_l} psi(f^b(x)_{l,c})``

    with ``f^b_l = grad_{z_l} f ⊙ b_l`` from :func:`gradjax.fullgrad.full_gradients` (one forward and one
    backward pass) and ``psi = bilinearUpsample o rescale o abs`` (``postprocess="abs_rescale"``). The channels of
    each term are summed (the input term too). Only spatial (convolutional) bias sites have maps; Dense biases are
    left out, as in the thesis. ``merge`` groups bias sites into layers (``"none"``: every conv / BatchNorm /
    activation site is a layer, as in the reference code; ``"conv_bn"``, ``"block"``: see
    :func:`gradjax.fullgrad.full_gradients`). For ``postprocess="none"`` the pre-``psi`` terms sum (before
    upsampling) to ``f(x)`` minus the Dense terms (completeness, eq. 3.3). Needs a :class:`ModelHandle`.
    """
    handle, x, target = _fullgrad_inputs(model, x, target, "fullgrad")
    dec = _fg.full_gradients(handle.apply_fn, handle.variables, x, target, merge=merge, apply_kwargs=handle.kwargs)
    total, input_map, layer_maps = _aggregate(dec.input_gradient * x, dec.bias_gradients, x.shape[1:3],
                                              postprocess, rescale, align_corners)
    return FullGradMaps(total, input_map, layer_maps, dec)


@_auto_jit
def fullgrad(model, x: Array, target: Target = PREDICTED, *, key=None, postprocess: str = "abs_rescale",
             rescale: str = "layer", merge: str = "none", align_corners: bool = True) -> Array:
    """FullGrad saliency ``[B, H, W]`` (thesis eq. 3.2); see :func:`fullgrad_maps` for the options and parts."""
    return fullgrad_maps(model, x, target, postprocess=postprocess, rescale=rescale, merge=merge,
                         align_corners=align_corners).saliency


@_auto_jit
def fullgrad_noabs(model, x: Array, target: Target = PREDICTED, *, key=None, merge: str = "none",
                   align_corners: bool = True) -> Array:
    """FullGrad without absolute value: ``psi_m = bilinearUpsample`` (thesis §3.6 and §3.10.1, "FullGrad (no
    abs)" of Tables 3.1/3.2): signed, un-rescaled maps summed over channels and layers. ``[B, H, W]``.
    (Min-max rescaling without abs is ``fullgrad(..., postprocess="rescale")``.)"""
    return fullgrad(model, x, target, postprocess="none", merge=merge, align_corners=align_corners)


@_auto_jit
def tap_gradients(model, x: Array, target: Target = PREDICTED) -> tuple[Array, dict]:
    """``(grad_x f_t, {path: grad_{z_l} f_t})``: the input-gradient and the gradient w.r.t. the output ``z_l`` of
    every bias tap (keys as in :func:`gradjax.fullgrad.full_gradients`), from one vjp. Needs a
    :class:`ModelHandle` of a model with bias taps."""
    handle = _need_handle(model, "tap_gradients")
    x = _check_x(x, images=False)
    target = _check_target(target, x.shape[0])
    kw = handle.kwargs
    variables = handle.variables

    def collect(v, z):
        return handle.apply_fn(v, z, mutable=["perturbations"], **kw)

    _, state = jax.eval_shape(collect, variables, jax.ShapeDtypeStruct(x.shape, x.dtype))
    perts = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), dict(dict(state).get("perturbations", {})))

    def f(z, p):
        v = dict(variables)
        if p:
            v["perturbations"] = p
        return handle.apply_fn(v, z, **kw)

    logits, pullback = jax.vjp(f, x, perts)
    t = _resolve(logits, target)
    gx, gp = pullback(jax.nn.one_hot(t, logits.shape[-1], dtype=logits.dtype))
    return gx, _fg.flatten_taps(gp)


@_auto_jit
def fullgrad_simple(model, x: Array, target: Target = PREDICTED, *, key=None, postprocess: str = "abs_rescale",
                    rescale: str = "layer", align_corners: bool = True) -> Array:
    """Simple FullGrad (the ``SimpleFullGrad`` of the reference code idiap/fullgrad-saliency; not in the thesis):
    FullGrad's aggregation with each bias-gradient ``grad_{z_l} f ⊙ b_l`` replaced by the plain feature
    gradient ``grad_{z_l} f`` at every spatial bias site (conv / BatchNorm outputs, i.e. before the ReLU; also
    softplus activations' outputs):

        ``S(x) = psi(grad_x f ⊙ x) + sum_l sum_c psi(grad_{z_l} f)_c``

    It needs no bias values and satisfies no completeness property. ``[B, H, W]``.
    """
    handle, x, target = _fullgrad_inputs(model, x, target, "fullgrad_simple")
    gx, gz = tap_gradients(handle, x, target)
    return _aggregate(gx * x, gz, x.shape[1:3], postprocess, rescale, align_corners)[0]


@_auto_jit
def smooth_fullgrad(model, x: Array, target: Target = PREDICTED, *, key=None, samples: int = 16,
                    noise_level: float = 0.15, chunk: int = 4, average: str = "raw",
                    postprocess: str = "abs_rescale", rescale: str = "layer", merge: str = "none",
                    align_corners: bool = True) -> Array:
    """Smooth FullGrad: FullGrad averaged over noisy inputs ``x + n``, ``n ~ N(0, sigma_b^2)``,
    ``sigma_b = noise_level * (max(x_b) - min(x_b))`` per example, ``samples`` draws (key required).

    ``average="raw"`` (default, as the reference ``SmoothFullGrad``): average the pre-``psi`` terms
    ``grad_x f ⊙ (x + n)`` and every ``f^b_l`` over the noise, then post-process and aggregate (eq. 3.2).
    ``average="saliency"``: average the final FullGrad maps. The target is resolved once at the clean ``x``.
    Samples are processed ``chunk`` at a time with a running sum. ``[B, H, W]``.
    """
    handle, x, target = _fullgrad_inputs(model, x, target, "smooth_fullgrad")
    if average not in ("raw", "saliency"):
        raise ValueError(f"average must be 'raw' or 'saliency'; got {average!r}.")
    samples = _check_positive_int(samples, "samples")
    chunk = _check_positive_int(chunk, "chunk")
    keys = jax.random.split(_check_key(key, "smooth_fullgrad"), samples)
    t = _resolve(handle.logits(x), target)
    sigma = _bcast(_per_example_scale(x, noise_level), x)
    B, size = x.shape[0], x.shape[1:3]
    kw = dict(postprocess=postprocess, rescale=rescale, align_corners=align_corners)

    def terms(kc):
        c = kc.shape[0]
        noise = _draw_noise(kc, x) * sigma[None]
        xn = (x[None] + noise).reshape((c * B,) + x.shape[1:])
        dec = _fg.full_gradients(handle.apply_fn, handle.variables, xn, jnp.tile(t, c), merge=merge,
                                 apply_kwargs=handle.kwargs)
        inp = dec.input_gradient * xn
        layers = {k: v for k, v in dec.bias_gradients.items() if v.ndim == 4}
        if average == "saliency":
            return _aggregate(inp, layers, size, **kw)[0].reshape((c, B) + tuple(size))
        split = lambda a: a.reshape((c, B) + a.shape[1:])
        return split(inp), {k: split(v) for k, v in layers.items()}

    w = jnp.full((samples,), 1.0 / samples, x.dtype)
    out = _chunked_sum(terms, keys, w, chunk)
    if average == "saliency":
        return out
    return _aggregate(out[0], out[1], size, **kw)[0]


# ----------------------------------------------------------------------------------------------------------------
# Registry
# ----------------------------------------------------------------------------------------------------------------

SALIENCY_METHODS: dict[str, Callable[..., Array]] = {
    "random": random_saliency,
    "gradient": input_gradient,
    "grad_x_input": gradient_x_input,
    "integrated_gradients": integrated_gradients,
    "smoothgrad": smoothgrad,
    "smoothgrad_sq": smoothgrad_squared,
    "vargrad": vargrad,
    "guided_backprop": guided_backprop,
    "gradcam": gradcam,
    "fullgrad": fullgrad,
    "fullgrad_noabs": fullgrad_noabs,
    "fullgrad_simple": fullgrad_simple,
    "smooth_fullgrad": smooth_fullgrad,
}
"""Every method as ``method(model, x, target=PREDICTED, *, key=None, **options) -> [B, H, W]``."""

STOCHASTIC_METHODS = frozenset({"random", "smoothgrad", "smoothgrad_sq", "vargrad", "smooth_fullgrad"})
"""Methods that need ``key``."""

INTERNAL_METHODS = frozenset({"guided_backprop", "gradcam", "fullgrad", "fullgrad_noabs", "fullgrad_simple",
                              "smooth_fullgrad"})
"""Methods that need a :class:`ModelHandle` (the others also take a plain logits callable)."""


def get_method(name: str) -> Callable[..., Array]:
    """The saliency function registered under ``name`` (see :data:`SALIENCY_METHODS`)."""
    try:
        return SALIENCY_METHODS[name]
    except KeyError:
        raise ValueError(f"unknown saliency method {name!r}; choose one of {', '.join(SALIENCY_METHODS)}.") from None


def compute_saliency(name: str, model, x: Array, target: Target = PREDICTED, *, key=None, **options) -> Array:
    """``SALIENCY_METHODS[name](model, x, target, key=key, **options)``."""
    return get_method(name)(model, x, target, key=key, **options)
