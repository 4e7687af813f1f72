"""Attention maps (thesis eq. 2.7), attention matching (eq. 2.8) and attention-Jacobian matching (§2.5.2,
eq. 2.9), plus a Linen feature-capture helper.

Feature maps are NHWC ``[B, h, w, c]``; attention maps ``[B, h, w]``. Function-level losses take feature
functions ``x [B, H, W, C] -> features [B, h, w, c]`` whose examples are independent (eval mode, or the frozen
BatchNorm moments of a train-mode student) and return ``[B]``.
"""
from __future__ import annotations

from typing import Callable, Literal, Optional, Sequence, Union

import jax
import jax.numpy as jnp
from jax import lax

from gradjax.losses.distillation import _check_x, _safe_norm, _sum_per_example, normalized_gradient_matching

Array = jax.Array
FeatureFn = Callable[[Array], Array]
Window = Union[int, Literal["full", "none"], None]

__all__ = ["attention_map", "attention_matching", "pool_window", "pool_attention", "attention_argmax",
           "attention_jacobian_matching", "capture_features", "layer_spec"]


def _check_features(z: Array, name: str) -> None:
    if jnp.ndim(z) != 4:
        raise ValueError(f"{name} must be a feature map [B, h, w, c]; got shape {tuple(jnp.shape(z))}.")


def attention_map(features: Array, *, p: float = 2.0) -> Array:
    """Channel-aggregated attention map, thesis eq. 2.7: ``A_b = sum_c |Z_{b,:,:,c}|^p`` (``p = 2`` in ch. 2;
    ``p = 1``, the channel-wise absolute sum, in ch. 4). ``features`` ``[B, h, w, c]`` -> ``[B, h, w]``."""
    _check_features(features, "features")
    if not p > 0:
        raise ValueError(f"p must be > 0; got {p}.")
    if p == 2:
        return jnp.sum(jnp.square(features), axis=-1)
    if p == 1:
        return jnp.sum(jnp.abs(features), axis=-1)
    return jnp.sum(jnp.abs(features) ** p, axis=-1)


def attention_matching(student_attention: Array, teacher_attention: Array, *, squared: bool = False) -> Array:
    """Attention matching, thesis eq. 2.8: ``l_b = || A_t/||A_t||_2 - A_s/||A_s||_2 ||_2`` over the flattened
    maps (not squared, as printed; ``squared=True`` gives the squared form of Zagoruyko & Komodakis). Inputs
    ``[B, h, w]`` of equal shape; returns ``[B]``. Zero maps and a zero difference have zero (not NaN)
    gradients, so the loss is exactly 0 with finite gradients when the maps agree."""
    if jnp.shape(student_attention) != jnp.shape(teacher_attention):
        raise ValueError(f"student and teacher attention maps must have the same shape (pick layers of equal spatial "
                         f"size); got {tuple(jnp.shape(student_attention))} and {tuple(jnp.shape(teacher_attention))}.")
    d2 = normalized_gradient_matching(student_attention, teacher_attention)
    if squared:
        return d2
    pos = d2 > 0
    return jnp.where(pos, jnp.sqrt(jnp.where(pos, d2, 1.0)), 0.0)


def pool_window(size: int, window: Window = None, *, divisor: int = 5) -> int:
    """Average-pooling window for the attention-Jacobian (thesis §2.12.2: "feature size/5", stride 1).

    ``window=None`` -> ``max(1, round(size / divisor))``; ``"full"`` -> ``size`` (one global average; Table 2.5
    "Full"); ``"none"`` -> 1 (no pooling; Table 2.5 "None"); an int is used as is."""
    if window is None:
        if divisor < 1:
            raise ValueError(f"divisor must be >= 1; got {divisor}.")
        return max(1, int(round(size / divisor)))
    if window == "full":
        return size
    if window == "none":
        return 1
    if isinstance(window, int) and 1 <= window <= size:
        return window
    raise ValueError(f"window must be None, 'full', 'none' or an int in [1, {size}]; got {window!r}.")


def pool_attention(attention: Array, window: int) -> Array:
    """Average pooling with a ``window x window`` kernel, stride 1, no padding: ``[B, h, w] -> [B, h-k+1, w-k+1]``."""
    if jnp.ndim(attention) != 3:
        raise ValueError(f"attention must be [B, h, w]; got shape {tuple(jnp.shape(attention))}.")
    if window == 1:
        return attention
    s = lax.reduce_window(attention, 0.0, lax.add, (1, window, window), (1, 1, 1), "VALID")
    return s / (window * window)


def attention_argmax(teacher_pooled: Array) -> Array:
    """Flat index ``[B]`` of the largest entry of each pooled teacher map ``[B, h', w']`` (no gradient)."""
    a = lax.stop_gradient(teacher_pooled)
    return jnp.argmax(a.reshape(a.shape[0], -1), axis=-1).astype(jnp.int32)


def _pooled_at(feature_fn: FeatureFn, x: Array, window: int, p: float, index: Optional[Array]):
    """``(value [B], pooled map)`` of ``pool(attention(feature_fn(x)))`` at flat ``index`` (or the argmax)."""
    pooled = pool_attention(attention_map(feature_fn(x), p=p), window)
    flat = pooled.reshape(pooled.shape[0], -1)
    idx = attention_argmax(pooled) if index is None else index
    return jnp.take_along_axis(flat, idx[:, None], axis=1)[:, 0], (pooled, idx)


