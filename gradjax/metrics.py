"""Saliency evaluation (thesis §3.5, §3.10, §5.5.2): pixel perturbation, remove-and-retrain (ROAR), its leak-free
variant ROAD (Rong et al. 2022), digit flipping and the model-randomization sanity check.

Conventions: images ``x`` are ``[B, H, W, C]``; saliency maps are ``[B, H, W]`` (one score per pixel, as
returned by every method of :mod:`gradjax.saliency`); a *pixel* is a spatial location with all its channels.
``logits_fn`` is a plain ``logits_fn(x) -> [B, K]`` callable (or a :class:`gradjax.model.ModelHandle`).
The masking and scoring functions are pure and jittable (the removal ``fraction`` may be a traced scalar) and never
jit themselves; the caller jits, e.g.::

    curve_fn = jax.jit(lambda x, s: pixel_perturbation(handle, x, s, [0.1, 0.5, 0.9]))

The experiment drivers (:func:`roar`, :func:`sanity_check`) are plain Python loops around them; pass them
functions you jitted (``sanity_check``'s ``saliency_fn``, ``roar``'s ``train_and_evaluate``).
"""
from __future__ import annotations

from typing import Any, Callable, Mapping, NamedTuple, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from gradjax import _validation as V
from gradjax._chunking import auto_chunk
from gradjax.gradients import PREDICTED, resolve_target, select
from gradjax.model import ModelHandle, as_logits_fn, module_calls, require_handle

Array = jax.Array
Fill = Union[str, float, Array]

__all__ = [
    "FILLS", "OUTPUTS", "removal_mask", "remove_pixels", "random_saliency_like",
    "PerturbationCurve", "perturbation_scores", "pixel_perturbation",
    "RoarResult", "roar", "roar_random_baseline", "RoarSeparation", "roar_separation",
    "ROAD_NEIGHBOURS", "ROAD_ORDERS", "road_impute", "RoadResult", "road",
    "DigitFlipResult", "digit_flip", "digit_flip_with_method",
    "module_order", "cascading_randomization", "rank_correlation", "ssim", "SanityCheckResult", "sanity_check",
]

FILLS = ("mean", "zero", "black")
"""Named fills for removed pixels: ``"mean"`` = the image's own per-channel mean; ``"zero"``/``"black"`` = 0.
A float or an array broadcastable to ``[B, 1, 1, C]`` (e.g. a dataset's per-channel mean, or the normalized value
of a black pixel ``-mean/std``) is used as given."""

OUTPUTS = ("logit", "probability", "accuracy")
"""What :func:`pixel_perturbation` measures."""


# ----------------------------------------------------------------------------------------------------------------
# Boundary checks
# ----------------------------------------------------------------------------------------------------------------

def _check_maps(x, saliency, name: str = "saliency") -> Array:
    V.check_images(x, "x")
    if not hasattr(saliency, "shape"):
        saliency = jnp.asarray(saliency)
    V.check_rank(saliency, 3, name, "one score per pixel [B, H, W]")
    V.check_floating(saliency, name)
    V.check_finite(saliency, name)
    if tuple(saliency.shape) != tuple(x.shape[:3]):
        raise ValueError(f"{name} must have shape [B, H, W] = {tuple(x.shape[:3])} to match x {tuple(x.shape)}; "
                         f"got {tuple(saliency.shape)}.")
    return saliency


def _check_fraction(fraction, name: str = "fraction"):
    if V.is_concrete(fraction):
        arr = np.asarray(fraction, dtype=np.float64)
        if arr.size == 0 or not np.all(np.isfinite(arr)) or arr.min() < 0 or arr.max() > 1:
            raise ValueError(f"{name} must lie in [0, 1]; got {arr.tolist() if arr.size < 20 else arr}.")


def _fill_value(x: Array, fill: Fill) -> Array:
    if isinstance(fill, str):
        if fill == "mean":
            return jnp.mean(x, axis=(1, 2), keepdims=True)
        if fill in ("zero", "black"):
            return jnp.zeros((1, 1, 1, x.shape[-1]), x.dtype)
        raise ValueError(f"fill must be one of {FILLS}, a number or an array broadcastable to [B, 1, 1, C]; "
                         f"got {fill!r}.")
    f = jnp.asarray(fill, x.dtype)
    if f.ndim == 1:
        f = f.reshape(1, 1, 1, -1)
    target = (x.shape[0], 1, 1, x.shape[-1])
    try:
        ok = f.ndim <= 4 and jnp.broadcast_shapes(f.shape, target) == target
    except ValueError:
        ok = False
    if not ok:
        raise ValueError(f"fill of shape {f.shape} must broadcast to [B, 1, 1, C] = {target}.")
    V.check_finite(f, "fill")
    return f


# ----------------------------------------------------------------------------------------------------------------
# Pixel removal
# ----------------------------------------------------------------------------------------------------------------

def removal_mask(saliency: Array, fraction, *, most_salient: bool = True) -> Array:
    """Boolean mask ``[B, H, W]`` of the ``n = round(fraction * H * W)`` most (or least) salient pixels of each
    map. Ties are broken by position (row-major, earlier first) in both orders. ``fraction`` may be traced."""
    if jnp.ndim(saliency) != 3:
        raise ValueError(f"saliency must be [B, H, W]; got shape {tuple(jnp.shape(saliency))}.")
    _check_fraction(fraction)
    B, H, W = saliency.shape
    n = jnp.round(jnp.asarray(fraction, jnp.float32) * (H * W)).astype(jnp.int32)
    s = saliency.reshape(B, H * W)
    order = jnp.argsort(-s if most_salient else s, axis=1, stable=True)
    ranks = jnp.argsort(order, axis=1)
    return (ranks < n).reshape(B, H, W)


