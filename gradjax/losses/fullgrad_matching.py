"""Full-gradient matching and bias-gradient regularization (thesis ch. 4, §4.2, §4.3, §4.4–4.7).

**Bias-gradients.** For a layer ``l`` with bias ``b_l`` the bias-gradient is ``f^b_l(x) = grad_{b_l} f(x) ⊙ b_l``
(§4.1, L1084–1086; the full-gradient representation ``f(x) = grad_x f^T x + sum_l grad_{b_l} f^T b_l``, §4.2).
With ``conv -> BatchNorm -> ReLU`` blocks, ``b_l`` is BatchNorm's folded bias ``beta - gamma mean / sqrt(var + eps)``
(running averages are biases, L1078) plus the convolution's bias, merged into one layer
(:func:`gradjax.fullgrad.full_gradients` with ``merge="conv_bn"``). ``f`` is the correct-class logit (L1358). All
maps of a model come from its bias taps in **one** forward and one backward pass (:func:`bias_gradient_maps`).

**Full-gradient matching** (§4.2, eq. 4.3). For layer pairs ``(l_f, l_g)`` of student ``f`` and teacher ``g``

    l(f, g) = sum_l || psi(f^b_l(x)) - psi(g^b_l(x)) ||_2^2,     psi = normalize(sum_channels(resize(.)))   (eq. 4.3)

``sum_channels`` sums the map over channels (signed by default; ``channel_reduce="abs"`` sums absolute values),
``resize`` brings the smaller map bilinearly to the larger one's spatial size (L1326), ``normalize`` scales each
example's map to unit L2 norm. Pairs are named by module path (``("block0", "block0")``), never by position in a
parameter dict; by default (:func:`default_pairs`) the earliest convolution of each of the three largest spatial
resolutions of each model is used ("three layers at three different spatial resolutions ... early layers",
L1488, L1376).

**Bias-gradient regularization** (§4.3, Proposition 10, L1342). Multiplicative noise ``xi ~ N(1, sigma^2 I)`` on
the biases of a model gives ``E (y - f(x; w, b ⊙ xi))^2 ≈ (y - f)^2 + sigma^2 ||b ⊙ grad_b f||^2``:
:func:`bias_gradient_penalty` is that second term for chosen layers. Its baselines (Table 4.3): weight decay on the
chosen layer's bias parameters (:func:`bias_l2`) and dropout on that layer
(``gradjax.models.VGG(dropout_block=i, dropout_block_rate=p)``; ``experiments/bias_regularization.py``).

**Inside a training loss** (the terms :func:`~gradjax.losses.terms.full_gradient_matching_term`,
:func:`~gradjax.losses.terms.bias_gradient_penalty_term` and :func:`~gradjax.losses.terms.bias_l2_term` of
:mod:`gradjax.losses.terms`): the student's maps come from a frozen-moments pass
(BatchNorm normalizes with the clean train-mode pass's batch moments under ``stop_gradient``: examples independent,
completeness exact), differentiable w.r.t. the student's parameters (double backprop); the teacher runs in eval mode
with its variables from ``ctx.frozen["teacher"]``, and its maps are constants.
"""
from __future__ import annotations

import re
from typing import Any, Literal, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp

from gradjax import fullgrad as F
from gradjax import model as gm
from gradjax.gradients import PREDICTED
from gradjax.imaging import bilinear_upsample
from gradjax.losses.distillation import normalized_gradient_matching
from gradjax.model import ModelHandle

Array = jax.Array
PyTree = Any
Pair = tuple[str, str]
ChannelReduce = Literal["sum", "abs"]
Noise = Literal["parameter", "unit"]

__all__ = ["bias_gradient_maps", "bias_map_shapes", "conv_layers", "default_layers", "default_pairs",
           "channel_map", "full_gradient_matching", "bias_gradient_penalty", "bias_l2"]


# ------------------------------------------------------------------------------------------------ extraction
def bias_gradient_maps(model: ModelHandle, x: Array, target=PREDICTED, *,
                       merge: str = "conv_bn") -> tuple[dict[str, Array], Array]:
    """Bias-gradient maps ``f^b_l = grad_{b_l} f ⊙ b_l`` (thesis §4.1–4.2, eq. 4.3's ``f^b``) of every layer of
    ``model`` for the logit ``target`` of each example, from one forward and one backward pass
    (:func:`gradjax.fullgrad.tap_gradients`).

    Args:
      model: :class:`~gradjax.model.ModelHandle`; its ``apply_kwargs`` select the mode (eval by default; a
        train-mode student uses :meth:`gradjax.losses.terms.TermInputs.student_handle`, a frozen-moments pass).
      x: ``[B, H, W, C]`` input.
      target: ``[B]`` int classes (the correct class, L1358), a scalar, or :data:`~gradjax.gradients.PREDICTED`.
      merge: grouping of bias sites into layers (:data:`gradjax.fullgrad.MERGE_MODES`); ``"conv_bn"`` (default)
        sums a convolution's and its BatchNorm's maps, i.e. uses the folded bias of the merged affine layer.

    Returns:
      ``(maps, target)``: ``{module path: [B, h, w, c] (conv) or [B, c] (Dense)}`` and the resolved ``[B]``
      int32 target. Differentiable w.r.t. the handle's variables.
    """
    taps = F.tap_gradients(model, x, target)
    params = model.variables.get("params", {}) if isinstance(model.variables, Mapping) else {}
    fg = F.decompose(taps, x, merge=merge, params=params)
    return fg.bias_gradients, taps.target