def attention_jacobian_matching(student_features: FeatureFn, teacher_features: FeatureFn, x: Array, *,
                                window: Window = None, divisor: int = 5, p: float = 2.0,
                                return_index: bool = False):
    """Attention-Jacobian matching, thesis §2.5.2 with eq. 2.9.

    1. teacher attention ``A_t = attention_map(Z_t(x))`` (eq. 2.7), average-pooled with a window of
       ``feature size / divisor`` (default 5; see :func:`pool_window`) and stride 1;
    2. ``(i, j) = argmax`` of the pooled teacher map, per example (no gradient);
    3. the scalars ``f(x) = pool(A_t)(x)[i, j]`` and ``g(x) = pool(A_s)(x)[i, j]`` (the *same* position in the
       student's pooled map);
    4. ``l_b = || grad_x f / ||grad_x f|| - grad_x g / ||grad_x g|| ||^2`` (eq. 2.9), double backprop through
       the student.

    The two feature maps must have the same spatial size. Returns ``[B]`` (and the flat index ``[B]`` with
    ``return_index=True``).
    """
    _check_x(x)
    zt = jax.eval_shape(teacher_features, x)
    zs = jax.eval_shape(student_features, x)
    if len(zt.shape) != 4 or len(zs.shape) != 4:
        raise ValueError(f"feature functions must return [B, h, w, c]; got {zt.shape} (teacher), {zs.shape} (student).")
    if zt.shape[1:3] != zs.shape[1:3]:
        raise ValueError(f"teacher and student feature maps must have the same spatial size; got {zt.shape[1:3]} "
                         f"and {zs.shape[1:3]}: choose another layer pair.")
    if zt.shape[1] != zt.shape[2]:
        size = min(zt.shape[1:3])
    else:
        size = zt.shape[1]
    k = pool_window(size, window, divisor=divisor)
    t_val, t_pull, (_, idx) = jax.vjp(lambda z: _pooled_at(teacher_features, z, k, p, None), x, has_aux=True)
    (t_grad,) = t_pull(jnp.ones_like(t_val))
    s_val, s_pull = jax.vjp(lambda z: _pooled_at(student_features, z, k, p, idx)[0], x)
    (s_grad,) = s_pull(jnp.ones_like(s_val))
    loss = normalized_gradient_matching(s_grad, lax.stop_gradient(t_grad))
    return (loss, idx) if return_index else loss


# --------------------------------------------------------------------------------------------- layer capture
def layer_spec(spec: str) -> tuple[str, bool]:
    """``"block1"`` -> (``"block1"``, False); ``"block1:pool"`` -> (``"block1"``, True): the output of the Linen
    submodule at that path, optionally followed by the 2x2 max-pool that comes after it in a VGG ("after the
    second max-pool", §2.12.2, is ``"block1:pool"`` in VGG-9)."""
    if not isinstance(spec, str) or not spec:
        raise ValueError(f"a layer is a module path string such as 'block1' or 'block1:pool'; got {spec!r}.")
    path, _, post = spec.partition(":")
    if post not in ("", "pool"):
        raise ValueError(f"unknown layer suffix {post!r} in {spec!r}; only ':pool' is supported.")
    return path, post == "pool"


def capture_features(apply_fn: Callable, variables, x: Array, layers: Sequence[str], **apply_kwargs):
    """Run a Linen ``apply_fn`` and also return the outputs of the submodules at ``layers`` (module paths such as
    ``"block1"`` or ``"stage2_block1"``, optionally ``":pool"``; see :func:`layer_spec`), via Flax's
    ``capture_intermediates``.

    Returns ``(out, {spec: features})`` where ``out`` is what ``apply_fn`` returns (``(logits, mutated)`` when a
    ``mutable`` list is passed). Raises ``ValueError`` naming the available paths when a layer is absent.
    """
    import flax.linen as nn

    specs = [layer_spec(s) for s in layers]
    wanted = {p for p, _ in specs}

    def filt(mdl, method_name):
        return method_name == "__call__" and "/".join(mdl.path) in wanted

    mutable = apply_kwargs.pop("mutable", False)
    if mutable is False:
        mut = ["intermediates"]
    elif mutable is True:
        mut = True
    else:
        mut = list(mutable) + ["intermediates"]
    out, state = apply_fn(variables, x, capture_intermediates=filt, mutable=mut, **apply_kwargs)
    inter = state["intermediates"] if isinstance(state, dict) else state.get("intermediates", {})
    feats = {}
    for spec, (path, pool) in zip(layers, specs):
        node = inter
        try:
            for part in path.split("/"):
                node = node[part]
            z = node["__call__"][0]
        except (KeyError, TypeError):
            raise ValueError(f"no module output captured at path {path!r}; check the layer name (e.g. 'block1' "
                             "for a VGG, 'stage2_block1' for the ResNet).") from None
        if pool:
            z = nn.max_pool(z, (2, 2), strides=(2, 2))
        feats[spec] = z
    if mutable is False:
        return out, feats
    rest = {k: v for k, v in state.items() if k != "intermediates"}
    return (out, rest), feats
