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

Public API: :data:`PREDICTED`, :class:`FullGradients`, :class:`TapGradients`, :func:`tap_gradients`,
:func:`decompose`, :func:`full_gradients`, :func:`completeness_residual`, :func:`bias_taps`, :func:`flatten_taps`,
:data:`MERGE_MODES`. Every function takes the model as a :class:`gradjax.model.ModelHandle`
``ModelHandle(model.apply, variables)`` (the methods need the bias taps inside the network).

**Train-mode models.** The handle's ``apply_kwargs`` choose the forward mode (default ``train=False``). A
train-mode handle (``apply_kwargs={"train": True}``) updates ``batch_stats``: pass ``mutable=("batch_stats",)`` and
the updated collections come back in ``FullGradients.updates``. Train-mode BatchNorm normalizes with the batch's own
moments, which depend on ``x``, so completeness does not hold exactly there (and the sum trick mixes examples); a
frozen-moments pass (BatchNorm with recorded batch moments under ``stop_gradient``, see
:func:`gradjax.model.apply_frozen`) is affine per example, and completeness holds again.

**Jit.** Nothing here jits itself; the caller does, once, e.g.::

    fg_fn = jax.jit(lambda handle, x, t: full_gradients(handle, x, t))
    fg = fg_fn(ModelHandle(model.apply, variables), x, labels)   # the handle is a pytree: variables traced

Called eagerly, the functions run operation by operation (each operation compiled once per shape by JAX) and also
check values (NaN input, target range), which ``jit`` skips.
"""
from __future__ import annotations

from typing import Any, Mapping, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp

from gradjax import _validation as V
from gradjax import precision as P
from gradjax.gradients import PREDICTED, logits_and_target_gradient, per_example_sum, select
from gradjax.model import ModelHandle, require_handle
from gradjax.models.layers import TAP, TAP_INFO, TapInfo

Array = jax.Array

MERGE_MODES = ("none", "conv_bn", "block")
"""How bias-gradient maps are grouped into layers; see :func:`full_gradients`."""

_COLLECTIONS = ("biases", "perturbations")
_META = (TAP_INFO,)


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
      updates: the updated ``mutable`` collections of a train-mode pass (e.g. ``{"batch_stats": ...}``), or
        ``None`` when no ``mutable`` collections were asked for.
    """

    output: Array
    input_gradient: Array
    bias_gradients: dict
    residual: Array
    updates: Optional[dict] = None

    def input_term(self, x) -> Array:
        """``[B]`` — ``<grad_x f(x), x>`` (the input part of eq. 3.3); ``x`` is the input the gradients were taken at."""
        return per_example_sum(self.input_gradient * x)

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


def _check_mutable(mutable) -> list[str]:
    if isinstance(mutable, str):
        mutable = (mutable,)
    mutable = list(mutable)
    bad = [m for m in mutable if not isinstance(m, str) or m in _COLLECTIONS]
    if bad:
        raise ValueError(f"mutable must name model collections to update (e.g. ('batch_stats',)), other than "
                         f"{_COLLECTIONS}; got {bad}.")
    return mutable


def _handle(model, method: str) -> ModelHandle:
    handle = require_handle(model, method)
    if not isinstance(handle.variables, Mapping):
        raise ValueError(
            f"the handle's variables must be the Flax variable dict passed to model.apply (e.g. {{'params': ..., "
            f"'batch_stats': ...}}); got {type(handle.variables).__name__}.")
    return handle


def _cast(tree, dtype):
    def cast(a):
        return a.astype(dtype) if jnp.issubdtype(jnp.result_type(a), jnp.floating) else a
    return jax.tree.map(cast, tree)


def _spec(tree):
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(jnp.shape(a), jnp.result_type(a)), tree)


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


# ----------------------------------------------------------------------------------------------------------------
# Bias taps
# ----------------------------------------------------------------------------------------------------------------

def bias_taps(model: ModelHandle, x) -> tuple[dict, dict]:
    """Record every bias tap of the model at input ``x``: one forward pass (in the handle's mode, default eval).

    Args:
      model: :class:`ModelHandle` of a Linen model whose bias sites call :func:`gradjax.models.layers.bias_tap`.
      x: ``[B, ...]`` float input.

    Returns:
      ``(biases, perturbations)``: two nested dicts with the same structure, keyed by module path
      (``biases["block0"]["bn"]["tap"]``). ``biases`` holds each ``b_l`` (broadcastable to ``z_l``; for a
      softplus activation the input-dependent implicit bias ``sigma(z) - sigma'(z) z``, §3.4) and
      ``perturbations`` zeros shaped like each ``z_l`` ``[B, ...]``. Both are ``{}`` for a bias-free network.
    """
    handle = _handle(model, "bias_taps")
    x = V.check_input(x, min_rank=2)
    _, state = handle.apply_fn(handle.variables, x, mutable=list(_COLLECTIONS), **handle.kwargs)
    state = dict(state)
    return dict(state.get("biases", {})), dict(state.get("perturbations", {}))


