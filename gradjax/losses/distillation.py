"""Distillation losses of thesis ch. 2: activation matching, Jacobian matching (squared error, Prop. 1; softmax
cross-entropy, eq. 2.2), a stochastic all-class Jacobian distance, and normalized gradient matching (eq. 2.9).

Every function returns **one value per example**, shape ``[B]`` (optax style: no hidden batch reduction; the
caller averages, e.g. through :func:`gradjax.losses.make_loss_fn`).

Function-level losses take ``student_fn`` and ``teacher_fn``, plain callables ``x [B, ...] -> logits [B, K]``
whose examples are processed independently (eval mode, or a train-mode network in the "frozen moments" BatchNorm
mode), so that per-example input-gradients come from one reverse pass over the summed selected logits (the
*sum trick* of :mod:`gradjax.gradients`). The student's input-gradient stays differentiable w.r.t. whatever
``student_fn`` closes over (double backprop); the teacher's values are wrapped in ``stop_gradient``.

Which Jacobian rows (thesis §2.4.1, "Approximating the full Jacobian"):

* ``output="target"`` — the row of the correct class (needs ``labels``), the thesis's default;
* ``output="top"`` — the row of the teacher's arg-max logit (no labels needed; the same index for both nets);
* ``output="full"`` — every row (``K`` reverse passes).
"""
from __future__ import annotations

from typing import Callable, Literal, Optional

import jax
import jax.numpy as jnp

from gradjax import _validation as V
from gradjax import gradients as G

Array = jax.Array
LogitsFn = Callable[[Array], Array]
Output = Literal["target", "top", "full"]
_OUTPUTS = ("target", "top", "full")

__all__ = [
    "activation_matching",
    "normalized_gradient_matching",
    "jacobian_rows",
    "jacobian_matching",
    "jacobian_matching_cross_entropy",
    "normalized_jacobian_matching",
    "stochastic_jacobian_matching",
    "noisy_activation_matching",
]


# ------------------------------------------------------------------------------------------------ validation
def _check_pair(a: Array, b: Array, name_a: str, name_b: str) -> None:
    if jnp.shape(a) != jnp.shape(b):
        raise ValueError(f"{name_a} and {name_b} must have the same shape; got {tuple(jnp.shape(a))} and "
                         f"{tuple(jnp.shape(b))}.")
    if jnp.ndim(a) < 1:
        raise ValueError(f"{name_a} must have a leading batch axis [B, ...]; got a scalar.")


def _check_output(output: str, labels) -> None:
    if output not in _OUTPUTS:
        raise ValueError(f"output must be one of {_OUTPUTS}; got {output!r}.")
    if output == "target" and labels is None:
        raise ValueError("output='target' (the correct-class Jacobian row, thesis §2.4.1) needs labels [B]; pass "
                         "labels=..., or use output='top' (teacher's arg-max class) or output='full'.")


def _check_x(x: Array) -> None:
    if jnp.ndim(x) < 2:
        raise ValueError(f"x must be a batch [B, ...] with rank >= 2; got shape {tuple(jnp.shape(x))}.")
    V.check_floating(x, "x")
    V.check_finite(x, "x")


def _sum_per_example(v: Array) -> Array:
    return jnp.sum(v.reshape(v.shape[0], -1), axis=1)


def _safe_norm(v: Array) -> Array:
    """Per-example L2 norm ``[B]`` with a zero (not NaN) gradient at ``v = 0``."""
    sq = _sum_per_example(jnp.square(v))
    pos = sq > 0
    return jnp.where(pos, jnp.sqrt(jnp.where(pos, sq, 1.0)), 0.0)


# ----------------------------------------------------------------------------------------- array-level losses
def activation_matching(student_logits: Array, teacher_logits: Array) -> Array:
    """Squared error of the logits ("Match Activations", thesis §2.12.2; the first term of Prop. 1):

        ``l_b = sum_i (T^i(x_b) - S^i(x_b))^2``.

    Args: ``student_logits``, ``teacher_logits`` ``[B, K]`` (pre-softmax). Returns ``[B]``. The teacher side is
    not stopped here (pass ``stop_gradient`` yourself if it closes over trainable values).
    """
    _check_pair(student_logits, teacher_logits, "student_logits", "teacher_logits")
    return _sum_per_example(jnp.square(teacher_logits - student_logits))