def remove_pixels(x: Array, saliency: Array, fraction, *, most_salient: bool = True, fill: Fill = "mean") -> Array:
    """Replace the ``fraction`` most (``most_salient=True``, ROAR §3.5.2) or least (pixel perturbation §3.5.1)
    salient pixels of each image by ``fill`` (all channels of a pixel together).

    Args:
      x: ``[B, H, W, C]``. saliency: ``[B, H, W]``. fraction: scalar in [0, 1] (may be traced).
      fill: ``"mean"`` (the image's per-channel mean over all its pixels, Hooker et al.'s ROAR and thesis
        §5.5.2), ``"zero"``/``"black"`` (thesis §3.5.1: "black pixels" — 0 in raw [0, 1] pixel space; for
        normalized data pass the normalized black value ``-mean/std``), a number, or an array broadcastable to
        ``[B, 1, 1, C]``.

    Returns ``x'`` with the shape of ``x``.
    """
    saliency = _check_maps(x, saliency)
    mask = removal_mask(saliency, fraction, most_salient=most_salient)
    return jnp.where(mask[..., None], _fill_value(x, fill), x)


def random_saliency_like(key, x: Array) -> Array:
    """i.i.d. ``U(0, 1)`` scores ``[B, H, W]``: ranking by them removes pixels uniformly at random (the random
    baseline of §3.5.1 / §3.5.2)."""
    V.check_images(x, "x")
    return jax.random.uniform(key, x.shape[:3], dtype=x.dtype)


# ----------------------------------------------------------------------------------------------------------------
# Pixel perturbation (§3.5.1, §3.10.2, §5.5.2)
# ----------------------------------------------------------------------------------------------------------------

class PerturbationCurve(NamedTuple):
    """Per-example scores for each removal fraction.

    Attributes:
      fractions: ``[F]``.
      values: ``[F, B]`` — ``|g(x') - g(x)| / |g(x)|`` (``output="logit"`` / ``"probability"``) or 0/1 correctness
        (``output="accuracy"``).
    """

    fractions: Array
    values: Array

    @property
    def mean(self) -> Array:
        """``[F]`` mean over examples (for ``"accuracy"``: the accuracy)."""
        return jnp.mean(self.values, axis=1)

    @property
    def std(self) -> Array:
        """``[F]`` standard deviation over examples (as the ± of thesis Table 3.2)."""
        return jnp.std(self.values, axis=1)


def _check_output(output: str):
    if output not in OUTPUTS:
        raise ValueError(f"output must be one of {OUTPUTS}; got {output!r}.")


def perturbation_scores(logits_fn, x: Array, saliency: Array, fraction, *, most_salient: bool = False,
                        fill: Fill = 0.0, output: str = "logit", target=PREDICTED, labels=None,
                        floor: Optional[float] = None) -> Array:
    """Scores ``[B]`` of one pixel-perturbation step (thesis §3.5.1): remove the ``fraction`` least salient
    pixels (``most_salient=True``: most salient) and compare the model before and after.

    * ``output="logit"``: ``|f_t(x') - f_t(x)| / |f_t(x)|``, the absolute fractional output change of the
      target class ``t`` (default :data:`PREDICTED`: "the most confident class" at ``x``). Lower is better when
      removing the least salient pixels.
    * ``output="probability"``: the same with ``softmax(f)_t``.
    * ``output="accuracy"``: ``1[argmax f(x') == labels]`` (the *discriminative pixel perturbation* of §5.5.2;
      ``labels`` default to the predictions at ``x``, measuring agreement).

    ``|f_t(x)|`` is floored at ``floor`` (default: the dtype's smallest normal) so a zero output does not give NaN.
    Jittable, ``fraction`` may be traced.
    """
    _check_output(output)
    saliency = _check_maps(x, saliency)
    f = as_logits_fn(logits_fn)
    x_rm = remove_pixels(x, saliency, fraction, most_salient=most_salient, fill=fill)
    logits = f(x)
    if jnp.ndim(logits) != 2 or logits.shape[0] != x.shape[0]:
        raise ValueError(f"logits_fn must return [B, K] logits; got shape {tuple(jnp.shape(logits))}.")
    logits_rm = f(x_rm)
    if output == "accuracy":
        ref = jnp.argmax(logits, axis=-1) if labels is None else jnp.asarray(labels)
        if labels is not None:
            V.check_labels(ref, logits.shape[1], x.shape[0], "labels")
        return (jnp.argmax(logits_rm, axis=-1) == ref).astype(x.dtype)
    t = resolve_target(logits, target)
    if output == "probability":
        logits, logits_rm = jax.nn.softmax(logits, -1), jax.nn.softmax(logits_rm, -1)
    before, after = select(logits, t), select(logits_rm, t)
    floor = float(jnp.finfo(before.dtype).tiny) if floor is None else floor
    return jnp.abs(after - before) / jnp.maximum(jnp.abs(before), floor)


