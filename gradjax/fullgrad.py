"""Full-gradient representation: input-gradient plus bias-gradients (thesis ch. 3, §3.4; proofs §3.9).

For a network ``f`` with every constant it adds collected in ``b`` (explicit Dense/Conv biases, BatchNorm's
implicit bias, the implicit bias of a smooth activation), thesis Proposition 6 (eq. 3.1), restated with the
per-layer sum as Proposition 9 (eq. 3.3, §3.9), gives the *completeness* identity

    f(x) = <grad_x f(x), x> + sum_l sum_{positions} (grad_{b_l} f(x) ⊙ b_l)            (eq. 3.1 / 3.3)

Proposition 5 is the bias-free special case: a ReLU network without biases is positively homogeneous, so
``f(x) = <grad_x f(x), x>``. For a non-piecewise-linear activation (softplus) the local linearization
``sigma(z) = sigma'(z) z + b_sigma`` adds an input-dependent implicit bias ``b_sigma`` (§3.4), which the model's
activation layer exposes like any other bias, so the identity still holds exactly.

``grad_x f`` is the *input-gradient*, ``f^b(x) = grad_b f(x) ⊙ b`` the *bias-gradients*; together they are the
*full-gradients* ``G = (grad_x f, f^b)`` (§3.4). For a convolution with bias ``b`` shared over positions, the
gradient with respect to the repeated bias vector equals the gradient with respect to the layer's output ``z_l``
(chain rule, proof of Proposition 9), so each bias-gradient map is ``grad_{z_l} f ⊙ b_l``, shaped like ``z_l``:
a spatial map for a convolutional layer ([B, h, w, c]), a vector for a Dense layer ([B, c]).

How the pieces are obtained: every bias site of a gradjax model calls
:func:`gradjax.models.layers.bias_tap`, which records ``b_l`` in the ``"biases"`` collection and adds a zero
``"perturbations"`` variable to ``z_l`` (both keyed by module path). One :func:`jax.vjp` of
``(x, perturbations) -> logits`` with the one-hot cotangent of the target class gives ``grad_x f`` and every
``grad_{z_l} f`` in a single backward pass. The cotangent selects one logit per example and the model runs in
eval mode (``train=False``: BatchNorm uses running statistics), so examples do not interact and the backward pass
of ``sum_b f_b(x_b)`` yields the per-example gradients exactly.

Public API: :data:`PREDICTED`, :class:`FullGradients`, :func:`bias_taps`, :func:`flatten_taps`,
:func:`full_gradients`, :func:`full_gradients_fn`, :func:`completeness_residual`, :data:`MERGE_MODES`.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping, NamedTuple, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from gradjax._validation import (PREDICTED, check_finite, check_floating, check_images, is_concrete,
                                 normalize_target)
from gradjax.models.layers import TAP

Array = jax.Array

MERGE_MODES = ("none", "conv_bn", "block")
"""How bias-gradient maps are grouped into layers; see :func:`full_gradients`."""

_COLLECTIONS = ("biases", "perturbations")


class FullGradients(NamedTuple):
    """Full-gradient decomposition of one selected logit per example (thesis §3.4, eq. 3.1/3.3).

    Attributes:
      output: ``[B]`` — ``f(x)``, the selected logit of each example.
      input_gradient: ``[B, *x.shape[1:]]`` — ``grad_x f(x)``.
      bias_gradients: ``{path: [B, *z_l.shape[1:]]}`` — ``f^b_l(x) = grad_{z_l} f(x) ⊙ b_l`` for each bias
        site (or merged group of sites), keyed by module path joined with ``"/"`` (e.g. ``"block0/conv"``,
        ``"block0/bn"``, ``"head"``). Shapes are those of the layer output ``z_l``: ``[B, h, w, c]`` for
        convolutional layers, ``[B, c]`` for Dense layers. Empty for a network without biases.
      residual: ``[B]`` — ``f(x) - <grad_x f, x> - sum_l sum(f^b_l)``; zero up to round-off (completeness).
    """

    output: Array
    input_gradient: Array
    bias_gradients: dict
    residual: Array

    def input_term(self, x) -> Array:
        """``[B]`` — ``<grad_x f(x), x>`` (the input part of eq. 3.3); ``x`` is the input the gradients were taken at."""
        return _sum_per_example(self.input_gradient * x)

    def bias_term(self) -> Array:
        """``[B]`` — ``sum_l sum_{positions} f^b_l(x)`` (the bias part of eq. 3.3)."""
        total = jnp.zeros_like(self.output)
        for m in self.bias_gradients.values():
            total = total + jnp.sum(m.reshape(m.shape[0], -1), axis=1)
        return total

    def relative_residual(self, floor: Optional[float] = None) -> Array:
        """``[B]`` — ``|residual| / max(|f(x)|, floor)`` (``floor`` defaults to the dtype's smallest normal)."""
        if floor is None:
            floor = float(jnp.finfo(self.output.dtype).tiny)
        return jnp.abs(self.residual) / jnp.maximum(jnp.abs(self.output), floor)


# ----------------------------------------------------------------------------------------------------------------
# Boundary checks and helpers
# ----------------------------------------------------------------------------------------------------------------

def _check_x(x) -> Array:
    if not hasattr(x, "shape"):
        x = jnp.asarray(x)
    if jnp.ndim(x) == 4:
        check_images(x, "x")
    else:
        if jnp.ndim(x) < 2:
            raise ValueError(
                f"x must be a batch [B, ...] with rank >= 2 (NHWC images [B, H, W, C] for convolutional models); "
                f"got shape {tuple(jnp.shape(x))}. Add a batch axis, e.g. x[None].")
        check_floating(x, "x")
        check_finite(x, "x")
    return x


def _check_merge(merge: str) -> None:
    if merge not in MERGE_MODES:
        raise ValueError(f"merge must be one of {', '.join(repr(m) for m in MERGE_MODES)}; got {merge!r}.")


def _check_dtype(dtype):
    if dtype is None:
        return None
    try:
        dt = jnp.dtype(dtype)
    except TypeError as e:
        raise ValueError(f"dtype must be a floating-point dtype such as jnp.float32; got {dtype!r}.") from e
    if not jnp.issubdtype(dt, jnp.floating):
        raise ValueError(f"dtype must be a floating-point dtype such as jnp.float32; got {dt}.")
    if jax.dtypes.canonicalize_dtype(dt) != dt:
        raise ValueError(
            f"dtype={dt} needs 64-bit mode: call jax.config.update('jax_enable_x64', True) at start-up, or run "
            f"inside `with jax.enable_x64(True):`.")
    return dt


def _clean_variables(variables) -> dict:
    """Drop collections that ``model.init`` returns but that must be rebuilt for this batch."""
    if not isinstance(variables, Mapping):
        raise ValueError(
            f"variables must be the Flax variable dict passed to model.apply (e.g. {{'params': ..., "
            f"'batch_stats': ...}}); got {type(variables).__name__}.")
    return {k: v for k, v in variables.items() if k not in _COLLECTIONS}


def _cast(tree, dtype):
    def cast(a):
        return a.astype(dtype) if jnp.issubdtype(jnp.result_type(a), jnp.floating) else a
    return jax.tree.map(cast, tree)


def _spec(tree):
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(jnp.shape(a), jnp.result_type(a)), tree)