class TapGradients(NamedTuple):
    """Output of :func:`tap_gradients`: everything one backward pass gives (thesis §3.4).

    Attributes:
      logits: ``[B, K]``. target: ``[B]`` int32, the resolved classes.
      input_gradient: ``[B, *x.shape[1:]]`` — ``grad_x f_t``.
      tap_gradients: ``{path: [B, *z_l.shape[1:]]}`` — ``grad_{z_l} f_t`` at the output of every bias tap.
      biases: ``{path: b_l}`` — each tap's bias, broadcastable to ``z_l``.
      updates: updated ``mutable`` collections (train mode) or ``None``.
      info: ``{path: TapInfo}`` — each tap's declared kind and group (:class:`gradjax.models.layers.TapInfo`;
        static, no arrays), for the taps that declared one (all taps of gradjax's layers).
    """

    logits: Array
    target: Array
    input_gradient: Array
    tap_gradients: dict
    biases: dict
    updates: Optional[dict] = None
    info: Optional[dict] = None


def tap_gradients(model: ModelHandle, x, target=PREDICTED, *, mutable: Sequence[str] = ()) -> TapGradients:
    """``grad_x f_t`` and ``grad_{z_l} f_t`` at every bias tap ``l``, with the biases ``b_l``, from one vjp.

    One :func:`gradjax.gradients.logits_and_target_gradient` of ``(x, perturbations) -> logits`` (each tap adds
    a zero perturbation to its output ``z_l``, so the gradient w.r.t. it is ``grad_{z_l} f``) with the one-hot
    cotangent of ``target``: one forward and one backward pass; the tap structure comes from one abstract trace
    (free). ``mutable``: model collections a train-mode handle updates, e.g. ``("batch_stats",)``; they come back
    in ``updates``. Traced under the precision policy (:func:`gradjax.precision.policy`: float32-exact products
    unless a matmul precision has been set).

    Low level (used by :func:`full_gradients` and the FullGrad saliency family): static checks only.
    """
    return _tap_gradients(model, x, target, mutable, "tap_gradients")[0]


def _tap_gradients(model, x, target, mutable, method: str) -> tuple[TapGradients, P.PrecisionReport]:
    handle = _handle(model, method)
    x = V.check_input(x, min_rank=2, finite=False)
    mutable = _check_mutable(mutable)
    kwargs, variables = handle.kwargs, handle.variables

    def collect(v, x_):  # shapes of the logits and of every tap, without computing anything
        return handle.apply_fn(v, x_, mutable=list(_COLLECTIONS + _META) + mutable, **kwargs)

    with P.policy():
        closed, (out_spec, state_spec) = jax.make_jaxpr(collect, return_shape=True)(_spec(variables), _spec(x))
        report = P.report_from_jaxpr(closed, jnp.result_type(x))
        if len(out_spec.shape) != 2 or out_spec.shape[0] != x.shape[0]:
            raise ValueError(f"the model must return logits of shape [B, num_classes] = [{x.shape[0]}, K]; got "
                             f"{out_spec.shape}.")
        state_spec = dict(state_spec)
        pert_spec = dict(state_spec.get("perturbations", {}))
        unmatched = set(flatten_taps(dict(state_spec.get("biases", {})))) ^ set(flatten_taps(pert_spec))
        if unmatched:
            raise ValueError(
                "every bias tap must both sow its bias ('biases') and perturb its output ('perturbations') under the "
                f"same module path (use gradjax.models.layers.bias_tap); unmatched: {sorted(unmatched)}.")
        info = flatten_taps(dict(state_spec.get(TAP_INFO, {})))
        perts = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), pert_spec)

        def logits_fn(primal):
            x_, p_ = primal
            v = dict(variables)
            if p_:
                v["perturbations"] = p_
            logits, state = handle.apply_fn(v, x_, mutable=["biases"] + mutable, **kwargs)
            state = dict(state)
            return logits, (flatten_taps(dict(state.get("biases", {}))), {k: state[k] for k in mutable if k in state})

        r = logits_and_target_gradient(logits_fn, (x, perts), target, has_aux=True)
    grad_x, grad_p = r.gradient
    biases, updates = r.aux
    taps = TapGradients(r.logits, r.target, grad_x, flatten_taps(grad_p), biases, updates if mutable else None, info)
    return taps, report