def pixel_perturbation(logits_fn, x: Array, saliency: Array, fractions: Sequence[float], *,
                       most_salient: bool = False, fill: Fill = 0.0, output: str = "logit", target=PREDICTED,
                       labels=None) -> PerturbationCurve:
    """The pixel-perturbation curve over removal fractions (thesis §3.5.1 / Fig. 3.2a, Table 3.2 (RF = removal
    fraction), §5.5.2): :func:`perturbation_scores` for every ``k`` in ``fractions``, evaluated with
    :func:`jax.lax.map` (one compiled step, memory of one fraction at a time). Jittable.

    Defaults follow §3.5.1: remove the *least* salient pixels, fill with black (0), measure the absolute
    fractional change of the top-class logit. For the random baseline pass
    ``saliency=random_saliency_like(key, x)``.
    """
    saliency = _check_maps(x, saliency)
    fr = jnp.atleast_1d(jnp.asarray(fractions, jnp.float32))
    if fr.ndim != 1:
        raise ValueError(f"fractions must be a 1-D sequence; got shape {fr.shape}.")
    _check_fraction(fr, "fractions")
    _check_output(output)

    def one(k):
        return perturbation_scores(logits_fn, x, saliency, k, most_salient=most_salient, fill=fill,
                                   output=output, target=target, labels=labels)

    return PerturbationCurve(fr, lax.map(one, fr))


# ----------------------------------------------------------------------------------------------------------------
# ROAR (§3.5.2)
# ----------------------------------------------------------------------------------------------------------------

class RoarResult(NamedTuple):
    """``fractions [F]`` and the retrained model's test ``accuracies [F]`` (Python floats)."""

    fractions: tuple
    accuracies: tuple


def _remove_in_chunks(images, maps, fraction, most_salient, fill, chunk, memory_budget):
    """:func:`remove_pixels` on ``chunk`` images per call (``None``: sized from ``memory_budget``, as
    :func:`gradjax._chunking.auto_chunk`)."""
    def remove(xs):
        return remove_pixels(xs[0], xs[1], jnp.float32(fraction), most_salient=most_salient, fill=fill)

    n = images.shape[0]
    if chunk is None:
        chunk = auto_chunk(remove, (jnp.asarray(images[:1]), jnp.asarray(maps[:1])), n, memory_budget)
    out = [np.asarray(remove((jnp.asarray(images[i:i + chunk]), jnp.asarray(maps[i:i + chunk]))))
           for i in range(0, n, chunk)]
    return np.concatenate(out, axis=0)


def roar(train_and_evaluate: Callable[[Any, Any, Any, Any], float], train_images, train_labels, test_images,
         test_labels, train_saliency, test_saliency, fractions: Sequence[float], *, most_salient: bool = True,
         fill: Fill = "mean", chunk: Optional[int] = None, memory_budget: Optional[int] = None) -> RoarResult:
    """RemOve And Retrain (Hooker et al. 2019; thesis §3.5.2, Fig. 3.2b).

    For every ``k`` in ``fractions``: replace the top-``k`` most salient pixels of *every* train and test image
    (saliency of the original model, computed once by the caller) by ``fill`` (default: the image's per-channel
    mean), call ``train_and_evaluate(train_images', train_labels, test_images', test_labels) -> accuracy`` to
    retrain a fresh model on the modified train set and measure its accuracy on the modified test set. Lower is
    better (the map found the important pixels). ``k = 0`` gives the unmodified baseline. The training engine is
    the caller's (e.g. a closure over :mod:`gradjax.train`).

    Args:
      train_saliency: ``[N, H, W]`` maps of the train images.
      test_saliency: ``[N, H, W]`` maps of the test images.
      chunk: images masked per call (memory bound for large datasets); ``None`` (default): as many as
        ``memory_budget`` bytes allow (``None``: :data:`gradjax._chunking.DEFAULT_MEMORY_BUDGET`), the policy of
        :mod:`gradjax._chunking`. The result does not depend on either.

    Returns :class:`RoarResult`. For the random baseline use :func:`roar_random_baseline`.
    """
    train_images, test_images = np.asarray(train_images), np.asarray(test_images)
    for imgs, maps, name in ((train_images, train_saliency, "train_saliency"),
                             (test_images, test_saliency, "test_saliency")):
        _check_maps(imgs[:1], np.asarray(maps)[:1], name)
        if np.shape(maps)[0] != imgs.shape[0]:
            raise ValueError(f"{name} has {np.shape(maps)[0]} maps for {imgs.shape[0]} images.")
        V.check_finite(np.asarray(maps), name)
    V.check_finite(train_images, "train_images")
    V.check_finite(test_images, "test_images")
    fr = [float(k) for k in fractions]
    _check_fraction(np.asarray(fr), "fractions")
    chunk = None if chunk is None else V.check_count(chunk, "chunk")
    memory_budget = None if memory_budget is None else V.check_count(memory_budget, "memory_budget")
    accs = []
    for k in fr:
        tr = _remove_in_chunks(train_images, np.asarray(train_saliency), k, most_salient, fill, chunk, memory_budget)
        te = _remove_in_chunks(test_images, np.asarray(test_saliency), k, most_salient, fill, chunk, memory_budget)
        accs.append(float(train_and_evaluate(tr, train_labels, te, test_labels)))
    return RoarResult(tuple(fr), tuple(accs))


def roar_random_baseline(train_and_evaluate, train_images, train_labels, test_images, test_labels,
                         fractions: Sequence[float], *, key, fill: Fill = "mean",
                         chunk: Optional[int] = None, memory_budget: Optional[int] = None) -> RoarResult:
    """ROAR with pixels removed uniformly at random (the random baseline of §3.5.2); ``chunk``,
    ``memory_budget``: as :func:`roar`."""
    k1, k2 = jax.random.split(key)
    train_images, test_images = np.asarray(train_images), np.asarray(test_images)
    V.check_images(train_images[:1], "train_images")
    V.check_images(test_images[:1], "test_images")
    s_tr = np.asarray(jax.random.uniform(k1, train_images.shape[:3]))
    s_te = np.asarray(jax.random.uniform(k2, test_images.shape[:3]))
    return roar(train_and_evaluate, train_images, train_labels, test_images, test_labels, s_tr, s_te, fractions,
                most_salient=True, fill=fill, chunk=chunk, memory_budget=memory_budget)


