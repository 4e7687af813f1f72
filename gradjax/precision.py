"""Matmul precision: one policy that keeps gradjax's exact identities exact on GPUs and TPUs.

**Why.** On NVIDIA Ampere/Hopper GPUs JAX runs float32 convolutions and matrix products as TF32 (10 mantissa
bits) by default, on TPUs as one bfloat16 pass (7 bits); only the CPU is exact. Full-gradient completeness
(thesis eq. 3.3) then holds to ~1e-3 relative instead of ~1e-7, a Taylor trace sample's round-off floor
(eq. 5.9, :func:`gradjax.trace.taylor_noise_floor`) is ~2^13 times larger than float32's, and integrated
gradients' completeness delta gets a ~1e-3 floor.

**The policy (one way).**

* *Built-in models are exact by default*: every layer of :mod:`gradjax.models` takes ``precision`` (default
  ``"highest"``: float32 products on every backend) and ``dtype`` (compute dtype; ``jnp.bfloat16`` for mixed
  precision with float32 parameters). ``create_model(..., precision="default")`` (or ``None``: follow JAX's
  ``jax.default_matmul_precision``) trades exactness for TF32/bf16 speed.
* *Every gradient gradjax takes, and its exactness-critical paths, trace at "highest" unless you chose
  otherwise*: the one gradient primitive of :mod:`gradjax.gradients` (so every saliency map and the double-backprop
  losses of :mod:`gradjax.losses`), :func:`gradjax.fullgrad.full_gradients` and
  :func:`~gradjax.fullgrad.completeness_residual` (and everything built on :func:`~gradjax.fullgrad.tap_gradients`:
  FullGrad saliency, full-gradient matching), the trace estimators of :mod:`gradjax.trace` and
  :func:`gradjax.saliency.integrated_gradients_with_delta` run inside :func:`policy`:
  ``jax.default_matmul_precision("highest")`` *when no matmul precision has been set* — so a plain callable
  (an NNX model, a ``lambda x: model.apply(v, x)`` with Flax's ``precision=None`` layers) is exact too. It is a
  trace-time context: it composes with an outer ``jax.jit`` (the ops traced inside carry the precision, and
  their transposes inherit it).
* *Opting into speed is explicit*: set JAX's own matmul precision around the call (``with
  jax.default_matmul_precision("tensorfloat32"):`` / ``"bfloat16"`` / ``"default"``, or the
  ``JAX_DEFAULT_MATMUL_PRECISION`` environment variable / ``jax.config`` option); gradjax then respects it.
* *Silent inexactness is reported*: those paths :func:`audit` the traced computation (precision of every
  ``dot_general``/``conv_general_dilated`` on the current backend, bfloat16/float16 operands, emulated
  ``reduce_precision`` rounding) and issue a :class:`PrecisionWarning` naming the fix when the products are less
  precise than the computation's dtype; :mod:`gradjax.trace` sizes the Taylor round-off floor from the *effective*
  precision (:func:`effective_eps`).
* *Losses* (:mod:`gradjax.losses`, double backprop): their input-gradients come from :mod:`gradjax.gradients`, so
  they are exact by default; a loss's own forward terms (cross-entropy of a plain callable) follow the caller's
  precision — wrap the step in :func:`exact` to make everything exact, or build the model with
  ``precision="highest"`` (the default of gradjax's models).

Nothing here changes a global setting; ``import gradjax`` leaves JAX's configuration alone.

**Reduced precision on the CPU (tests).** ``emulate="gpu"`` / ``"tpu"`` on the built-in models rounds the inputs of
every convolution / Dense product with ``jax.lax.reduce_precision`` (exponent 8 bits, mantissa 10 for TF32, 7 for
bfloat16, 16 for TPU "high" = bfloat16x3) exactly when that chip would at the layer's resolved precision (its
``precision``, or for ``None`` the active ``jax.default_matmul_precision``): :func:`emulate_rounding`. The audit
sees the rounding, so the warnings and floors behave on the CPU as on the chip.
"""
from __future__ import annotations

import contextlib
import functools
import warnings
from typing import Any, Callable, Iterator, NamedTuple, Optional, Union