def _merge_maps(maps: dict[str, Array], merge: str, info: Mapping[str, TapInfo]) -> dict[str, Array]:
    if merge == "none":
        return dict(maps)
    groups: dict[str, list[str]] = {}
    for k in maps:
        new = k
        if merge == "block":
            new = k.split("/")[0]
        else:  # conv_bn: the group each tap declared where it was made (gradjax.models.layers.TapInfo)
            group = info[k].group if k in info else None
            if group is not None:
                parent = k.split("/")[:-1]
                new = "/".join(parent + ([group] if group else []))
                if not new:
                    raise ValueError(f"merge='conv_bn': the tap {k!r} declares group '' (its parent module) but has "
                                     "no parent; declare a group name.")
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


# ----------------------------------------------------------------------------------------------------------------
# Full-gradients
# ----------------------------------------------------------------------------------------------------------------

def decompose(taps: TapGradients, x, *, merge: str = "none", params: Optional[Mapping] = None) -> FullGradients:
    """Assemble the full-gradient decomposition (thesis eq. 3.3) from one :func:`tap_gradients` at ``x``:
    ``f^b_l = grad_{z_l} f ⊙ b_l`` per tap, grouped by ``merge`` (see :func:`full_gradients`; ``"conv_bn"`` uses
    the groups the taps declared, ``taps.info``), the selected logit and the completeness residual. Pure arithmetic
    (no model call). ``params`` is not used (groups are declared by the taps, not looked up in the parameters);
    accepted for compatibility."""
    V.check_choice(merge, MERGE_MODES, "merge")
    g_flat, b_flat = taps.tap_gradients, taps.biases
    maps = {k: jnp.broadcast_to(g_flat[k] * b_flat[k].astype(g_flat[k].dtype), g_flat[k].shape) for k in g_flat}
    maps = _merge_maps(maps, merge, taps.info or {})
    output = select(taps.logits, taps.target)
    residual = output - per_example_sum(taps.input_gradient * x).astype(output.dtype)
    for m in maps.values():
        residual = residual - per_example_sum(m).astype(output.dtype)
    return FullGradients(output, taps.input_gradient, maps, residual, taps.updates)