class RoarSeparation(NamedTuple):
    """How far apart ROAR puts the methods, per removal fraction (arrays ``[F]``): ``spread`` (range of the method
    means in pooled seed stds), ``separated_pairs`` (method pairs whose means differ by more than ``threshold``
    pooled stds, out of ``n_pairs``) and ``pooled_std``."""

    spread: np.ndarray
    separated_pairs: np.ndarray
    pooled_std: np.ndarray
    n_pairs: int
    threshold: float


def roar_separation(accuracies: Mapping[str, Any], *, threshold: float = 2.0) -> RoarSeparation:
    """How well ROAR separates methods, measured against the retraining-seed noise.

    ``accuracies[m]`` is method ``m``'s ROAR test accuracy ``[S, F]`` (``S >= 2`` retraining seeds, ``F``
    removal fractions; every method the same shape). With ``mu_m(f)`` the mean over seeds and ``var_m(f)`` the
    unbiased (ddof = 1) variance over seeds, at each fraction ``f``::

        s_p(f)             = sqrt( (1/M) sum_m var_m(f) )                        (pooled seed std, M methods)
        spread(f)          = ( max_m mu_m(f) - min_m mu_m(f) ) / s_p(f)
        separated_pairs(f) = #{ m < m' : |mu_m(f) - mu_m'(f)| > threshold * s_p(f) }

    Both are invariant to a common shift or positive scaling of all accuracies. A dataset on which ROAR separates
    methods better has larger values. Where ``s_p(f) = 0`` the spread is ``inf`` (``nan`` if the means are also
    equal) and every pair with different means counts as separated.
    """
    if not isinstance(accuracies, Mapping) or len(accuracies) < 2:
        raise ValueError(f"accuracies must map at least two method names to [seeds, fractions] arrays; got "
                         f"{type(accuracies).__name__} with {len(accuracies) if hasattr(accuracies, '__len__') else 0} "
                         f"entries.")
    if not (np.isfinite(threshold) and threshold > 0):
        raise ValueError(f"threshold must be a positive number of pooled stds; got {threshold!r}.")
    arrays = {m: np.asarray(a, np.float64) for m, a in accuracies.items()}
    shape = next(iter(arrays.values())).shape
    for m, a in arrays.items():
        if a.ndim != 2 or a.shape[0] < 2:
            raise ValueError(f"accuracies[{m!r}] must be [seeds, fractions] with at least 2 seeds (the seed std "
                             f"is the noise scale); got shape {a.shape}.")
        if a.shape != shape:
            raise ValueError(f"every method needs the same [seeds, fractions] shape; accuracies[{m!r}] has "
                             f"{a.shape}, the first method {shape}.")
        if not np.all(np.isfinite(a)):
            raise ValueError(f"accuracies[{m!r}] contains non-finite values.")
    stack = np.stack(list(arrays.values()))  # [M, S, F]
    means = stack.mean(axis=1)  # [M, F]
    pooled = np.sqrt(stack.var(axis=1, ddof=1).mean(axis=0))  # [F]
    gaps = np.abs(means[:, None, :] - means[None, :, :])  # [M, M, F]
    upper = np.triu(np.ones(gaps.shape[:2], bool), k=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        spread = (means.max(axis=0) - means.min(axis=0)) / pooled
    separated = (gaps > threshold * pooled)[upper].sum(axis=0)
    return RoarSeparation(spread, separated.astype(np.int64), pooled, int(upper.sum()), float(threshold))


# ----------------------------------------------------------------------------------------------------------------
# ROAD: RemOve And Debias (Rong et al., ICML 2022) — ROAR without the mask's class leak
# ----------------------------------------------------------------------------------------------------------------

ROAD_NEIGHBOURS = (((-1, -1), 1 / 12), ((-1, 0), 1 / 6), ((-1, 1), 1 / 12), ((0, -1), 1 / 6),
                   ((0, 1), 1 / 6), ((1, -1), 1 / 12), ((1, 0), 1 / 6), ((1, 1), 1 / 12))
"""The 8-neighbourhood of ROAD's noisy linear imputation (Rong et al. 2022, §4): ``((dy, dx), weight)``, 1/6 for
the 4 direct and 1/12 for the 4 diagonal neighbours (they sum to 1)."""

ROAD_ORDERS = ("morf", "lerf")
"""Removal orders of :func:`road`: most relevant first (MoRF) and least relevant first (LeRF)."""


def _road_solve(images: np.ndarray, removed: np.ndarray) -> np.ndarray:
    """The noise-free linear imputation of :func:`road_impute` for images ``[B, H, W, C]`` and a boolean mask
    ``[B, H, W]`` (``True`` = removed; no image fully removed): one block-diagonal sparse solve."""
    from scipy import sparse
    from scipy.sparse.linalg import spsolve

    B, H, W, C = images.shape
    out = images.astype(np.float64, copy=True).reshape(B, H * W, C)
    rem = removed.reshape(B, H * W)
    bi, pi = np.nonzero(rem)  # the unknowns: (image, flat pixel), row-major
    n = bi.size
    if n == 0:
        return out.reshape(images.shape)
    var = np.full((B, H * W), -1, np.int64)
    var[bi, pi] = np.arange(n)
    r, c = np.divmod(pi, W)
    diag = np.zeros(n)
    rhs = np.zeros((n, C))
    rows, cols, vals = [], [], []
    for (dy, dx), w in ROAD_NEIGHBOURS:
        rr, cc = r + dy, c + dx
        inside = (rr >= 0) & (rr < H) & (cc >= 0) & (cc < W)
        eq = np.nonzero(inside)[0]
        b, q = bi[inside], rr[inside] * W + cc[inside]
        diag[eq] += w
        unknown = rem[b, q]
        kept = ~unknown
        rhs[eq[kept]] += w * out[b[kept], q[kept]]  # each equation appears at most once per offset
        rows.append(eq[unknown])
        cols.append(var[b[unknown], q[unknown]])
        vals.append(np.full(int(unknown.sum()), -w))
    rows.append(np.arange(n))
    cols.append(np.arange(n))
    vals.append(diag)
    A = sparse.csc_matrix((np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))), shape=(n, n))
    # row-major (natural) order keeps each image's factor banded (bandwidth W + 1): ~2x faster than COLAMD on
    # 28x28 digits; fill-reducing COLAMD for wide images, where the band grows as W^2 per pixel
    sol = spsolve(A, rhs, permc_spec="NATURAL" if W <= 64 else "COLAMD")
    out[bi, pi] = np.asarray(sol).reshape(n, C)
    return out.reshape(images.shape)