import jax
import jax.numpy as jnp
from jax import lax

__all__ = ["PRECISIONS", "EMULATIONS", "PrecisionWarning", "PrecisionReport", "lax_precision", "active_precision",
           "mantissa_bits", "emulate_rounding", "exact", "policy", "exact_by_default", "audit", "report_from_jaxpr", "effective_eps",
           "warn_if_inexact"]

PrecisionLike = Union[None, str, lax.Precision]

_NAMES = {
    "highest": lax.Precision.HIGHEST, "float32": lax.Precision.HIGHEST,
    "high": lax.Precision.HIGH, "tensorfloat32": lax.Precision.HIGH,
    "default": lax.Precision.DEFAULT, "bfloat16": lax.Precision.DEFAULT, "fastest": lax.Precision.DEFAULT,
}
PRECISIONS = tuple(_NAMES)
"""Accepted precision names (JAX's): ``highest``/``float32``, ``high``/``tensorfloat32``,
``default``/``bfloat16``/``fastest``; or a :class:`jax.lax.Precision`, or ``None`` (follow the active
``jax.default_matmul_precision``)."""

EMULATIONS = ("gpu", "tpu")
"""Chips whose float32 product rounding :func:`emulate_rounding` reproduces."""

_EXPONENT_BITS = 8  # float32 / TF32 / bfloat16 share float32's exponent range


class PrecisionWarning(UserWarning):
    """An exactness-critical gradjax computation runs with reduced-precision products (silence it with
    ``warnings.simplefilter("ignore", gradjax.precision.PrecisionWarning)`` once you have chosen that)."""


def lax_precision(precision: PrecisionLike) -> Optional[lax.Precision]:
    """``None`` (follow the active default), or the :class:`jax.lax.Precision` named by ``precision``."""
    if precision is None or isinstance(precision, lax.Precision):
        return precision
    if isinstance(precision, str) and precision.lower() in _NAMES:
        return _NAMES[precision.lower()]
    raise ValueError(f"precision must be None, a jax.lax.Precision or one of {', '.join(PRECISIONS)}; "
                     f"got {precision!r}.")


def active_precision() -> lax.Precision:
    """The precision a product traced now with ``precision=None`` gets: the active
    ``jax.default_matmul_precision`` (context, config or ``JAX_DEFAULT_MATMUL_PRECISION``), else ``DEFAULT``."""
    value = jax.config.jax_default_matmul_precision
    if value is None:
        return lax.Precision.DEFAULT
    return _NAMES.get(str(value).lower(), lax.Precision.DEFAULT)


def _resolve(precision) -> lax.Precision:
    p = lax_precision(precision)
    return active_precision() if p is None else p


def mantissa_bits(precision: PrecisionLike, *, backend: Optional[str] = None, dtype=jnp.float32) -> int:
    """Explicit mantissa bits that operands of dtype ``dtype`` keep in a product at ``precision`` on ``backend``
    (``"cpu"``, ``"gpu"``, ``"tpu"``; default :func:`jax.default_backend`).

    float32: CPU 23 at every precision; GPU (Ampere and later) 23 at ``HIGHEST``, 10 (TF32) otherwise; TPU 23 at
    ``HIGHEST``, ~16 at ``HIGH`` (three bfloat16 passes), 7 at ``DEFAULT`` (one bfloat16 pass). Other dtypes keep
    their own mantissa (bfloat16 7, float16 10, float64 52)."""
    dt = jnp.dtype(dtype)
    nmant = int(jnp.finfo(dt).nmant)
    if dt != jnp.float32:
        return nmant
    backend = jax.default_backend() if backend is None else backend
    p = _resolve(precision)
    if backend == "gpu":
        return nmant if p == lax.Precision.HIGHEST else 10
    if backend == "tpu":
        return {lax.Precision.HIGHEST: nmant, lax.Precision.HIGH: 16}.get(p, 7)
    return nmant