def _apply_kwargs(apply_kwargs) -> dict:
    return {"train": False} if apply_kwargs is None else dict(apply_kwargs)


def flatten_taps(tree: Mapping) -> dict[str, Any]:
    """Flatten a ``"biases"`` / ``"perturbations"`` collection to ``{"block0/conv": leaf, ...}``.

    Only entries named :data:`gradjax.models.layers.TAP` are bias taps; the key is the module path (the nested
    dict keys above the tap) joined with ``"/"``. Other perturbations in the collection are ignored.
    """
    out: dict[str, Any] = {}

    def walk(node, prefix):
        for k, v in node.items():
            if k == TAP and not isinstance(v, Mapping):
                out["/".join(prefix)] = v
            elif isinstance(v, Mapping):
                walk(v, prefix + (str(k),))
    if tree:
        walk(tree, ())
    return out


def _select_target(target, batch: int, num_classes: Optional[int]):
    """Return ``None`` for :data:`PREDICTED`, else an int array ``[B]`` (scalars are broadcast)."""
    target = normalize_target(target, batch, num_classes)
    return None if isinstance(target, str) else target


# ----------------------------------------------------------------------------------------------------------------
# Bias taps
# ----------------------------------------------------------------------------------------------------------------

def bias_taps(apply_fn: Callable, variables: Mapping, x, *, apply_kwargs: Optional[Mapping] = None
              ) -> tuple[dict, dict]:
    """Record every bias tap of ``apply_fn`` at input ``x``: one forward pass in eval mode.

    Args:
      apply_fn: ``model.apply`` of a Linen model whose bias sites call :func:`gradjax.models.layers.bias_tap`.
      variables: ``{'params', 'batch_stats', ...}``; ``'biases'`` / ``'perturbations'`` (as returned by
        ``model.init``) are ignored and rebuilt.
      x: ``[B, ...]`` float input.
      apply_kwargs: extra keyword arguments of ``apply_fn``; default ``{'train': False}``.

    Returns:
      ``(biases, perturbations)``: two nested dicts with the same structure, keyed by module path
      (``biases["block0"]["bn"]["tap"]``). ``biases`` holds each ``b_l`` (broadcastable to ``z_l``; for a
      softplus activation the input-dependent implicit bias ``sigma(z) - sigma'(z) z``, §3.4) and
      ``perturbations`` zeros shaped like each ``z_l`` ``[B, ...]``. Both are ``{}`` for a bias-free network.
    """
    x = _check_x(x)
    variables = _clean_variables(variables)
    _, state = apply_fn(variables, x, mutable=list(_COLLECTIONS), **_apply_kwargs(apply_kwargs))
    state = dict(state)
    return dict(state.get("biases", {})), dict(state.get("perturbations", {}))