def road_impute(images, masks, *, key, noise_std: float = 0.01, chunk: int = 256) -> np.ndarray:
    """ROAD's noisy linear imputation of removed pixels (Rong et al., "A Consistent and Efficient Evaluation
    Strategy for Attribution Methods", ICML 2022, §4, their ``NoisyLinearImputer``).

    Each removed pixel ``i`` (all channels, each channel separately) is set to the weighted mean of its in-image
    8-neighbours ``N(i)`` with weights ``w`` of :data:`ROAD_NEIGHBOURS` (1/6 direct, 1/12 diagonal)::

        ( sum_{j in N(i)} w_ij ) x_i  -  sum_{j in N(i), j removed} w_ij x_j  =  sum_{j in N(i), j kept} w_ij x_j

    solved jointly for all removed pixels of an image (a removed pixel's neighbours may be removed too: a sparse
    linear system, the discrete Laplace equation with the kept pixels as boundary values), then
    ``x_i <- x_i + noise_std * eps_i``, ``eps_i ~ N(0, 1)`` i.i.d. per pixel and channel. Kept pixels are returned
    unchanged. Unlike a constant fill (ROAR, :func:`remove_pixels`), the imputed region continues the surrounding
    image smoothly, so the *shape* of the removal mask is hard to read from the result (the class leak Rong et al.
    measure, and docs/RESULTS.md measured for ROAR on the digits). The imputed region is smoother than the image,
    so on rough textures (e.g. white noise) a probe of local roughness can still read the mask; on smooth images
    neither a linear nor a roughness probe does (``tests/test_road.py``). Where every pixel of an image is removed the
    system has no boundary; those images are set to ``0`` plus the noise.

    Host function (numpy + ``scipy.sparse.linalg.spsolve``, one block-diagonal solve per ``chunk`` images); not
    jittable.

    Args:
      images: ``[B, H, W, C]`` float. masks: ``[B, H, W]`` boolean, ``True`` = removed (e.g. :func:`removal_mask`).
      key: PRNG key of the noise. noise_std: std of the added noise in the units of ``images`` (the paper's 0.01
        is ~1 % of the value range of its inputs; rescale for other ranges); ``0`` gives the exact solution.
      chunk: images per sparse solve.

    Returns the imputed images as a numpy array of ``images``' dtype.
    """
    images = np.asarray(images)
    V.check_images(images, "images")
    masks = np.asarray(masks)
    if masks.dtype != np.bool_:
        raise ValueError(f"masks must be boolean [B, H, W] (True = removed); got dtype {masks.dtype}.")
    if masks.shape != images.shape[:3]:
        raise ValueError(f"masks must have shape [B, H, W] = {images.shape[:3]} to match images; got {masks.shape}.")
    if not (np.isfinite(noise_std) and noise_std >= 0):
        raise ValueError(f"noise_std must be a finite number >= 0; got {noise_std!r}.")
    V.check_key(key, "road_impute")
    chunk = V.check_count(chunk, "chunk")
    B, H, W, C = images.shape
    full = masks.reshape(B, -1).all(axis=1)
    out = np.empty(images.shape, np.float64)
    out[full] = 0.0
    idx = np.nonzero(~full)[0]
    for s in range(0, idx.size, chunk):
        sel = idx[s:s + chunk]
        out[sel] = _road_solve(images[sel], masks[sel])
    if noise_std > 0:
        eps = np.asarray(jax.random.normal(key, images.shape, jnp.float32), np.float64)
        out = np.where(masks[..., None], out + noise_std * eps, out)
    out = out.astype(images.dtype)
    out[~masks] = images[~masks]  # kept pixels bit-for-bit
    return out


class RoadResult(NamedTuple):
    """``fractions [F]``, the fixed model's ``accuracies [F]`` on the imputed test images (Python floats) and the
    removal ``order`` (``"morf"`` / ``"lerf"``)."""

    fractions: tuple
    accuracies: tuple
    order: str