def bias_map_shapes(model: ModelHandle, x, *, merge: str = "conv_bn") -> dict[str, tuple[int, ...]]:
    """``{layer: map shape}`` of :func:`bias_gradient_maps` at ``x``'s shape, computed without running the model
    (:func:`jax.eval_shape`)."""
    xs = jax.ShapeDtypeStruct(jnp.shape(x), jnp.result_type(x))
    spec = jax.eval_shape(lambda h, z: bias_gradient_maps(h, z, 0, merge=merge)[0], model, xs)
    return {k: tuple(v.shape) for k, v in spec.items()}


def _group_paths(layer: str) -> tuple[str, ...]:
    """Module paths that make up a (possibly merged) layer name: ``"s/conv_bn1"`` -> itself, ``"s/conv1"``,
    ``"s/bn1"``; a plain module path -> itself."""
    out = [layer]
    if "conv_bn" in layer:
        out += [layer.replace("conv_bn", "conv"), layer.replace("conv_bn", "bn")]
    return tuple(out)


def _subtree(tree: Mapping, path: str) -> Optional[Any]:
    node: Any = tree
    for part in path.split("/"):
        if not isinstance(node, Mapping) or part not in node:
            return None
        node = node[part]
    return node


def _has_conv_kernel(params: Mapping, layer: str) -> bool:
    for p in _group_paths(layer):
        sub = _subtree(params, p)
        if sub is None:
            continue
        if not isinstance(sub, Mapping):
            continue
        for path, leaf in jax.tree_util.tree_leaves_with_path(sub):
            if str(getattr(path[-1], "key", path[-1])) == "kernel" and jnp.ndim(leaf) == 4:
                return True
    return False


def _natural(s: str):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", s)]


def conv_layers(model: ModelHandle, x, *, merge: str = "conv_bn") -> list[tuple[str, tuple[int, ...]]]:
    """The convolutional layers of ``model`` with their bias-gradient map shapes, ``[(path, (B, h, w, c)), ...]``,
    in forward **call order** (from :func:`gradjax.model.module_calls`, so the order of module definitions or of
    the parameter dict does not matter; ties by natural name order). A layer is convolutional when its map is
    ``[B, h, w, c]`` and its module subtree holds a 4-D ``kernel``; if no map qualifies, every 4-D map does (e.g.
    taps without parameters). Nothing is computed (shape evaluation only)."""
    handle = gm.require_handle(model, "conv_layers")
    shapes = bias_map_shapes(handle, x, merge=merge)
    params = handle.variables.get("params", {}) if isinstance(handle.variables, Mapping) else {}
    four = {k: s for k, s in shapes.items() if len(s) == 4}
    convs = {k: s for k, s in four.items() if _has_conv_kernel(params, k)} or four
    calls = [p for p, _ in gm.module_calls(handle, x)]

    def first_call(layer: str) -> int:
        for i, p in enumerate(calls):
            if any(p == g or p.startswith(g + "/") for g in _group_paths(layer)):
                return i
        return len(calls)

    return sorted(convs.items(), key=lambda kv: (first_call(kv[0]), _natural(kv[0])))


def default_layers(model: ModelHandle, x, *, merge: str = "conv_bn", num_resolutions: int = 3) -> tuple[str, ...]:
    """The earliest convolutional layer (by call order, :func:`conv_layers`) of each of the ``num_resolutions``
    largest spatial resolutions of ``model``, largest resolution first — the layer choice of thesis §4.4.1
    ("three layers at three different spatial resolutions", "matching early layers ... more beneficial", L1488).
    Raises ``ValueError`` when the model has fewer resolutions."""
    if num_resolutions < 1:
        raise ValueError(f"num_resolutions must be >= 1; got {num_resolutions}.")
    layers = conv_layers(model, x, merge=merge)
    by_res: dict[tuple[int, int], str] = {}
    for k, s in layers:
        by_res.setdefault((s[1], s[2]), k)  # call order: the first seen is the earliest
    res = sorted(by_res, key=lambda hw: -hw[0] * hw[1])
    if len(res) < num_resolutions:
        raise ValueError(f"the model has convolutional bias-gradient maps at only {len(res)} spatial resolutions "
                         f"({res}); num_resolutions={num_resolutions}. Pass explicit layer pairs or fewer resolutions.")
    return tuple(by_res[r] for r in res[:num_resolutions])