def emulate_rounding(*arrays: jax.Array, precision: PrecisionLike, emulate: Optional[str]) -> tuple:
    """Round float32 ``arrays`` (the operands of one product) as chip ``emulate`` (:data:`EMULATIONS`) would at
    ``precision`` (``None``: the active ``jax.default_matmul_precision``), with
    ``lax.reduce_precision(a, exponent_bits=8, mantissa_bits=b)``, ``b`` from :func:`mantissa_bits`. Identity for
    ``emulate=None``, for other dtypes and at ``"highest"``. Use it on the CPU to test reduced-precision behaviour."""
    if emulate is None:
        return arrays
    if emulate not in EMULATIONS:
        raise ValueError(f"emulate must be None or one of {', '.join(EMULATIONS)}; got {emulate!r}.")
    bits = mantissa_bits(precision, backend=emulate)
    out = []
    for a in arrays:
        if jnp.result_type(a) == jnp.float32 and bits < 23:
            a = lax.reduce_precision(a, exponent_bits=_EXPONENT_BITS, mantissa_bits=bits)
        out.append(a)
    return tuple(out)


@contextlib.contextmanager
def exact() -> Iterator[None]:
    """``with gradjax.precision.exact():`` — every product traced inside with ``precision=None`` is float32-exact
    (``jax.default_matmul_precision("highest")``). For your own exact code, e.g. a training step whose loss
    differentiates a plain callable twice."""
    with jax.default_matmul_precision("highest"):
        yield


@contextlib.contextmanager
def policy() -> Iterator[None]:
    """The library default of the exactness-critical paths: :func:`exact` unless a matmul precision has been set
    (``jax.default_matmul_precision`` context, ``jax.config`` or ``JAX_DEFAULT_MATMUL_PRECISION``), which is then
    respected (the caller opted into speed)."""
    if jax.config.jax_default_matmul_precision is None:
        with exact():
            yield
    else:
        yield


def exact_by_default(fn: Callable) -> Callable:
    """Decorator: run ``fn`` inside :func:`policy` (at trace time; signature unchanged)."""
    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        with policy():
            return fn(*args, **kwargs)
    return wrapped


class PrecisionReport(NamedTuple):
    """What :func:`audit` found in a traced computation.

    Attributes:
      mantissa_bits: the fewest explicit mantissa bits any product's operands keep (52/23 = exact float64/float32;
        10 = TF32, 7 = bfloat16), or the dtype's when there is no product.
      dtype_bits: mantissa bits of the computation's floating dtype (the inputs').
      sites: short descriptions of the products (and emulated roundings) below ``dtype_bits``.
    """

    mantissa_bits: int
    dtype_bits: int
    sites: tuple

    @property
    def eps(self) -> float:
        """Unit round-off of the effective precision, ``2^-mantissa_bits``."""
        return 2.0 ** -min(self.mantissa_bits, self.dtype_bits)

    @property
    def exact(self) -> bool:
        """Whether the products are as precise as the dtype."""
        return self.mantissa_bits >= self.dtype_bits


def _subjaxprs(params) -> Iterator[Any]:
    for v in params.values():
        for item in (v if isinstance(v, (tuple, list)) else (v,)):
            if hasattr(item, "eqns"):
                yield item
            elif hasattr(item, "jaxpr") and hasattr(item.jaxpr, "eqns"):
                yield item.jaxpr


def _precision_bits(prec, dtype, backend) -> int:
    if isinstance(prec, (tuple, list)):
        return min((_precision_bits(p, dtype, backend) for p in prec), default=mantissa_bits(None, backend=backend,
                                                                                                  dtype=dtype))
    if prec is None or isinstance(prec, lax.Precision):
        # None in a traced product means XLA's DEFAULT (the config was read when the op was traced)
        return mantissa_bits(lax.Precision.DEFAULT if prec is None else prec, backend=backend, dtype=dtype)
    name = str(prec).upper()  # a DotAlgorithmPreset
    for key, bits in (("BF16", 7), ("TF32", 10), ("F16", 10), ("F32", 23), ("F64", 52)):
        if key in name:
            return min(bits, int(jnp.finfo(dtype).nmant))
    return mantissa_bits(None, backend=backend, dtype=dtype)