def road(model, images, labels, saliency_maps, *, fractions: Sequence[float], order: str = "morf", key,
         noise_std: float = 0.01, batch_size: int = 256, chunk: int = 256) -> RoadResult:
    """ROAD (Rong et al., ICML 2022): remove pixels by saliency, impute them with :func:`road_impute` (noisy
    linear imputation, which hides the removal mask's shape) and measure the accuracy of the *fixed* model — no
    retraining. The leak-free counterpart of :func:`roar` (thesis §3.5.2, Fig. 3.2b).

    For every ``k`` in ``fractions``, with ``M_k`` the ``round(k * H * W)`` most (``order="morf"``, most relevant
    first) or least (``order="lerf"``, least relevant first) salient pixels of each map (:func:`removal_mask`)::

        acc(k) = mean_n [ argmax_c model(impute(x_n, M_k(s_n)))_c == y_n ]

    MoRF: lower is better (the map found the pixels the model needs); LeRF: higher is better. A random map
    (:func:`random_saliency_like`) gives the random-order baseline. Each fraction uses the noise key
    ``fold_in(key, index of k)``.

    Args:
      model: logits callable ``[B, H, W, C] -> [B, K]`` (jit it yourself) or a :class:`~gradjax.model.ModelHandle`.
      images: ``[N, H, W, C]``. labels: ``[N]`` int. saliency_maps: ``[N, H, W]``.
      fractions: removal fractions in ``[0, 1]``. key: PRNG key of the imputation noise. noise_std: as
        :func:`road_impute`. batch_size: images per model call (the last batch is padded, so one jitted shape
        serves all). chunk: images per sparse solve.

    Returns :class:`RoadResult`.
    """
    logits_fn = as_logits_fn(model)
    V.check_choice(order, ROAD_ORDERS, "order")
    V.check_key(key, "road")
    images = np.asarray(images)
    V.check_images(images, "images")
    maps = np.asarray(saliency_maps)
    V.check_floating(maps, "saliency_maps")
    if maps.shape != images.shape[:3]:
        raise ValueError(f"saliency_maps must have shape [N, H, W] = {images.shape[:3]}; got {maps.shape}.")
    V.check_finite(maps, "saliency_maps")
    labels = np.asarray(labels)
    V.check_labels(labels, None, images.shape[0], "labels")
    fr = [float(k) for k in fractions]
    if not fr:
        raise ValueError("fractions must contain at least one removal fraction.")
    _check_fraction(np.asarray(fr), "fractions")
    batch_size = V.check_count(batch_size, "batch_size")
    N = images.shape[0]
    accs = []
    for i, k in enumerate(fr):
        masks = np.asarray(removal_mask(jnp.asarray(maps), jnp.float32(k), most_salient=(order == "morf")))
        x = road_impute(images, masks, key=jax.random.fold_in(key, i), noise_std=noise_std, chunk=chunk)
        correct = 0
        for s in range(0, N, batch_size):
            xb = x[s:s + batch_size]
            m = xb.shape[0]
            if m < batch_size:
                xb = np.concatenate([xb, np.zeros((batch_size - m,) + xb.shape[1:], xb.dtype)])
            pred = np.asarray(jnp.argmax(logits_fn(jnp.asarray(xb)), axis=-1))[:m]
            correct += int((pred == labels[s:s + m]).sum())
        accs.append(correct / N)
    return RoadResult(tuple(fr), tuple(accs), order)


# ----------------------------------------------------------------------------------------------------------------
# Digit flipping (§3.10.1, Table 3.1; Shrikumar et al. 2017)
# ----------------------------------------------------------------------------------------------------------------

class DigitFlipResult(NamedTuple):
    """Result of :func:`digit_flip` (arrays ``[B]`` unless noted).

    Attributes:
      delta_log_odds: ``log_odds_before - log_odds_after`` — the drop of ``log p_source / p_target`` caused by the
        erasure; larger is better (thesis Table 3.1).
      log_odds_before, log_odds_after: ``f_source - f_target`` (= ``log p_s / p_t`` under softmax).
      flipped: ``[B, H, W, C]`` the erased images.
      mask: ``[B, H, W]`` the erased pixels.
    """

    delta_log_odds: Array
    log_odds_before: Array
    log_odds_after: Array
    flipped: Array
    mask: Array


def digit_flip(logits_fn, x: Array, saliency_source: Array, saliency_target: Array, *, source: int = 8,
               target: int = 3, budget: float = 0.2, fill: Fill = 0.0, positive_only: bool = True) -> DigitFlipResult:
    """Digit flipping ``source -> target`` (Shrikumar et al. 2017, DeepLIFT §4.2; thesis §3.10.1, Table 3.1).

    With ``S_diff = S_source - S_target`` (saliency maps of the source and the target class for the same image),
    erase (set to ``fill``, default 0 = background) the pixels with the largest ``S_diff`` — the evidence for
    ``source`` over ``target`` — up to ``round(budget * H * W)`` pixels (20 %: 157 of MNIST's 784, as DeepLIFT),
    and only pixels with ``S_diff > 0`` when ``positive_only``. Report the change of the log-odds
    ``log p_source/p_target = f_source - f_target``: ``delta = before - after`` (larger is better).

    Signed maps matter here (thesis §3.6): use ``fullgrad_noabs`` and ``reduce="sum"`` for gradient methods.
    Pure and jittable.
    """
    s_src = _check_maps(x, saliency_source, "saliency_source")
    s_tgt = _check_maps(x, saliency_target, "saliency_target")
    _check_fraction(budget, "budget")
    f = as_logits_fn(logits_fn)
    diff = s_src - s_tgt
    mask = removal_mask(diff, budget, most_salient=True)
    if positive_only:
        mask = mask & (diff > 0)
    flipped = jnp.where(mask[..., None], _fill_value(x, fill), x)
    lb, la = f(x), f(flipped)
    K = lb.shape[-1]
    for c, name in ((source, "source"), (target, "target")):
        if not isinstance(c, (int, np.integer)) or not 0 <= c < K:
            raise ValueError(f"{name} must be a class index in [0, {K}); got {c!r}.")
    before = lb[:, source] - lb[:, target]
    after = la[:, source] - la[:, target]
    return DigitFlipResult(before - after, before, after, flipped, mask)


