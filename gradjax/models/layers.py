"""Layers whose constant terms are exposed for full-gradients (thesis §3.3, eq. 3.1).

A *bias tap* is every site of a network that adds a constant to a pre-activation. Full-gradients need, for
each such site ``l``, the gradient of the output with respect to the site's output ``z_l`` and the bias value
``b_l``; then (thesis eq. 3.1/3.3, Proposition 6)

    f(x) = <grad_x f(x), x> + sum_l sum_{positions} grad_{z_l} f(x) * b_l .

Each tap does two things with the *same name* at the *same module path*:

* ``self.perturb(TAP, z)`` — adds a zero "perturbation" to the output ``z`` so that the gradient with respect to
  the perturbation (collection ``"perturbations"``) is ``grad_{z_l} f``;
* ``self.sow("biases", TAP, b)`` — records the effective bias ``b_l`` (collection ``"biases"``), broadcastable to
  ``z``.

Both collections are nested dicts keyed by module path (never by registration order), so the two trees have the
same structure and can be zipped. Both are no-ops unless the caller asks for them (``perturbations`` passed in,
``biases`` mutable), so training pays nothing.

Each tap also *declares* what it is, where it is made: ``bias_tap(..., kind=, group=)`` records a static
:class:`TapInfo` (collection ``"tap_info"``, same path): its ``kind`` (``"conv"``, ``"dense"``, ``"bn"``,
``"activation"``) and, optionally, the ``group`` of sites that form one layer (a convolution and its BatchNorm),
which ``merge="conv_bn"`` of :func:`gradjax.fullgrad.full_gradients` sums. Nothing is inferred from module names.

Precision (see :mod:`gradjax.precision`): :class:`TappedConv` / :class:`TappedDense` take ``precision`` (default
``"highest"``: exact float32 products on every backend; ``None`` follows ``jax.default_matmul_precision``),
``dtype`` (compute dtype, e.g. ``jnp.bfloat16`` for mixed precision; parameters stay float32) and ``emulate``
(``"gpu"`` / ``"tpu"``: round the inputs of the product as that chip would at the resolved precision, with
``lax.reduce_precision`` — reduced-precision tests on the CPU).

Taps:

* :class:`TappedConv` / :class:`TappedDense`: the learned bias ``b``.
* :class:`TappedBatchNorm`: the implicit bias ``beta - gamma * mean / sqrt(var + eps)`` of
  ``y = gamma (x - mean) / sqrt(var + eps) + beta`` (eval mode with the running statistics, or a frozen-moments
  pass with recorded batch moments: both are affine per example).
* :class:`Activation`: for a non-piecewise-linear activation (softplus), the implicit bias
  ``sigma(z) - sigma'(z) z`` of its local linearization (thesis §3.4), which is input-dependent. ReLU has none.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import flax.linen as nn
from jax import lax

from gradjax import precision as _precision
from gradjax.models import cpu_ops as _cpu_ops

TAP = "tap"
"""Name of the perturbation / bias entry of every tap (its module path identifies the layer)."""

TAP_INFO = "tap_info"
"""Collection of every tap's :class:`TapInfo` (static metadata, no arrays), keyed like ``"biases"``."""

TAP_KINDS = ("conv", "dense", "bn", "activation")
"""What a bias tap can be: a convolution's or Dense layer's bias, BatchNorm's implicit bias, a smooth activation's
implicit bias (thesis §3.4)."""

Dtype = Any
PrecisionLike = Union[None, str, lax.Precision]


@dataclasses.dataclass(frozen=True)
class TapInfo:
    """Static description of one bias tap, declared where the tap is made (:func:`bias_tap`).

    Attributes:
      kind: one of :data:`TAP_KINDS`.
      group: ``None`` (the site is its own layer) or the name, relative to the tap module's parent, of the layer
        the site belongs to; sites under the same parent with the same group are summed by
        ``merge="conv_bn"`` (:func:`gradjax.fullgrad.full_gradients`). ``""`` names the parent module itself
        (a VGG ``block0`` whose ``conv`` and ``bn`` are one layer).
    """

    kind: str
    group: Optional[str] = None


jax.tree_util.register_static(TapInfo)  # a pytree without leaves: survives jit / eval_shape as static metadata


def _keep_last(_, new):
    return new