def default_pairs(student: ModelHandle, teacher: ModelHandle, x, *, merge: str = "conv_bn",
                  num_resolutions: int = 3) -> tuple[Pair, ...]:
    """``((student layer, teacher layer), ...)``: :func:`default_layers` of both models zipped resolution by
    resolution (largest first), thesis §4.4.1. The two models may differ in depth and width."""
    s = default_layers(student, x, merge=merge, num_resolutions=num_resolutions)
    t = default_layers(teacher, x, merge=merge, num_resolutions=num_resolutions)
    return tuple(zip(s, t))


# -------------------------------------------------------------------------------------------- array level
def _check_reduce(channel_reduce: str) -> None:
    if channel_reduce not in ("sum", "abs"):
        raise ValueError(f"channel_reduce must be 'sum' (signed channel sum) or 'abs' (sum of absolute values); got "
                         f"{channel_reduce!r}.")


def channel_map(bias_gradient: Array, *, channel_reduce: ChannelReduce = "sum") -> Array:
    """``sum_channels`` of eq. 4.3's ``psi``: ``[B, h, w, c] -> [B, h, w]`` (signed sum; ``"abs"``: sum of
    absolute values, thesis §4.2's "summing them channel-wise")."""
    _check_reduce(channel_reduce)
    if jnp.ndim(bias_gradient) != 4:
        raise ValueError(f"full-gradient matching compares convolutional bias-gradient maps [B, h, w, c]; got shape "
                         f"{tuple(jnp.shape(bias_gradient))} (a Dense layer?). Choose convolutional layers.")
    m = jnp.abs(bias_gradient) if channel_reduce == "abs" else bias_gradient
    return jnp.sum(m, axis=-1)


def _lookup(maps: Mapping[str, Array], layer: str, who: str) -> Array:
    if layer not in maps:
        raise ValueError(f"unknown {who} layer {layer!r}; the {who}'s bias-gradient layers are {sorted(maps)} (module "
                         "paths; with merge='conv_bn' a VGG conv+BN block is 'block<i>').")
    return maps[layer]


def _check_pairs(pairs) -> tuple[Pair, ...]:
    try:
        pairs = tuple((str(s), str(t)) for s, t in pairs)
    except (TypeError, ValueError):
        raise ValueError(f"pairs must be a sequence of (student_layer, teacher_layer) module paths; got {pairs!r}.") \
            from None
    if not pairs:
        raise ValueError("full-gradient matching needs at least one (student_layer, teacher_layer) pair.")
    return pairs


def full_gradient_matching(student_maps: Mapping[str, Array], teacher_maps: Mapping[str, Array],
                           pairs: Sequence[Pair], *, channel_reduce: ChannelReduce = "sum",
                           align_corners: bool = False) -> Array:
    """Full-gradient matching, thesis §4.2 with eq. 4.3: ``l_b = sum_{(s, t) in pairs} ||psi(f^b_s) - psi(g^b_t)||^2``.

    ``psi = normalize(sum_channels(resize(.)))``: each map ``[B, h, w, c]`` is channel-summed
    (:func:`channel_map`), the smaller of the pair is bilinearly resized to the larger's spatial size (per axis,
    the larger of the two; ``align_corners=False``: half-pixel centres as :func:`jax.image.resize` and PyTorch's
    default), and each example's map is scaled to unit L2 norm (a zero map stays zero, no NaN). Each pair
    contributes a value in ``[0, 4]``.

    Args:
      student_maps, teacher_maps: ``{layer: [B, h, w, c]}`` bias-gradient maps (:func:`bias_gradient_maps`).
      pairs: ``((student_layer, teacher_layer), ...)`` module paths.
    Returns:
      ``[B]``. Invariant to a positive rescaling of either model's output (the maps scale with it).
    """
    pairs = _check_pairs(pairs)
    total = None
    for s, t in pairs:
        a = channel_map(_lookup(student_maps, s, "student"), channel_reduce=channel_reduce)
        b = channel_map(_lookup(teacher_maps, t, "teacher"), channel_reduce=channel_reduce)
        if a.shape[0] != b.shape[0]:
            raise ValueError(f"pair ({s!r}, {t!r}): batch sizes differ ({a.shape[0]} vs {b.shape[0]}).")
        size = (max(a.shape[1], b.shape[1]), max(a.shape[2], b.shape[2]))
        a = bilinear_upsample(a, size, align_corners=align_corners)
        b = bilinear_upsample(b.astype(a.dtype), size, align_corners=align_corners)
        d = normalized_gradient_matching(a, b)
        total = d if total is None else total + d
    return total