def digit_flip_with_method(method: Union[str, Callable], model, x: Array, *, key=None, source: int = 8,
                           target: int = 3, budget: float = 0.2, fill: Fill = 0.0, positive_only: bool = True,
                           **options) -> DigitFlipResult:
    """:func:`digit_flip` with the maps of a :mod:`gradjax.saliency` method (name or function) for the classes
    ``source`` and ``target``. ``key`` is split into one key per class: with one shared key a random method
    would give the same map for both classes, whose difference ``S_diff`` is then identically zero."""
    from gradjax.saliency import get_method
    fn = get_method(method) if isinstance(method, str) else method
    B = jnp.shape(x)[0]
    k_src, k_tgt = (None, None) if key is None else jax.random.split(key)
    s_src = fn(model, x, jnp.full((B,), source, jnp.int32), key=k_src, **options)
    s_tgt = fn(model, x, jnp.full((B,), target, jnp.int32), key=k_tgt, **options)
    return digit_flip(model, x, s_src, s_tgt, source=source, target=target, budget=budget, fill=fill,
                      positive_only=positive_only)


# ----------------------------------------------------------------------------------------------------------------
# Model-randomization sanity check (Adebayo et al. 2018; thesis §3.4.1 "full sensitivity to function mapping")
# ----------------------------------------------------------------------------------------------------------------

def module_order(model: ModelHandle, x: Array) -> list[str]:
    """Top-level modules that own parameters, in the order the forward pass runs them (e.g.
    ``["block0", "block1", "block2", "head"]``), from :func:`gradjax.model.module_calls` (shapes only)."""
    handle = require_handle(model, "module_order")
    params = handle.variables.get("params", {})
    order: list[str] = []
    for path, _ in module_calls(handle, x):
        top = path.split("/")[0]
        if top in params and top not in order:
            order.append(top)
    return order


def _get_path(tree, path: str):
    node = tree
    for p in path.split("/"):
        if not isinstance(node, Mapping) or p not in node:
            raise ValueError(f"no parameters at module path {path!r}.")
        node = node[p]
    return node


def _set_path(tree, path: str, value):
    parts = path.split("/")
    new = dict(tree)
    if len(parts) == 1:
        new[parts[0]] = value
    else:
        new[parts[0]] = _set_path(tree[parts[0]], "/".join(parts[1:]), value)
    return new


def _reinit_leaf(z, leaf):
    """Re-draw one leaf from standard normal draws ``z`` (same shape)."""
    if leaf.ndim >= 2:  # kernels: LeCun normal, fan-in = all axes but the last
        fan_in = int(np.prod(leaf.shape[:-1]))
        return (z / np.sqrt(max(fan_in, 1))).astype(leaf.dtype)
    # vectors (biases, BatchNorm scale/shift): a Gaussian with the leaf's own mean and std
    return (jnp.mean(leaf) + jnp.std(leaf) * z).astype(leaf.dtype)


def _reinit_tree(key, tree):
    """Every leaf of ``tree`` re-drawn (one normal draw for the whole subtree, sliced per leaf)."""
    leaves, treedef = jax.tree.flatten(tree)
    sizes = [int(np.size(l)) for l in leaves]
    z = jax.random.normal(key, (max(sum(sizes), 1),), jnp.float32)
    offsets = np.cumsum([0] + sizes)
    new = [_reinit_leaf(z[o:o + n].reshape(jnp.shape(l)), jnp.asarray(l)) for o, n, l in zip(offsets, sizes, leaves)]
    return jax.tree.unflatten(treedef, new)


def cascading_randomization(params, key, *, layers: Sequence[str],
                            init_fn: Optional[Callable[[Any], Any]] = None) -> list[tuple[str, Any]]:
    """Cascading parameter randomization (Adebayo et al. 2018): re-initialize the layers one after another
    **from the output backwards**, keeping earlier re-initializations.

    Args:
      params: the ``'params'`` tree.
      key: ``jax.random`` key.
      layers: module paths (``"/"``-joined, e.g. ``"head"``, ``"block3"``, ``"block3/conv"``) in *forward* order,
        e.g. :func:`module_order`; they are randomized last-to-first.
      init_fn: optional ``key -> fresh params tree`` (e.g. ``lambda k: model.init(k, x)['params']``) whose
        subtrees replace the layers: the model's own initializers. Default: every leaf re-drawn independently —
        kernels (rank >= 2) from LeCun normal ``N(0, 1/fan_in)``, vectors from a Gaussian with the leaf's own
        mean and standard deviation.

    Returns ``[("original", params), (layers[-1], p_1), (layers[-2], p_2), ...]``: stage ``i`` has the last
    ``i`` layers randomized.
    """
    layers = list(layers)
    if not layers:
        raise ValueError("layers must name at least one module path.")
    fresh = init_fn(key) if init_fn is not None else None
    stages = [("original", params)]
    current = params
    for i, path in enumerate(reversed(layers)):
        old = _get_path(current, path)
        if fresh is not None:
            new = _get_path(fresh, path)
        else:
            new = _reinit_tree(jax.random.fold_in(key, i), old)
        current = _set_path(current, path, new)
        stages.append((path, current))
    return stages