def normalized_gradient_matching(student_grad: Array, teacher_grad: Array) -> Array:
    """Normalized gradient matching, thesis eq. 2.9 (squared):

        ``l_b = || grad_f(x_b) / ||grad_f(x_b)||_2  -  grad_g(x_b) / ||grad_g(x_b)||_2 ||_2^2``.

    Args: ``student_grad``, ``teacher_grad`` ``[B, ...]`` (any trailing shape, e.g. input-gradients
    ``[B, H, W, C]``). Returns ``[B]`` in ``[0, 4]``. A zero gradient contributes the zero vector (no NaN).
    """
    _check_pair(student_grad, teacher_grad, "student_grad", "teacher_grad")
    def unit(g):
        n = _safe_norm(g)
        return g / jnp.where(n > 0, n, 1.0).reshape((-1,) + (1,) * (g.ndim - 1))
    return _sum_per_example(jnp.square(unit(teacher_grad) - unit(student_grad)))


# --------------------------------------------------------------------------------------- Jacobian selection
def _teacher_rows(teacher_logits: Array, output: str, labels) -> Optional[Array]:
    if output == "target":
        labels = jnp.asarray(labels)
        V.check_labels(labels, teacher_logits.shape[-1], teacher_logits.shape[0], "labels")
        return labels.astype(jnp.int32)
    if output == "top":
        return jnp.argmax(jax.lax.stop_gradient(teacher_logits), axis=-1).astype(jnp.int32)
    return None


def _row_chooser(output: str, labels):
    """``None`` (full Jacobian) or a function ``teacher_logits -> rows [B]``."""
    if output == "full":
        return None
    return lambda logits: _teacher_rows(jax.lax.stop_gradient(logits), output, labels)


def jacobian_rows(logits_fn: LogitsFn, x: Array, rows) -> tuple[Array, Array]:
    """``(logits [B, K], J)`` with ``J = grad_{x_b} f_{rows_b}(x_b)`` ``[B, ...]`` for given row indices ``[B]``
    (or a function ``logits -> rows``, evaluated on the same forward pass), or the full input-Jacobian
    ``[B, K, ...]`` when ``rows is None`` — from one ``jax.vjp`` (sum trick; the examples of ``logits_fn`` must be
    independent). Differentiable (double backprop)."""
    if rows is None:
        return G.logits_and_jacobian(logits_fn, x)
    tg = G.logits_and_target_gradient(logits_fn, x, rows)
    return tg.logits, tg.gradient


def jacobian_matching(student_fn: LogitsFn, teacher_fn: LogitsFn, x: Array, *, output: Output = "target",
                      labels: Optional[Array] = None) -> Array:
    """Jacobian matching with squared error, the regularizer of thesis Proposition 1:

        ``l_b = sum_{i in I_b} || grad_x T^i(x_b) - grad_x S^i(x_b) ||_2^2``

    with ``I_b = {y_b}`` (``output="target"``), ``{argmax_i T^i(x_b)}`` (``"top"``) or all ``K`` classes
    (``"full"``; §2.4.1). Prop. 1: ``E_xi sum_i (T^i(x+xi) - S^i(x+xi))^2 = sum_i (T^i - S^i)^2 +
    sigma^2 * [this loss with output="full"] + O(sigma^4)``, ``xi ~ N(0, sigma^2 I)``. Returns ``[B]``.
    """
    _check_x(x)
    _check_output(output, labels)
    t_logits, t_jac = jacobian_rows(teacher_fn, x, _row_chooser(output, labels))
    t_jac = jax.lax.stop_gradient(t_jac)
    rows = None if output == "full" else _teacher_rows(jax.lax.stop_gradient(t_logits), output, labels)
    _, s_jac = jacobian_rows(student_fn, x, rows)
    return _sum_per_example(jnp.square(t_jac - s_jac))


def normalized_jacobian_matching(student_fn: LogitsFn, teacher_fn: LogitsFn, x: Array, *,
                                 output: Literal["target", "top"] = "target", labels: Optional[Array] = None) -> Array:
    """Eq. 2.9 applied to one Jacobian row: ``|| grad T^c / ||grad T^c|| - grad S^c / ||grad S^c|| ||^2`` with
    ``c`` the correct class (``"target"``) or the teacher's arg-max (``"top"``). Returns ``[B]``."""
    _check_x(x)
    if output == "full":
        raise ValueError("normalized_jacobian_matching compares one row; use output='target' or 'top'.")
    _check_output(output, labels)
    t_logits, t_g = jacobian_rows(teacher_fn, x, _row_chooser(output, labels))
    _, s_g = jacobian_rows(student_fn, x, _teacher_rows(jax.lax.stop_gradient(t_logits), output, labels))
    return normalized_gradient_matching(s_g, jax.lax.stop_gradient(t_g))