def bias_tap(module: nn.Module, z: jax.Array, bias: jax.Array, *, kind: Optional[str] = None,
             group: Optional[str] = None) -> jax.Array:
    """Expose ``z = (linear part) + bias`` for full-gradients; returns ``z`` (plus a zero perturbation).

    ``kind`` (:data:`TAP_KINDS`) and ``group`` declare the site (:class:`TapInfo`, collection ``"tap_info"``);
    a tap without them is its own layer under every ``merge`` but ``"block"``. Skipped while the model is
    initializing, so ``model.init`` returns only ``params`` (and ``batch_stats``).
    """
    if kind is not None and kind not in TAP_KINDS:
        raise ValueError(f"kind must be one of {', '.join(TAP_KINDS)}; got {kind!r}.")
    if group is not None and (not isinstance(group, str) or "/" in group):
        raise ValueError(f"group must be a module-name string without '/' (or None); got {group!r}.")
    if module.is_initializing():
        return z
    module.sow("biases", TAP, bias, init_fn=lambda: None, reduce_fn=_keep_last)
    if kind is not None or group is not None:
        module.sow(TAP_INFO, TAP, TapInfo(kind or "", group), init_fn=lambda: None, reduce_fn=_keep_last)
    return module.perturb(TAP, z)


def _compute_dtype(dtype, *arrays):
    return jnp.dtype(dtype) if dtype is not None else jnp.result_type(*arrays)


def _matmul_inputs(precision, emulate, *arrays):
    """``(precision to pass to lax, arrays rounded as the emulated chip would)``."""
    return (_precision.lax_precision(precision),
            _precision.emulate_rounding(*arrays, precision=precision, emulate=emulate))


class TappedDense(nn.Module):
    """``z = x W + b`` with ``b`` exposed as a bias tap (kind ``"dense"``). x: [..., d_in] -> [..., features].

    ``precision``: of the product (default ``"highest"``; ``None`` follows ``jax.default_matmul_precision``);
    ``dtype``: compute dtype (``None``: that of ``x`` and the float32 parameters); ``emulate``: ``"gpu"``/``"tpu"``
    reduced-precision rounding of the product's inputs (:func:`gradjax.precision.emulate_rounding`);
    ``tap_group``: the :class:`TapInfo` group."""

    features: int
    use_bias: bool = True
    kernel_init: Callable = nn.initializers.lecun_normal()
    bias_init: Callable = nn.initializers.zeros_init()
    precision: PrecisionLike = "highest"
    dtype: Optional[Dtype] = None
    emulate: Optional[str] = None
    tap_group: Optional[str] = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.param("kernel", self.kernel_init, (x.shape[-1], self.features))
        dtype = _compute_dtype(self.dtype, x, kernel)
        prec, (x, kernel) = _matmul_inputs(self.precision, self.emulate, x.astype(dtype), kernel.astype(dtype))
        z = jnp.dot(x, kernel, precision=prec)
        if not self.use_bias:
            return z
        b = self.param("bias", self.bias_init, (self.features,)).astype(z.dtype)
        return bias_tap(self, z + b, b, kind="dense", group=self.tap_group)


PADDINGS = ("zero", "reflect", "circular")
"""How :class:`TappedConv` fills the border of its 'SAME' output: zeros (default), the mirrored image
(``jnp.pad(mode="reflect")``) or the opposite edge (``mode="wrap"``, a torus: every position has the same number of
paths to the output)."""