def _merge_maps(maps: dict[str, Array], merge: str, params: Mapping) -> dict[str, Array]:
    if merge == "none":
        return dict(maps)
    groups: dict[str, list[str]] = {}
    if merge == "block":
        for k in maps:
            groups.setdefault(k.split("/")[0], []).append(k)
    else:  # conv_bn: a BatchNorm named "...bn..." is paired with the conv named the same with "bn" -> "conv"
        def has_module(parts):
            node = params
            for p in parts:
                if not isinstance(node, Mapping) or p not in node:
                    return False
                node = node[p]
            return True

        for k in maps:
            parts = k.split("/")
            parent, name = parts[:-1], parts[-1]
            new = k
            if "bn" in name:
                conv = name.replace("bn", "conv")
                if (("/".join(parent + [conv])) in maps) or has_module(parent + [conv]):
                    new = "/".join(parent) if name == "bn" and parent else "/".join(parent + [name.replace("bn", "conv_bn")])
            elif "conv" in name:
                bn = name.replace("conv", "bn")
                if "/".join(parent + [bn]) in maps:
                    new = "/".join(parent) if name == "conv" and parent else "/".join(parent + [name.replace("conv", "conv_bn")])
            groups.setdefault(new, []).append(k)
    out = {}
    for new, members in groups.items():
        shapes = {tuple(maps[m].shape) for m in members}
        if len(shapes) > 1:
            detail = ", ".join(f"{m}: {tuple(maps[m].shape)}" for m in members)
            raise ValueError(
                f"merge={merge!r} cannot sum the bias-gradient maps of group {new!r}: their shapes differ "
                f"({detail}). Use merge='none'.")
        total = maps[members[0]]
        for m in members[1:]:
            total = total + maps[m]
        out[new] = total
    return out


def _sum_per_example(a: Array) -> Array:
    return jnp.sum(a.reshape(a.shape[0], -1), axis=1)


# ----------------------------------------------------------------------------------------------------------------
# Full-gradients
# ----------------------------------------------------------------------------------------------------------------