def full_gradients(model: ModelHandle, x, target=PREDICTED, *, merge: str = "none", dtype=None,
                   mutable: Sequence[str] = ()) -> FullGradients:
    """Full-gradients ``(grad_x f, {f^b_l})`` of the selected logit of each example (thesis §3.4, eq. 3.1/3.3).

    .. math::

       f(x) = \\nabla_x f(x)^\\top x + \\sum_{l} \\sum_{\\text{positions}} \\nabla_{z_l} f(x) \\odot b_l
       \\qquad \\text{(completeness, eq. 3.3)}

    Computes, for each example ``i`` with ``f = logits[i, target[i]]``,

      * ``input_gradient[i] = grad_x f``                                            ``[B, *x.shape[1:]]``
      * ``bias_gradients[l][i] = grad_{z_l} f ⊙ b_l``   (``f^b(x)``, §3.4)           ``[B, *z_l.shape[1:]]``
      * ``residual[i] = f - <grad_x f, x> - sum_l sum f^b_l``, which completeness (Proposition 6 / 9, eq. 3.1 /
        3.3, with activation implicit biases for smooth non-linearities, §3.4) makes zero up to round-off.

    One forward and one backward pass (:func:`tap_gradients`, then :func:`decompose`). Per-example gradients
    come from the gradient of ``sum_i logits[i, target[i]]``: exact when examples do not interact (eval mode,
    ``train=False`` with BatchNorm's running statistics, or a frozen-moments pass).

    Args:
      model: :class:`ModelHandle` ``(model.apply, variables)`` of a Linen model built with bias taps (all gradjax
        models); its ``apply_kwargs`` select the mode (default ``train=False``). A model without any bias tap
        works too: ``bias_gradients`` is ``{}`` and, for a ReLU network, ``f = <grad_x f, x>`` (Proposition 5).
      x: ``[B, H, W, C]`` images (or ``[B, ...]`` for an MLP), floating point, finite.
      target: int array ``[B]`` (or a scalar, broadcast) of classes with ``0 <= t < num_classes``, or
        :data:`PREDICTED` for the arg-max class of each example.
      merge: grouping of the bias-gradient maps (a regrouping of the same sum, so completeness holds for all):
        ``"none"`` (default; the authors' FullGrad decomposition) — one entry per bias site (``"block0/conv"``,
        ``"block0/bn"``, ``"block0/act"``, ``"head"``);
        ``"conv_bn"`` — a convolution and its BatchNorm count as one layer: sites that declared the same
        ``group`` where their tap was made (:class:`gradjax.models.layers.TapInfo`, ``bias_tap(..., group=)``)
        under the same parent ``P`` are summed into ``P/<group>`` — ``P`` itself for group ``""`` (VGG:
        ``"block0"``), ResNet: ``"stage0_block0/conv_bn1"``, ``"stage1_block0/shortcut_conv_bn"``,
        ``"stem_conv_bn"`` (a bias-free convolution contributes nothing; its BatchNorm names the entry). Nothing is
        inferred from module names: a tap without a declared group (a user model calling ``bias_tap`` without
        ``group=``) keeps its own entry, as under ``"none"``;
        ``"block"`` — all sites under the same top-level module are summed (``"block0"``, ``"stage0_block0"``,
        ``"head"``, ...). Maps in one group must share a shape (they do in VGG and ResNet).
      dtype: optional floating dtype to run in (``x`` and all floating variables are cast), e.g. ``jnp.float64``
        (needs ``jax_enable_x64``) for exact checks.
      mutable: collections a train-mode handle updates (e.g. ``("batch_stats",)``), returned in ``updates``.

    Returns:
      :class:`FullGradients` ``(output [B], input_gradient [B, ...], bias_gradients {path: [B, ...]},
      residual [B], updates)``.

    Jittable (the handle is a pytree whose ``apply_fn`` is static), e.g.
    ``jax.jit(lambda h, x, t: full_gradients(h, x, t))``, and vmappable over stacks of batches. Under ``jit`` only
    static checks (rank, dtype, batch size) run.

    Precision (:mod:`gradjax.precision`): traced with float32-exact products (``"highest"``) unless a matmul
    precision has been set (``jax.default_matmul_precision``), so completeness holds to round-off on GPUs and TPUs
    too. A :class:`gradjax.precision.PrecisionWarning` (at trace time) says when the model's products are less
    precise than the dtype — an opted-into TF32/bfloat16 precision, a model built with ``precision="default"`` or
    ``dtype=jnp.bfloat16``, or emulated rounding — and completeness then holds only to ~that precision's eps.
    """
    handle = _handle(model, "full_gradients")
    V.check_choice(merge, MERGE_MODES, "merge")
    dt = _check_dtype(dtype)
    x = V.check_input(x, min_rank=2)
    if dt is not None:
        x, handle = _cast(x, dt), handle.replace(variables=_cast(handle.variables, dt))
    taps, report = _tap_gradients(handle, x, target, mutable, "full_gradients")
    P.warn_if_inexact(report, "gradjax.fullgrad.full_gradients",
                      f"completeness (eq. 3.3) holds only to ~{report.eps:.0e} relative instead of round-off")
    return decompose(taps, x, merge=merge)


def completeness_residual(model: ModelHandle, x, target=PREDICTED, *, dtype=None,
                          floor: Optional[float] = None) -> Array:
    """Relative completeness residual ``|f - <grad_x f, x> - sum_l sum f^b_l| / max(|f|, floor)``, ``[B]``.

    The deviation from eq. 3.3 (thesis §3.4 / §3.9, Proposition 9) relative to the output; ``floor``
    (default: the dtype's smallest normal number) avoids dividing by zero. Round-off level (~1e-6 in float32,
    ~1e-14 in float64) for a model whose every bias site is tapped; large values mean a constant term of the
    model is not exposed as a bias tap (or the model is not in eval mode), or — with a
    :class:`gradjax.precision.PrecisionWarning` — reduced-precision products (see :func:`full_gradients`).
    """
    return full_gradients(model, x, target, dtype=dtype).relative_residual(floor)


__all__ = ["PREDICTED", "MERGE_MODES", "FullGradients", "TapGradients", "bias_taps", "flatten_taps",
           "tap_gradients", "decompose", "full_gradients", "completeness_residual"]