def _same_pads(n: int, k: int, s: int) -> tuple[int, int]:
    """(before, after) padding of one axis for 'SAME' output size ``ceil(n / s)`` (as ``lax``'s 'SAME')."""
    total = max((-(-n // s) - 1) * s + k - n, 0)
    return total // 2, total - total // 2


class TappedConv(nn.Module):
    """2-D convolution (NHWC, 'SAME' output size) ``z = W * x + b`` with ``b`` exposed as a bias tap (kind
    ``"conv"``); ``padding`` is one of :data:`PADDINGS` (default ``"zero"``); ``precision``, ``dtype``,
    ``emulate``, ``tap_group`` as :class:`TappedDense`; ``conv_impl`` one of
    :data:`gradjax.models.cpu_ops.CONV_IMPLS` (default ``"lax"``; the im2col forms apply to stride 1)."""

    features: int
    kernel_size: Sequence[int] = (3, 3)
    strides: Sequence[int] = (1, 1)
    use_bias: bool = True
    kernel_init: Callable = nn.initializers.kaiming_normal()
    bias_init: Callable = nn.initializers.zeros_init()
    padding: str = "zero"
    precision: PrecisionLike = "highest"
    dtype: Optional[Dtype] = None
    emulate: Optional[str] = None
    tap_group: Optional[str] = None
    conv_impl: str = "lax"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        if self.padding not in PADDINGS:
            raise ValueError(f"padding must be one of {', '.join(PADDINGS)}; got {self.padding!r}.")
        kernel = self.param("kernel", self.kernel_init, (*self.kernel_size, x.shape[-1], self.features))
        # e.g. float32 images into float64 (x64) parameters: compute in float64; or the compute dtype (bfloat16)
        dtype = _compute_dtype(self.dtype, x, kernel)
        x, kernel = x.astype(dtype), kernel.astype(dtype)
        pad = "SAME"
        if self.padding != "zero":
            pads = [_same_pads(n, k, s) for n, k, s in zip(x.shape[1:3], self.kernel_size, self.strides)]
            x = jnp.pad(x, ((0, 0), *pads, (0, 0)), mode={"reflect": "reflect", "circular": "wrap"}[self.padding])
            pad = "VALID"
        prec, (x, kernel) = _matmul_inputs(self.precision, self.emulate, x, kernel)
        if self.conv_impl != "lax" and tuple(self.strides) == (1, 1):  # opt-in CPU form, stride 1 only
            z = _cpu_ops.conv(self.conv_impl, x, kernel, padding=pad, precision=prec)
        else:
            z = lax.conv_general_dilated(
                x, kernel, window_strides=tuple(self.strides), padding=pad,
                dimension_numbers=("NHWC", "HWIO", "NHWC"), precision=prec)
        if not self.use_bias:
            return z
        b = self.param("bias", self.bias_init, (self.features,)).astype(z.dtype)
        return bias_tap(self, z + b, b, kind="conv", group=self.tap_group)


MOMENTS = "bn_moments"
"""Collection of the batch moments ``{"mean", "var"}`` [C] of every :class:`TappedBatchNorm`, keyed by module path.
Recorded by a train-mode pass when the collection is mutable; consumed (read-only) by a frozen-moments pass (see
:mod:`gradjax.model`, "Forward modes and the BatchNorm policy")."""


class TappedBatchNorm(nn.Module):
    """Batch normalization over all axes but the last, with its implicit bias exposed.

    Every mode computes ``y = s * x + c`` with ``s = gamma / sqrt(var + eps)`` and the implicit bias
    ``c = beta - s * mean`` (the tap), in exactly that form so that full-gradient completeness holds to round-off
    whenever ``(mean, var)`` do not depend on ``x``. Which ``(mean, var)`` [C] is used:

    * **eval** (``train=False``): the running statistics (collection ``"batch_stats"``). Examples are independent.
    * **train** (``train=True``): the moments of this batch over all axes but the last (averaged over
      ``axis_name`` under ``pmap``; under ``jit`` with a sharded batch the reduction is already global). The
      running averages are updated with ``momentum`` (when ``"batch_stats"`` is mutable), and when the collection
      ``"bn_moments"`` is mutable the batch moments are recorded there (``stop_gradient``-ed) for a later
      frozen-moments pass. Examples are coupled through ``mean``/``var``.
    * **frozen moments** (``train=True`` with a read-only ``"bn_moments"`` collection passed in the variables):
      ``stop_gradient`` of the recorded ``mean``/``var``; no running-statistics update. BN is then a fixed affine
      map per example, so ``grad_x`` of a sum over the batch gives exact per-example gradients, and full-gradient
      completeness holds with ``c`` as the bias.

    Parameters and statistics follow ``flax.linen.BatchNorm`` (``scale``, ``bias``; ``mean``, ``var``). The tap has
    kind ``"bn"`` and group ``tap_group`` (:class:`TapInfo`). It computes in float32 (or wider) even when its
    input is bfloat16 (mixed precision).
    """

    momentum: float = 0.9
    epsilon: float = 1e-5
    axis_name: Optional[str] = None
    tap_group: Optional[str] = None

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        feat = x.shape[-1]
        gamma = self.param("scale", nn.initializers.ones_init(), (feat,))
        beta = self.param("bias", nn.initializers.zeros_init(), (feat,))
        ra_mean = self.variable("batch_stats", "mean", lambda: jnp.zeros((feat,), jnp.float32))
        ra_var = self.variable("batch_stats", "var", lambda: jnp.ones((feat,), jnp.float32))
        dtype = jnp.result_type(x, gamma)
        frozen = (train and not self.is_initializing() and not self.is_mutable_collection(MOMENTS)
                  and self.has_variable(MOMENTS, "mean"))
        if frozen:
            mean = lax.stop_gradient(self.get_variable(MOMENTS, "mean"))
            var = lax.stop_gradient(self.get_variable(MOMENTS, "var"))
        elif train:
            axes = tuple(range(x.ndim - 1))
            mean = jnp.mean(x, axis=axes)
            mean_sq = jnp.mean(jnp.square(x), axis=axes)
            if self.axis_name is not None:
                mean, mean_sq = lax.pmean((mean, mean_sq), self.axis_name)
            var = jnp.maximum(mean_sq - jnp.square(mean), 0.0)
            if not self.is_initializing():
                if self.is_mutable_collection(MOMENTS):
                    self.put_variable(MOMENTS, "mean", lax.stop_gradient(mean))
                    self.put_variable(MOMENTS, "var", lax.stop_gradient(var))
                m = self.momentum
                ra_mean.value = (m * ra_mean.value + (1 - m) * lax.stop_gradient(mean)).astype(ra_mean.value.dtype)
                ra_var.value = (m * ra_var.value + (1 - m) * lax.stop_gradient(var)).astype(ra_var.value.dtype)
        else:
            mean, var = ra_mean.value.astype(dtype), ra_var.value.astype(dtype)
        s = gamma.astype(dtype) * lax.rsqrt(var.astype(dtype) + self.epsilon)
        c = beta.astype(dtype) - s * mean.astype(dtype)
        return bias_tap(self, x * s + c, c, kind="bn", group=self.tap_group)


def softplus_beta(z: jax.Array, beta: float) -> jax.Array:
    """``softplus_beta(z) = log(1 + exp(beta z)) / beta`` (thesis ch. 5 uses beta = 10)."""
    return jax.nn.softplus(beta * z) / beta


class Activation(nn.Module):
    """Elementwise non-linearity: ``"relu"`` or ``"softplus"`` with sharpness ``beta``.

    Softplus is smooth, so it has a non-zero implicit bias (thesis §3.4): locally
    ``sigma(z) = sigma'(z) z + (sigma(z) - sigma'(z) z)``, and the second term is exposed as a bias tap so that
    full-gradient completeness holds for softplus networks. ReLU is positively homogeneous (implicit bias 0),
    so it has no tap. Saliency methods that change the backward rule (guided backprop) intercept this module.
    """

    kind: str = "relu"
    beta: float = 10.0

    @nn.compact
    def __call__(self, z: jax.Array) -> jax.Array:
        if self.kind == "relu":
            return jax.nn.relu(z)
        if self.kind == "softplus":
            a = softplus_beta(z, self.beta)
            slope = jax.nn.sigmoid(self.beta * z)
            return bias_tap(self, a, a - slope * z, kind="activation")
        raise ValueError(f"unknown activation {self.kind!r}; expected 'relu' or 'softplus'.")


def max_pool(x: jax.Array, *, impl: str = "lax") -> jax.Array:
    """2x2 max-pooling with stride 2 (thesis §2.12.1); ``impl`` one of :data:`gradjax.models.cpu_ops.POOL_IMPLS`
    (``"mask"``: :func:`gradjax.models.cpu_ops.max_pool_mask`, identical values and gradients)."""
    if x.shape[1] < 2 or x.shape[2] < 2:
        raise ValueError(
            f"max-pooling needs spatial size >= 2, got {x.shape[1]}x{x.shape[2]}: the input is too small for this "
            "architecture (VGG-9/11/13/16 need 32x32 inputs; resize the images, e.g. gradjax.data.load_digits(size=32)).")
    if impl != "lax":
        _cpu_ops.check_impl("pool_impl", impl, _cpu_ops.POOL_IMPLS)
        return _cpu_ops.max_pool_mask(x)
    return nn.max_pool(x, window_shape=(2, 2), strides=(2, 2))


def global_average_pool(x: jax.Array) -> jax.Array:
    """[B, H, W, C] -> [B, C]."""
    return jnp.mean(x, axis=(1, 2))