def _walk(jaxpr, backend, found: list) -> None:
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name in ("dot_general", "conv_general_dilated"):
            dts = [v.aval.dtype for v in eqn.invars if jnp.issubdtype(v.aval.dtype, jnp.floating)]
            if dts:
                bits = min(_precision_bits(eqn.params.get("precision"), dt, backend) for dt in dts)
                found.append((bits, f"{name}[{','.join(sorted({jnp.dtype(d).name for d in dts}))}, "
                                    f"precision={eqn.params.get('precision')}]"))
        elif name == "reduce_precision":
            found.append((int(eqn.params["mantissa_bits"]), f"reduce_precision[mantissa_bits="
                                                              f"{eqn.params['mantissa_bits']}]"))
        for sub in _subjaxprs(eqn.params):
            _walk(sub, backend, found)


def _abstract(a):
    if isinstance(a, jax.ShapeDtypeStruct):
        return a
    return jax.ShapeDtypeStruct(jnp.shape(a), jnp.result_type(a))


def audit(fn: Callable, *args, backend: Optional[str] = None, dtype=None) -> PrecisionReport:
    """Trace ``fn(*args)`` (no computation: :func:`jax.make_jaxpr` on the shapes) and report the effective
    precision of its products on ``backend`` (default: the current one) under the precision context active now.
    ``dtype``: the computation's dtype (default: the widest floating dtype among ``args``' leaves, else float32).
    Costs one trace; call it at trace time (it works inside ``jit``)."""
    leaves = jax.tree.leaves(args)
    if dtype is None:
        floats = [jnp.result_type(a) for a in leaves if jnp.issubdtype(jnp.result_type(a), jnp.floating)]
        dtype = max(floats, key=lambda d: jnp.finfo(d).nmant, default=jnp.float32)
    return report_from_jaxpr(jax.make_jaxpr(fn)(*jax.tree.map(_abstract, args)), dtype, backend=backend)


def report_from_jaxpr(closed, dtype, *, backend: Optional[str] = None) -> PrecisionReport:
    """:func:`audit` of an already traced (closed) jaxpr, e.g. from ``jax.make_jaxpr(fn, return_shape=True)``;
    ``dtype``: the computation's floating dtype."""
    backend = jax.default_backend() if backend is None else backend
    dtype_bits = int(jnp.finfo(dtype).nmant)
    found: list = []
    _walk(closed.jaxpr, backend, found)
    bits = min((b for b, _ in found), default=dtype_bits)
    sites = tuple(sorted({s for b, s in found if b < dtype_bits}))
    return PrecisionReport(min(bits, dtype_bits), dtype_bits, sites)


def effective_eps(fn: Callable, x) -> float:
    """Unit round-off of ``fn(x)``'s arithmetic: ``2^-bits`` with ``bits`` the fewer of ``x``'s dtype mantissa and
    the :func:`audit`'s effective product precision (float32 eps ~1.2e-7; TF32 ~9.8e-4; bfloat16 ~7.8e-3)."""
    return audit(fn, x).eps


def warn_if_inexact(report: PrecisionReport, what: str, consequence: str, *, stacklevel: int = 3) -> None:
    """Issue a :class:`PrecisionWarning` when ``report`` is not exact: ``what`` names the computation,
    ``consequence`` the accuracy lost; the message names the fix."""
    if report.exact:
        return
    user_set = jax.config.jax_default_matmul_precision
    fix = ("leave JAX's matmul precision unset (gradjax then traces this at 'highest') or run it inside "
           "gradjax.precision.exact()")
    if user_set is not None:
        fix = (f"jax_default_matmul_precision is set to {user_set!r}: run it inside gradjax.precision.exact() "
               f"(or unset it)")
    warnings.warn(
        f"{what}: products run with ~{report.mantissa_bits} mantissa bits on {jax.default_backend()} (eps "
        f"{2.0 ** -report.mantissa_bits:.1e}), not the {report.dtype_bits} of the dtype ({', '.join(report.sites[:4])}"
        f"{', ...' if len(report.sites) > 4 else ''}); {consequence}. For exact results {fix}; gradjax models "
        f"must keep precision='highest' (the default) and a float32 dtype.",
        PrecisionWarning, stacklevel=stacklevel)