def full_gradients(apply_fn: Callable, variables: Mapping, x, target=PREDICTED, *, merge: str = "none",
                   dtype=None, apply_kwargs: Optional[Mapping] = None) -> FullGradients:
    """Full-gradients ``(grad_x f, {f^b_l})`` of the selected logit of each example (thesis §3.4, eq. 3.1/3.3).

    Computes, for each example ``i`` with ``f = logits[i, target[i]]``,

      * ``input_gradient[i] = grad_x f``                                            ``[B, *x.shape[1:]]``
      * ``bias_gradients[l][i] = grad_{z_l} f ⊙ b_l``   (``f^b(x)``, §3.4)           ``[B, *z_l.shape[1:]]``
      * ``residual[i] = f - <grad_x f, x> - sum_l sum f^b_l``, which completeness (Proposition 6 / 9, eq. 3.1 /
        3.3, with activation implicit biases for smooth non-linearities, §3.4) makes zero up to round-off.

    One :func:`jax.vjp` of ``(x, perturbations) -> logits`` with a one-hot cotangent gives all gradients at once
    (one forward, one backward pass; the tap structure comes from :func:`jax.eval_shape`, which costs nothing).
    Per-example gradients come from the gradient of ``sum_i logits[i, target[i]]``: exact because in eval mode
    (``train=False``, BatchNorm with running statistics) examples do not interact.

    Args:
      apply_fn: ``model.apply`` of a Linen model built with bias taps (all gradjax models). A model without any
        bias tap works too: ``bias_gradients`` is ``{}`` and, for a ReLU network, ``f = <grad_x f, x>``
        (Proposition 5).
      variables: ``{'params', 'batch_stats'}`` (``'biases'``/``'perturbations'`` from ``model.init`` are ignored).
      x: ``[B, H, W, C]`` images (or ``[B, ...]`` for an MLP), floating point, finite.
      target: int array ``[B]`` (or a scalar, broadcast) of classes with ``0 <= t < num_classes``, or
        :data:`PREDICTED` for the arg-max class of each example.
      merge: grouping of the bias-gradient maps (a regrouping of the same sum, so completeness holds for all):
        ``"none"`` — one entry per bias site (``"block0/conv"``, ``"block0/bn"``, ``"block0/act"``, ``"head"``);
        ``"conv_bn"`` — a convolution and its BatchNorm count as one layer: the BatchNorm ``P/<..bn..>`` and the
        convolution ``P/<..conv..>`` (same name with ``bn`` -> ``conv``) are summed into one entry named ``P``
        for the VGG names ``conv``/``bn`` (``"block0"``), else ``P/<..conv_bn..>`` (ResNet:
        ``"stage0_block0/conv_bn1"``, ``"stage1_block0/shortcut_conv_bn"``, ``"stem_conv_bn"``; a bias-free
        convolution contributes nothing but still names the entry); unpaired sites keep their names;
        ``"block"`` — all sites under the same top-level module are summed (``"block0"``, ``"stage0_block0"``,
        ``"head"``, ...). Maps in one group must share a shape (they do in VGG and ResNet).
      dtype: optional floating dtype to run in (``x`` and all floating variables are cast), e.g. ``jnp.float64``
        (needs ``jax_enable_x64``) for exact checks.
      apply_kwargs: keyword arguments of ``apply_fn``; default ``{'train': False}``.

    Returns:
      :class:`FullGradients` ``(output [B], input_gradient [B, ...], bias_gradients {path: [B, ...]},
      residual [B])``.

    Jittable with ``apply_fn`` (and ``target`` when it is :data:`PREDICTED`) closed over, e.g.
    ``jax.jit(lambda v, x, t: full_gradients(model.apply, v, x, t))``, and vmappable over stacks of batches.
    Under ``jit`` only static checks (rank, dtype, batch size) run; see :func:`full_gradients_fn` for a jitted
    wrapper that also checks values (NaN input, target range).
    """
    _check_merge(merge)
    dt = _check_dtype(dtype)
    x = _check_x(x)
    variables = _clean_variables(variables)
    if dt is not None:
        x, variables = _cast(x, dt), _cast(variables, dt)
    kwargs = _apply_kwargs(apply_kwargs)
    batch = x.shape[0]

    # Shapes of the logits and of every tap, without computing anything.
    def collect(v, x_):
        return apply_fn(v, x_, mutable=list(_COLLECTIONS), **kwargs)

    out_spec, state_spec = jax.eval_shape(collect, _spec(variables), _spec(x))
    if len(out_spec.shape) != 2 or out_spec.shape[0] != batch:
        raise ValueError(f"apply_fn must return logits of shape [B, num_classes] = [{batch}, K]; got {out_spec.shape}.")
    num_classes = out_spec.shape[1]
    tgt = _select_target(target, batch, num_classes)

    state_spec = dict(state_spec)
    pert_spec = dict(state_spec.get("perturbations", {}))
    perts = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), pert_spec)
    tap_bias_names = set(flatten_taps(dict(state_spec.get("biases", {}))))
    tap_pert_names = set(flatten_taps(pert_spec))
    if tap_bias_names != tap_pert_names:
        raise ValueError(
            "every bias tap must both sow its bias ('biases') and perturb its output ('perturbations') under the same "
            f"module path (use gradjax.models.layers.bias_tap); unmatched: {sorted(tap_bias_names ^ tap_pert_names)}.")

    def f(x_, p_):
        v = dict(variables)
        if p_:
            v["perturbations"] = p_
        logits, state = apply_fn(v, x_, mutable=["biases"], **kwargs)
        return logits, dict(dict(state).get("biases", {}))

    logits, vjp_fn, biases = jax.vjp(f, x, perts, has_aux=True)
    if tgt is None:
        tgt = jnp.argmax(logits, axis=-1)
    cotangent = jax.nn.one_hot(tgt, num_classes, dtype=logits.dtype)
    grad_x, grad_p = vjp_fn(cotangent)
    output = jnp.take_along_axis(logits, tgt[:, None].astype(jnp.int32), axis=1)[:, 0]

    g_flat, b_flat = flatten_taps(grad_p), flatten_taps(biases)
    maps = {k: jnp.broadcast_to(g_flat[k] * b_flat[k].astype(g_flat[k].dtype), g_flat[k].shape) for k in g_flat}
    maps = _merge_maps(maps, merge, variables.get("params", {}))

    input_term = _sum_per_example(grad_x * x)
    bias_term = jnp.zeros_like(output)
    for m in maps.values():
        bias_term = bias_term + _sum_per_example(m).astype(output.dtype)
    residual = output - input_term.astype(output.dtype) - bias_term
    return FullGradients(output, grad_x, maps, residual)