def bias_gradient_penalty(maps: Mapping[str, Array], layers: Sequence[str], *, noise: Noise = "parameter") -> Array:
    """Bias-gradient penalty of thesis §4.3, Proposition 10: ``l_b = sum_{l in layers} ||b_l ⊙ grad_{b_l} f(x_b)||^2``.

    Prop. 10: ``E_xi (y - f(x; w, b ⊙ xi))^2 ≈ (y - f)^2 + sigma^2 ||b ⊙ grad_b f||^2`` for ``xi ~ N(1, sigma^2 I)``.

    * ``noise="parameter"`` (default, Prop. 10 as stated): one noise variable per bias *parameter*; a conv bias is
      shared over positions, so ``b ⊙ grad_b f`` is the spatial sum of the map ``f^b_l [B, h, w, c] -> [B, c]``.
    * ``noise="unit"``: independent noise per unit (position and channel): the sum of squares of the whole map.

    Args: ``maps`` from :func:`bias_gradient_maps` (with ``merge="conv_bn"``, ``b`` is the folded bias of the
    conv+BN layer), ``layers`` module paths. Returns ``[B]``.

    Scope of Prop. 10 (checked in ``tests/test_losses_fullgrad.py``): the penalty is exactly
    ``E (f(b ⊙ xi) - f)^2 / sigma^2`` to first order (the Monte-Carlo check at ``y = f`` passes within its
    sampling error). The expansion's cross term ``-2 (y - f) E[f(b ⊙ xi) - f]`` is dropped by the first-order
    argument but is itself of order ``sigma^2`` (``sigma^2/2`` times the trace of the bias Hessian weighted by
    ``b^2`` for a smooth net; ReLU/max-pool kink crossings otherwise): on a tiny ReLU VGG at ``sigma = 0.01`` we
    measured ``|E[f(b ⊙ xi) - f]|`` 2–25 times ``sigma^2 ||b ⊙ grad_b f||^2``, so with ``|y - f| ~ 1`` the noisy
    loss and loss + penalty differ by more than the penalty itself. For a smooth network the complete second-order
    expansion is ``E (y - f(b ⊙ xi))^2 = (y - f)^2 + sigma^2 (||b ⊙ grad_b f||^2 - (y - f) tr H) + O(sigma^4)``,
    ``H`` the Hessian of ``f(b ⊙ (1 + e))`` in ``e`` at 0 (checked by Monte Carlo in the same test file).
    """
    if noise not in ("parameter", "unit"):
        raise ValueError(f"noise must be 'parameter' (Prop. 10) or 'unit'; got {noise!r}.")
    if isinstance(layers, str) or not layers:
        raise ValueError(f"layers must be a non-empty sequence of module paths; got {layers!r}.")
    total = None
    for l in layers:
        m = _lookup(maps, l, "model")
        if noise == "parameter" and m.ndim > 2:
            m = jnp.sum(m, axis=tuple(range(1, m.ndim - 1)))
        v = jnp.sum(jnp.square(m).reshape(m.shape[0], -1), axis=1)
        total = v if total is None else total + v
    return total


def bias_l2(params: PyTree, layers: Sequence[str]) -> Array:
    """``0.5 sum_{l in layers} ||bias params of l||^2`` — the bias weight-decay baseline of thesis Table 4.3
    (§4.7.2, weight 1e-1). Leaves named ``bias`` in the module subtree of each layer (for a merged name such as
    ``"block7"`` the conv bias and BatchNorm's ``beta``). A scalar."""
    if isinstance(layers, str) or not layers:
        raise ValueError(f"layers must be a non-empty sequence of module paths; got {layers!r}.")
    total = jnp.zeros((), jnp.float32)
    for l in layers:
        subs = [s for s in (_subtree(params, p) for p in _group_paths(l)) if s is not None]
        if not subs:
            raise ValueError(f"unknown layer {l!r}: no module at that path in params (top-level modules: "
                             f"{sorted(params) if isinstance(params, Mapping) else '?'}).")
        found = False
        for sub in subs:
            for path, leaf in jax.tree_util.tree_leaves_with_path(sub if isinstance(sub, Mapping) else {"": sub}):
                if str(getattr(path[-1], "key", path[-1])) == "bias":
                    total = total + jnp.sum(jnp.square(leaf))
                    found = True
        if not found:
            raise ValueError(f"layer {l!r} has no bias parameters.")
    return 0.5 * total