def _average_ranks(v: Array) -> Array:
    """Ranks 0..n-1 of a vector with ties given their average rank (as scipy.stats.rankdata, minus 1)."""
    s = jnp.sort(v)
    lo = jnp.searchsorted(s, v, side="left")
    hi = jnp.searchsorted(s, v, side="right")
    return (lo + hi - 1).astype(jnp.float32) / 2


def rank_correlation(a: Array, b: Array, *, absolute: bool = False) -> Array:
    """Spearman rank correlation per example of two map batches ``[B, ...]`` -> ``[B]`` (average ranks for ties,
    as :func:`scipy.stats.spearmanr`; ``absolute=True`` ranks ``|a|`` and ``|b|``). A constant map has correlation
    0 (scipy returns NaN). Jittable."""
    a, b = jnp.asarray(a), jnp.asarray(b)
    if a.shape != b.shape or a.ndim < 2:
        raise ValueError(f"a and b must be map batches of the same shape [B, ...]; got {a.shape} and {b.shape}.")
    return _spearman(a.reshape(a.shape[0], -1), b.reshape(b.shape[0], -1), absolute)


def _spearman(a, b, absolute):
    if absolute:
        a, b = jnp.abs(a), jnp.abs(b)
    ra, rb = jax.vmap(_average_ranks)(a), jax.vmap(_average_ranks)(b)
    ra = ra - ra.mean(axis=1, keepdims=True)
    rb = rb - rb.mean(axis=1, keepdims=True)
    den = jnp.sqrt(jnp.sum(ra * ra, axis=1) * jnp.sum(rb * rb, axis=1))
    return jnp.where(den > 0, jnp.sum(ra * rb, axis=1) / jnp.where(den > 0, den, 1), 0.0)


def ssim(a: Array, b: Array, *, window: int = 7, sigma: float = 1.5) -> Array:
    """Structural similarity (Wang et al. 2004) per example of two map batches ``[B, H, W]`` -> ``[B]``.

    Each map is first min-max normalized to [0, 1] (data range 1, ``C1 = 0.01^2``, ``C2 = 0.03^2``); local
    statistics use a Gaussian window of size ``min(window, H, W)`` (made odd) with std ``sigma``, valid
    positions only; the result is the mean SSIM over positions. Jittable.
    """
    a, b = jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32)
    if a.shape != b.shape or a.ndim != 3:
        raise ValueError(f"a and b must be map batches [B, H, W] of the same shape; got {a.shape} and {b.shape}.")
    return _ssim(a, b, int(window), float(sigma))


def _ssim(a, b, window, sigma):

    def norm(m):
        lo = m.min(axis=(1, 2), keepdims=True)
        rng = m.max(axis=(1, 2), keepdims=True) - lo
        return jnp.where(rng > 0, (m - lo) / jnp.where(rng > 0, rng, 1), 0.0)

    a, b = norm(a), norm(b)
    w = min(int(window), a.shape[1], a.shape[2])
    w = w if w % 2 == 1 else w - 1
    g = np.exp(-0.5 * ((np.arange(w) - (w - 1) / 2) / sigma) ** 2)
    k2 = jnp.asarray(np.outer(g, g) / np.outer(g, g).sum(), jnp.float32)[:, :, None, None]

    def filt(m):
        return lax.conv_general_dilated(m[..., None], k2, (1, 1), "VALID",
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))[..., 0]

    mu_a, mu_b = filt(a), filt(b)
    saa = filt(a * a) - mu_a ** 2
    sbb = filt(b * b) - mu_b ** 2
    sab = filt(a * b) - mu_a * mu_b
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    s = ((2 * mu_a * mu_b + c1) * (2 * sab + c2)) / ((mu_a ** 2 + mu_b ** 2 + c1) * (saa + sbb + c2))
    return s.mean(axis=(1, 2))


class SanityCheckResult(NamedTuple):
    """Attributes: ``stages`` (names, ``"original"`` first), ``spearman [S, B]``, ``ssim [S, B]`` or ``None``,
    ``maps [S, B, H, W]``."""

    stages: tuple
    spearman: Array
    ssim: Optional[Array]
    maps: Array


def sanity_check(saliency_fn: Callable[[Any, Array], Array], params, key, x: Array, *, layers: Sequence[str],
                 init_fn: Optional[Callable] = None, absolute: bool = False,
                 with_ssim: bool = False) -> SanityCheckResult:
    """Model-randomization sanity check (Adebayo et al. 2018; thesis §3.4.1).

    ``saliency_fn(params, x) -> [B, H, W]`` computes the maps for a parameter tree (e.g.
    ``lambda p, x: fullgrad(ModelHandle(model.apply, {**variables, "params": p}), x, target)`` — fix ``target``
    so every stage explains the same class). For each stage of :func:`cascading_randomization` the maps are
    compared with the original maps by Spearman rank correlation (and SSIM with ``with_ssim``). A method that
    depends on the model shows correlation falling towards 0 as layers are randomized; stage 0 has correlation 1.
    """
    V.check_images(x, "x")
    stages = cascading_randomization(params, key, layers=layers, init_fn=init_fn)
    maps = [jnp.asarray(saliency_fn(p, x)) for _, p in stages]
    for m in maps:
        V.check_finite(m, "saliency")
    ref = maps[0]
    rho = jnp.stack([rank_correlation(ref, m, absolute=absolute) for m in maps])
    s = jnp.stack([ssim(ref, m) for m in maps]) if with_ssim else None
    return SanityCheckResult(tuple(n for n, _ in stages), rho, s, jnp.stack(maps))