def full_gradients_fn(apply_fn: Callable, *, merge: str = "none", dtype=None,
                      apply_kwargs: Optional[Mapping] = None, jit: bool = True) -> Callable:
    """Bind a model once: returns ``fn(variables, x, target=PREDICTED) -> FullGradients``.

    Value checks (NaN/inf in ``x``, ``0 <= target < num_classes``) run eagerly on the concrete arguments, then
    the computation runs through :func:`jax.jit` (compiled once per shape; one compiled function for explicit
    targets and one for :data:`PREDICTED`). ``apply_fn`` may also be a Linen module (its ``.apply`` is used).
    """
    _check_merge(merge)
    _check_dtype(dtype)
    if isinstance(apply_fn, nn.Module):
        apply_fn = apply_fn.apply

    def with_target(variables, x, target):
        return full_gradients(apply_fn, variables, x, target, merge=merge, dtype=dtype, apply_kwargs=apply_kwargs)

    def predicted(variables, x):
        return full_gradients(apply_fn, variables, x, PREDICTED, merge=merge, dtype=dtype,
                              apply_kwargs=apply_kwargs)

    with_target_c = jax.jit(with_target) if jit else with_target
    predicted_c = jax.jit(predicted) if jit else predicted

    def fn(variables, x, target=PREDICTED):
        x = _check_x(x)
        variables = _clean_variables(variables)
        if isinstance(target, str):
            _select_target(target, x.shape[0], None)
            return predicted_c(variables, x)
        if is_concrete(target) and is_concrete(x) and all(is_concrete(a) for a in jax.tree.leaves(variables)):
            spec = jax.eval_shape(lambda v, x_: apply_fn(v, x_, **_apply_kwargs(apply_kwargs)),
                                  _spec(variables), _spec(x))
            num_classes = spec.shape[-1] if len(spec.shape) == 2 else None
            target = _select_target(target, x.shape[0], num_classes)
        return with_target_c(variables, x, target)

    return fn


def completeness_residual(apply_fn: Callable, variables: Mapping, x, target=PREDICTED, *, dtype=None,
                          apply_kwargs: Optional[Mapping] = None, floor: Optional[float] = None) -> Array:
    """Relative completeness residual ``|f - <grad_x f, x> - sum_l sum f^b_l| / max(|f|, floor)``, ``[B]``.

    The deviation from eq. 3.3 (thesis §3.4 / §3.9, Proposition 9) relative to the output; ``floor``
    (default: the dtype's smallest normal number) avoids dividing by zero. Round-off level (~1e-6 in float32,
    ~1e-14 in float64) for a model whose every bias site is tapped; large values mean a constant term of the
    model is not exposed as a bias tap (or the model is not in eval mode).
    """
    fg = full_gradients(apply_fn, variables, x, target, dtype=dtype, apply_kwargs=apply_kwargs)
    return fg.relative_residual(floor)


__all__ = ["PREDICTED", "MERGE_MODES", "FullGradients", "bias_taps", "flatten_taps", "full_gradients",
           "full_gradients_fn", "completeness_residual"]