def jacobian_matching_cross_entropy(student_fn: LogitsFn, teacher_fn: LogitsFn, x: Array, *, sigma: float,
                                    temperature: float = 1.0, output: Output = "full",
                                    labels: Optional[Array] = None, centered: bool = True) -> Array:
    """Soft-target cross-entropy with its Jacobian term, thesis eq. 2.2:

        ``l_b = - sum_i T_s^i log S_s^i  -  sigma^2 sum_{i in I_b} grad_x T_s^i . grad_x S_s^i / S_s^i``

    with ``T_s = softmax(T / temperature)``, ``S_s = softmax(S / temperature)`` at ``x_b`` and the rows ``I_b``
    chosen by ``output`` (as in :func:`jacobian_matching`; the thesis writes the full sum). ``centered=True``
    (default) subtracts the same expression with ``S = T`` (a constant in the student's parameters: the
    gradient is unchanged), so that the value is exactly 0 when the student equals the teacher:
    ``KL(T_s || S_s) - sigma^2 sum_i grad T_s^i . (grad S_s^i / S_s^i - grad T_s^i / T_s^i)``.
    Returns ``[B]``. (The thesis found the squared-error form easier to tune and used it, §2.4.)
    """
    _check_x(x)
    _check_output(output, labels)
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0; got {temperature}.")
    probs = lambda fn: (lambda z: jax.nn.softmax(fn(z) / temperature, axis=-1))
    t_logits = jax.lax.stop_gradient(teacher_fn(x))
    rows = _teacher_rows(t_logits, output, labels) if output != "full" else None
    t_p, t_j = jax.tree.map(jax.lax.stop_gradient, jacobian_rows(probs(teacher_fn), x, rows))
    s_p, s_j = jacobian_rows(probs(student_fn), x, rows)
    log_s = jax.nn.log_softmax(student_fn(x) / temperature, axis=-1)
    log_t = jax.nn.log_softmax(t_logits / temperature, axis=-1)
    if rows is None:
        dot = lambda a, p: jnp.sum(_flat_rows(t_j) * _flat_rows(a), axis=-1) / p  # [B, K]
        jac_s = jnp.sum(dot(s_j, s_p), axis=-1)
        jac_t = jnp.sum(dot(t_j, t_p), axis=-1)
    else:
        sel = lambda p: jnp.take_along_axis(p, rows[:, None], axis=-1)[:, 0]
        jac_s = _sum_per_example(t_j * s_j) / sel(s_p)
        jac_t = _sum_per_example(t_j * t_j) / sel(t_p)
    value = -jnp.sum(t_p * log_s, axis=-1) - sigma ** 2 * jac_s
    if centered:
        value = value - (-jnp.sum(t_p * log_t, axis=-1) - sigma ** 2 * jac_t)
    return value


def _flat_rows(j: Array) -> Array:
    return j.reshape(j.shape[0], j.shape[1], -1)


# --------------------------------------------------------------------------------------- stochastic Jacobian
def stochastic_jacobian_matching(student_fn: LogitsFn, teacher_fn: LogitsFn, x: Array, key: Optional[Array] = None,
                                 *, num_probes: int = 1, probe_space: Literal["input", "output"] = "input",
                                 distribution: Literal["rademacher", "gaussian"] = "rademacher",
                                 probes: Optional[Array] = None) -> Array:
    """Stochastic all-class Jacobian matching (not in the thesis): an unbiased estimate of
    ``||J_T(x_b) - J_S(x_b)||_F^2`` (= :func:`jacobian_matching` with ``output="full"``), ``J = d logits / d x``
    ``[K, D]``.

    * ``probe_space="input"`` (default): ``v ~ p(v)`` in input space ``[B, ...]`` with ``E[v v^T] = I_D``,
      ``l_b = mean_probes || J_T v - J_S v ||^2``, one **JVP** (forward-mode) per probe and network;
    * ``probe_space="output"``: ``u`` in logit space ``[B, K]`` with ``E[u u^T] = I_K``,
      ``l_b = mean_probes || J_T^T u - J_S^T u ||^2``, one **VJP** per probe and network.

    Both are unbiased because ``E ||M v||^2 = tr(M E[v v^T] M^T) = ||M||_F^2`` for ``M = J_T - J_S`` whenever
    ``E[v v^T] = I`` (Rademacher or standard Gaussian probes; averaging over *all* ``2^D`` sign vectors gives the
    exact value, which the tests use). The input-space JVP form costs one forward-mode pass per probe instead of
    the ``K`` reverse passes of the full Jacobian; the output-space form is the cheaper one when ``K`` is large
    and ``D`` small. Pass ``probes`` ``[P, *shape]`` (shape = ``x.shape`` or ``[B, K]``) to fix them, else ``key``
    and ``num_probes``. Returns ``[B]``.
    """
    _check_x(x)
    if probe_space not in ("input", "output"):
        raise ValueError(f"probe_space must be 'input' or 'output'; got {probe_space!r}.")
    if distribution not in ("rademacher", "gaussian"):
        raise ValueError(f"distribution must be 'rademacher' or 'gaussian'; got {distribution!r}.")
    if probe_space == "input":
        shape = tuple(x.shape)
    else:
        shape = tuple(jax.eval_shape(student_fn, x).shape)
    if probes is None:
        if key is None:
            raise ValueError("stochastic_jacobian_matching needs key= (a jax.random key) or probes=.")
        if num_probes < 1:
            raise ValueError(f"num_probes must be >= 1; got {num_probes}.")
        if distribution == "rademacher":
            probes = jax.random.rademacher(key, (num_probes,) + shape, dtype=x.dtype)
        else:
            probes = jax.random.normal(key, (num_probes,) + shape, dtype=x.dtype)
    elif tuple(jnp.shape(probes)[1:]) != shape:
        raise ValueError(f"probes must have shape [P, {', '.join(map(str, shape))}] ({probe_space} space); got "
                         f"{tuple(jnp.shape(probes))}.")

    if probe_space == "input":
        def one(v):
            jt = jax.lax.stop_gradient(jax.jvp(teacher_fn, (x,), (v,))[1])
            js = jax.jvp(student_fn, (x,), (v,))[1]
            return _sum_per_example(jnp.square(jt - js))
    else:
        _, t_pull = jax.vjp(teacher_fn, x)
        _, s_pull = jax.vjp(student_fn, x)

        def one(u):
            jt = jax.lax.stop_gradient(t_pull(u)[0])
            js = s_pull(u)[0]
            return _sum_per_example(jnp.square(jt - js))

    return jnp.mean(jax.vmap(one)(probes), axis=0)


def noisy_activation_matching(student_fn: LogitsFn, teacher_fn: LogitsFn, x: Array, key: Array, *, sigma: float,
                              num_samples: int = 1, antithetic: bool = True) -> Array:
    """Monte-Carlo noise-augmented activation matching, the left-hand side of Proposition 1:

        ``l_b = mean_{n} sum_i (T^i(x_b + xi_n) - S^i(x_b + xi_n))^2``,  ``xi_n ~ N(0, sigma^2 I)``,

    which Prop. 1 equates (up to ``O(sigma^4)``) to ``activation_matching + sigma^2 * jacobian_matching(full)``.
    ``antithetic=True`` uses the pairs ``(xi, -xi)`` (``num_samples`` pairs), which cancels the first-order
    noise term and makes the estimate converge much faster; the expectation is unchanged. The thesis's point
    (§2.4): Jacobian matching replaces ~1e4 such samples. Returns ``[B]``.
    """
    _check_x(x)
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1; got {num_samples}.")
    if not sigma >= 0:
        raise ValueError(f"sigma must be >= 0; got {sigma}.")
    xi = sigma * jax.random.normal(key, (num_samples,) + tuple(x.shape), dtype=x.dtype)
    if antithetic:
        xi = jnp.concatenate([xi, -xi], axis=0)

    def one(e):
        z = x + e
        return activation_matching(student_fn(z), jax.lax.stop_gradient(teacher_fn(z)))

    # All noise samples in one batched (vmapped) call: a lax.map loop over them cost the train step more than its
    # passes count (docs/BENCHMARKS.md §5). Under differentiation the loop saved no memory (its backward keeps
    # every iteration's residuals too).
    return jnp.mean(jax.vmap(one)(xi), axis=0)
