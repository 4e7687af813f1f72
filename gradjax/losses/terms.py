"""Every training term of gradjax in one namespace, and the combinator that turns weighted terms into a training
``loss_fn`` for :mod:`gradjax.train`.

    loss = sum_t  weight_t * mean_b term_t(b)          (thesis §2.12.2: alpha CE + beta MatchAct + gamma MatchGrad)

**One naming rule.** The per-example losses live in their modules (:mod:`~gradjax.losses.classification`,
:mod:`~gradjax.losses.distillation`, :mod:`~gradjax.losses.attention`, :mod:`~gradjax.losses.regularizers`,
:mod:`~gradjax.losses.fullgrad_matching`, :mod:`~gradjax.losses.score_matching`, :mod:`~gradjax.losses.fooling`)
and return ``[B]``; the :class:`Term` factory of the loss ``X`` is ``X_term`` here and nowhere else:

* :func:`cross_entropy_term` — :func:`gradjax.losses.classification.cross_entropy` (§2.12.2, "CE");
* :func:`activation_matching_term` — :func:`gradjax.losses.distillation.activation_matching` (§2.12.2);
* :func:`jacobian_matching_term` — :func:`gradjax.losses.distillation.jacobian_matching` (Prop. 1) and its
  normalized (eq. 2.9) and cross-entropy (eq. 2.2) forms;
* :func:`stochastic_jacobian_matching_term`, :func:`noisy_activation_matching_term` — the stochastic forms in
  :mod:`~gradjax.losses.distillation`;
* :func:`attention_matching_term`, :func:`attention_jacobian_matching_term` — eq. 2.8 and §2.5.2
  (:mod:`~gradjax.losses.attention`);
* :func:`gradient_norm_term` — :func:`gradjax.losses.regularizers.gradient_norm` (Prop. 2, eq. 2.3; the ch. 5
  "Gradient-Norm" regularizer of §5.5 as ``form="logit"``); :func:`l2_term` — :func:`gradjax.losses.regularizers.l2`;
* :func:`full_gradient_matching_term`, :func:`bias_gradient_penalty_term`, :func:`bias_l2_term` — eq. 4.3,
  Prop. 10 and the Table 4.3 baseline (:mod:`~gradjax.losses.fullgrad_matching`);
* :func:`score_matching_term`, :func:`anti_score_matching_term` — eq. 5.4 and §5.5
  (:mod:`~gradjax.losses.score_matching`);
* :func:`fooling_loss_term` — :func:`gradjax.losses.fooling.fooling_loss` (eq. 5.7).

:func:`make_loss_fn` returns ``loss_fn(params, model_state, batch, ctx) -> (loss, aux)`` — the engine contract
of :mod:`gradjax.train` (``ctx = StepContext(rng, step, frozen)``; ``aux = {"model_state", "metrics"}``), so every
objective goes through the one step builder (``jit_train_step``, ``pmap_train_step``, ``sharded_train_step``)
and :func:`gradjax.train.fit`.

**What a term sees.** A :class:`Term` is ``(name, fn, weight)`` with ``fn(inputs: TermInputs) -> [B]`` (one
value per example; a scalar ``()`` is allowed for parameter-level terms such as l2). :class:`TermInputs` holds
the student's ``params``/``model_state``, the ``batch``, ``ctx``, this term's own PRNG key, the clean train-mode
pass's ``logits`` and BatchNorm ``moments`` (and captured features), and callables for extra passes:

* ``inputs.student(x)`` — the student's logits under the extra-pass BatchNorm policy (default ``"frozen"``:
  the clean pass's moments, examples independent, exact per-example input-gradients — see
  :func:`gradjax.model.extra_pass_fn`); differentiable w.r.t. ``params`` (double backprop);
* ``inputs.student_features(x, layers)`` — ``(logits, {layer: [B, h, w, c]})`` of the same pass;
* ``inputs.teacher(x)`` / ``inputs.teacher_features(x, layers)`` — the teacher in eval mode, with its variables
  taken from ``ctx.frozen["teacher"]`` (an argument of the compiled step, never a closure constant);
* ``inputs.student_handle()`` / ``inputs.teacher_handle()`` — the same two models as
  :class:`~gradjax.model.ModelHandle` (for the bias-gradient maps of chapter 4).

Any other objective plugs in by writing such a function and wrapping it with :func:`term`. A two-head student
(LwF) selects its head with ``head=(start, stop)`` (a slice of the logits).
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from gradjax import model as gm
from gradjax.gradients import PREDICTED
from gradjax.losses import attention as A
from gradjax.losses import classification as CL
from gradjax.losses import distillation as D
from gradjax.losses import fooling as FO
from gradjax.losses import fullgrad_matching as FM
from gradjax.losses import regularizers as R
from gradjax.losses import score_matching as SM

Array = jax.Array
PyTree = Any
Head = Optional[tuple[int, int]]

__all__ = ["Term", "TermInputs", "make_loss_fn", "term", "cross_entropy_term", "activation_matching_term",
           "jacobian_matching_term", "stochastic_jacobian_matching_term", "noisy_activation_matching_term",
           "attention_matching_term", "attention_jacobian_matching_term", "gradient_norm_term", "l2_term",
           "full_gradient_matching_term", "bias_gradient_penalty_term", "bias_l2_term", "score_matching_term",
           "anti_score_matching_term", "fooling_loss_term"]


@dataclasses.dataclass(frozen=True)
class TermInputs:
    """Everything a term function may use (see the module docstring). Built inside the traced loss."""

    params: PyTree
    model_state: PyTree
    batch: Mapping[str, Array]
    ctx: Any
    rng: Array
    logits: Array
    moments: PyTree
    features: Mapping[str, Array]
    apply_fn: Callable
    policy: str
    teacher_apply_fn: Optional[Callable] = None

    @property
    def x(self) -> Array:
        """The batch's inputs, ``batch["image"]``."""
        return self.batch["image"]

    @property
    def labels(self) -> Optional[Array]:
        """The batch's labels, ``batch["label"]`` (``None`` for an unlabelled batch)."""
        return self.batch.get("label")

    def student(self, x: Array) -> Array:
        """Student logits ``[B, K]`` under the extra-pass BatchNorm policy (default: frozen moments)."""
        return gm.extra_pass_fn(self.apply_fn, self.params, self.model_state, self.moments, self.policy)(x)[0]

    def student_features(self, x: Array, layers: Sequence[str]) -> tuple[Array, dict]:
        """``(logits, {layer: features})`` of the student's extra pass (frozen moments or eval mode)."""
        if self.policy == "train":
            raise ValueError("student_features supports the 'frozen' and 'eval' BatchNorm policies only.")
        variables = {"params": self.params, **self.model_state}
        if self.policy == "frozen" and self.moments:
            variables[gm.MOMENTS] = self.moments
        return A.capture_features(self.apply_fn, variables, x, layers, train=self.policy == "frozen")

    def _teacher_variables(self) -> PyTree:
        if self.teacher_apply_fn is None:
            raise ValueError("this term needs a teacher: make_loss_fn(..., teacher_apply_fn=teacher_model.apply) and "
                             "pass frozen={'teacher': teacher_variables} to the train step.")
        frozen = self.ctx.frozen
        if not isinstance(frozen, Mapping) or "teacher" not in frozen:
            raise ValueError("this term needs the teacher's variables in the step's frozen argument: "
                             "step(state, batch, frozen={'teacher': {'params': ..., 'batch_stats': ...}}).")
        return jax.lax.stop_gradient(frozen["teacher"])

    def teacher(self, x: Array) -> Array:
        """Teacher logits (eval mode, variables from ``ctx.frozen['teacher']``); input-differentiable."""
        return self.teacher_apply_fn(self._teacher_variables(), x, train=False)

    def teacher_features(self, x: Array, layers: Sequence[str]) -> tuple[Array, dict]:
        """``(logits, {layer: features})`` of the teacher in eval mode (variables from ``ctx.frozen['teacher']``)."""
        return A.capture_features(self.teacher_apply_fn, self._teacher_variables(), x, layers, train=False)

    def student_handle(self) -> gm.ModelHandle:
        """The student as a :class:`~gradjax.model.ModelHandle` for one extra pass with examples independent:
        frozen moments (policy ``"frozen"``: ``train=True`` with the clean pass's batch moments) or eval mode
        (policy ``"eval"``). Differentiable w.r.t. ``params``; ``ValueError`` under the ``"train"`` policy."""
        if self.policy == "train":
            raise ValueError("this term needs examples to be independent: use the 'frozen' (default) or 'eval' "
                             "BatchNorm policy in make_loss_fn.")
        variables = {"params": self.params, **self.model_state}
        frozen = self.policy == "frozen"
        if frozen and self.moments:
            variables[gm.MOMENTS] = self.moments
        return gm.ModelHandle(self.apply_fn, variables, (("train", frozen),))

    def teacher_handle(self) -> gm.ModelHandle:
        """The teacher (eval mode, variables from ``ctx.frozen["teacher"]`` under ``stop_gradient``) as a
        :class:`~gradjax.model.ModelHandle`; ``ValueError`` when the loss has no teacher."""
        return gm.ModelHandle(self.teacher_apply_fn, self._teacher_variables(), (("train", False),))


TermFn = Callable[[TermInputs], Array]


@dataclasses.dataclass(frozen=True)
class Term:
    """A weighted per-example objective. ``fn(inputs) -> [B]`` (or ``()``); ``clean_layers``: feature maps of the
    clean train-mode pass the term reads from ``inputs.features`` (captured once for all terms)."""

    name: str
    fn: TermFn
    weight: float = 1.0
    clean_layers: tuple[str, ...] = ()

    def __post_init__(self):
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"a term needs a non-empty name; got {self.name!r}.")
        if not callable(self.fn):
            raise ValueError(f"term {self.name!r}: fn must be callable; got {type(self.fn).__name__}.")
        if not math.isfinite(self.weight):
            raise ValueError(f"term {self.name!r}: weight must be finite; got {self.weight}.")


def term(name: str, fn: TermFn, weight: float = 1.0, clean_layers: Sequence[str] = ()) -> Term:
    """Wrap any ``fn(TermInputs) -> [B]`` (an objective without a factory here) as a :class:`Term`."""
    return Term(name, fn, float(weight), tuple(clean_layers))


def make_loss_fn(apply_fn: Callable, terms: Sequence[Term], *, teacher_apply_fn: Optional[Callable] = None,
                 policy: str = "frozen", dropout: bool = False, metrics_head: Head = None) -> Callable:
    """``loss_fn(params, model_state, batch, ctx) -> (loss, aux)`` with ``loss = sum_t w_t mean_b term_t``.

    One clean train-mode pass of the student (:func:`gradjax.model.apply_train` semantics: batch moments,
    running-statistics update, moments recorded for the frozen extra passes) gives ``inputs.logits``; each term
    adds the passes it needs. ``policy``: BatchNorm policy of the extra passes (``"frozen"`` default, ``"eval"``,
    ``"train"``; :data:`gradjax.model.BN_POLICIES`). ``dropout=True``: the student has dropout layers; a key
    from ``ctx.rng`` is passed as ``rngs={"dropout": ...}`` (the same mask in every pass of a step).
    ``teacher_apply_fn``: the teacher's ``model.apply`` (static); its variables come from
    ``ctx.frozen["teacher"]``. ``metrics_head``: logits slice scored by the ``accuracy`` metric.

    Metrics: ``term/<name>`` (batch mean of each term, unweighted), ``accuracy`` (when the batch has labels).
    Terms must return ``[B]`` or ``()``; anything else raises ``ValueError`` at trace time.
    """
    terms = tuple(terms)
    if not terms:
        raise ValueError("make_loss_fn needs at least one term.")
    names = [t.name for t in terms]
    if len(set(names)) != len(names):
        raise ValueError(f"term names must be unique; got {names}.")
    if policy not in gm.BN_POLICIES:
        raise ValueError(f"policy must be one of {gm.BN_POLICIES}; got {policy!r}.")
    layers = tuple(dict.fromkeys(l for t in terms for l in t.clean_layers))

    def loss_fn(params, model_state, batch, ctx):
        if "image" not in batch:
            raise ValueError(f"the batch needs an 'image' entry; got keys {sorted(batch)}.")
        x = batch["image"]
        fn = apply_fn
        if dropout:
            fn = functools.partial(apply_fn, rngs={"dropout": jax.random.fold_in(ctx.rng, 0x0D0)})
        if layers:
            variables = {"params": params, **model_state}
            mutable = list(model_state) + [gm.MOMENTS]
            (logits, mutated), feats = A.capture_features(fn, variables, x, layers, train=True, mutable=mutable)
            new_state = {k: mutated.get(k, v) for k, v in model_state.items()}
            moments = mutated.get(gm.MOMENTS, {})
        else:
            logits, new_state, moments = gm.apply_train(fn, params, model_state, x)
            feats = {}
        total = jnp.zeros((), logits.dtype)
        metrics = {}
        B = x.shape[0]
        for i, t in enumerate(terms):
            inputs = TermInputs(params, model_state, batch, ctx, jax.random.fold_in(ctx.rng, i + 1), logits,
                                moments, feats, fn, policy, teacher_apply_fn)
            v = t.fn(inputs)
            if jnp.shape(v) not in ((B,), ()):
                raise ValueError(f"term {t.name!r} must return one value per example [{B}] or a scalar; got shape "
                                 f"{tuple(jnp.shape(v))}.")
            m = jnp.mean(v)
            metrics[f"term/{t.name}"] = m
            total = total + t.weight * m
        if "label" in batch:
            lg = logits if metrics_head is None else logits[:, metrics_head[0]:metrics_head[1]]
            metrics["accuracy"] = jnp.mean(jnp.argmax(lg, -1) == batch["label"])
        return total, {"model_state": new_state, "metrics": metrics}

    loss_fn.terms = terms
    return loss_fn


# ----------------------------------------------------------------------------------------------- term factories
def _slice(logits: Array, head: Head) -> Array:
    return logits if head is None else logits[:, head[0]:head[1]]


def _head_fn(fn: Callable[[Array], Array], head: Head) -> Callable[[Array], Array]:
    return fn if head is None else (lambda x: _slice(fn(x), head))


def _labels(inp: TermInputs, what: str) -> Array:
    if inp.labels is None:
        raise ValueError(f"{what} needs batch['label'].")
    return inp.labels


# ------------------------------------------------------------------------------------------- chapter 2 terms
def cross_entropy_term(weight: float = 1.0, *, head: Head = None, label_smoothing: float = 0.0,
                       name: str = "ce") -> Term:
    """``-sum_i y^i log softmax(f(x_b))_i`` of the clean pass (the "CE" of thesis §2.12.2), on logits ``head``:
    :func:`gradjax.losses.classification.cross_entropy` (``label_smoothing`` through ``optax.smooth_labels``)."""
    if not 0.0 <= float(label_smoothing) < 1.0:
        raise ValueError(f"label_smoothing must lie in [0, 1); got {label_smoothing}.")

    def fn(inp):
        return CL.cross_entropy(_slice(inp.logits, head), _labels(inp, "cross_entropy_term"),
                                label_smoothing=label_smoothing)
    return Term(name, fn, float(weight))


def activation_matching_term(weight: float = 1.0, *, head: Head = None, name: str = "act") -> Term:
    """``sum_i (T^i(x_b) - S^i(x_b))^2`` ("Match Activations", §2.12.2) between the clean pass's logits ``head``
    and the teacher's logits (:func:`gradjax.losses.distillation.activation_matching`)."""
    def fn(inp):
        return D.activation_matching(_slice(inp.logits, head), jax.lax.stop_gradient(inp.teacher(inp.x)))
    return Term(name, fn, float(weight))


def jacobian_matching_term(weight: float = 1.0, *, output: str = "target", form: str = "squared",
                           head: Head = None, sigma: float = 1.0, temperature: float = 1.0,
                           name: str = "jac") -> Term:
    """Jacobian matching: ``form="squared"`` — Prop. 1's ``sum_i ||grad T^i - grad S^i||^2`` (the thesis's
    CIFAR "MatchGrad", :func:`gradjax.losses.distillation.jacobian_matching`); ``"normalized"`` — eq. 2.9 on one
    row; ``"cross_entropy"`` — eq. 2.2 (with ``sigma``, ``temperature``; centered). ``output``: ``"target"``
    (correct class), ``"top"`` (teacher's arg-max), ``"full"``."""
    if form not in ("squared", "normalized", "cross_entropy"):
        raise ValueError(f"form must be 'squared', 'normalized' or 'cross_entropy'; got {form!r}.")

    def fn(inp):
        s = _head_fn(inp.student, head)
        labels = inp.labels if output == "target" else None
        if output == "target":
            _labels(inp, "jacobian_matching_term(output='target')")
        if form == "squared":
            return D.jacobian_matching(s, inp.teacher, inp.x, output=output, labels=labels)
        if form == "normalized":
            return D.normalized_jacobian_matching(s, inp.teacher, inp.x, output=output, labels=labels)
        return D.jacobian_matching_cross_entropy(s, inp.teacher, inp.x, sigma=sigma, temperature=temperature,
                                                 output=output, labels=labels)
    return Term(name, fn, float(weight))


def stochastic_jacobian_matching_term(weight: float = 1.0, *, num_probes: int = 1, probe_space: str = "input",
                                      distribution: str = "rademacher", head: Head = None,
                                      name: str = "sjac") -> Term:
    """``mean_probes ||J_T v - J_S v||^2``, unbiased for the full-Jacobian distance (see
    :func:`gradjax.losses.distillation.stochastic_jacobian_matching`); fresh probes every step."""
    def fn(inp):
        return D.stochastic_jacobian_matching(_head_fn(inp.student, head), inp.teacher, inp.x, inp.rng,
                                              num_probes=num_probes, probe_space=probe_space,
                                              distribution=distribution)
    return Term(name, fn, float(weight))


def noisy_activation_matching_term(weight: float = 1.0, *, sigma: float, num_samples: int = 1,
                                   antithetic: bool = True, head: Head = None, name: str = "noisy_act") -> Term:
    """Monte-Carlo noise-augmented activation matching (the left side of Prop. 1,
    :func:`gradjax.losses.distillation.noisy_activation_matching`), fresh noise every step."""
    def fn(inp):
        return D.noisy_activation_matching(_head_fn(inp.student, head), inp.teacher, inp.x, inp.rng, sigma=sigma,
                                           num_samples=num_samples, antithetic=antithetic)
    return Term(name, fn, float(weight))


def attention_matching_term(weight: float = 1.0, *, pairs: Sequence[tuple[str, str]], p: float = 2.0,
                            squared: bool = False, name: str = "att") -> Term:
    """Eq. 2.8 (:func:`gradjax.losses.attention.attention_matching`) summed over ``pairs`` of (student layer,
    teacher layer) with attention maps eq. 2.7 (power ``p``); student features from the clean train-mode pass."""
    pairs = tuple((str(s), str(t)) for s, t in pairs)
    if not pairs:
        raise ValueError("attention_matching_term needs at least one (student_layer, teacher_layer) pair.")

    def fn(inp):
        _, tf = inp.teacher_features(inp.x, [t for _, t in pairs])
        total = 0.0
        for s, t in pairs:
            a_s = A.attention_map(inp.features[s], p=p)
            a_t = jax.lax.stop_gradient(A.attention_map(tf[t], p=p))
            total = total + A.attention_matching(a_s, a_t, squared=squared)
        return total
    return Term(name, fn, float(weight), clean_layers=tuple(s for s, _ in pairs))


def attention_jacobian_matching_term(weight: float = 1.0, *, student_layer: str, teacher_layer: str,
                                     window=None, divisor: int = 5, p: float = 2.0, name: str = "att_jac") -> Term:
    """§2.5.2 (:func:`gradjax.losses.attention.attention_jacobian_matching`): input-gradients of the teacher's
    pooled-attention maximum and of the student's pooled attention at the same position, compared with eq. 2.9
    (student through the frozen-moments extra pass)."""
    def fn(inp):
        s_feat = lambda z: inp.student_features(z, [student_layer])[1][student_layer]
        t_feat = lambda z: inp.teacher_features(z, [teacher_layer])[1][teacher_layer]
        return A.attention_jacobian_matching(s_feat, t_feat, inp.x, window=window, divisor=divisor, p=p)
    return Term(name, fn, float(weight))


def gradient_norm_term(weight: float = 1.0, *, form: str = "cross_entropy", output: str = "target",
                       head: Head = None, name: str = "grad_norm") -> Term:
    """Input-gradient-norm penalty :func:`gradjax.losses.regularizers.gradient_norm` through ``inputs.student``.

    ``form="cross_entropy"`` (default): eq. 2.3, ``||grad_x log softmax(f(x_b))_{y_b}||^2``, weight ``lambda`` of
    Table 2.2 (``lambda = sigma^2 / 2`` corresponds to Gaussian input noise ``sigma``). ``form="logit"``:
    Prop. 2, ``sum_{i in I_b} ||grad_x f_i(x_b)||^2``; the chapter-5 "Gradient-Norm" regularizer
    ``lambda * ½ ||grad_x f_{y_b}(x_b)||^2`` (§5.5, thesis ``lambda = 1e-3``) is
    ``gradient_norm_term(lambda / 2, form="logit")``."""
    def fn(inp):
        labels = _labels(inp, "gradient_norm_term(output='target')") if output == "target" else None
        return R.gradient_norm(_head_fn(inp.student, head), inp.x, labels, form=form, output=output)
    return Term(name, fn, float(weight))


def l2_term(weight: float = 1e-3, *, include_bias: bool = True, name: str = "l2") -> Term:
    """``0.5 ||params||^2`` (:func:`gradjax.losses.regularizers.l2`; the l2 baseline of Table 2.2,
    gamma = 1e-3); a scalar term."""
    return Term(name, lambda inp: R.l2(inp.params, include_bias=include_bias), float(weight))


# ------------------------------------------------------------------------------------------- chapter 4 terms
def _fg_target(inp: TermInputs, output: str, what: str):
    if output == "target":
        if inp.labels is None:
            raise ValueError(f"{what}(output='target') needs batch['label'] (the correct class, thesis L1358).")
        return inp.labels
    if output == "top":
        return PREDICTED
    raise ValueError(f"output must be 'target' (correct class) or 'top' (arg-max); got {output!r}.")


def full_gradient_matching_term(weight: float = 1.0, *, pairs: Optional[Sequence[FM.Pair]] = None,
                                output: str = "target", merge: str = "conv_bn",
                                channel_reduce: FM.ChannelReduce = "sum", align_corners: bool = False,
                                num_resolutions: int = 3, name: str = "fg") -> Term:
    """Term ``delta * mean_b sum_l ||psi(f^b_l) - psi(g^b_l)||^2`` (thesis §4.2, eq. 4.3,
    :func:`gradjax.losses.fullgrad_matching.full_gradient_matching`; "Match bias-gradients" of §4.4.1 with
    ``delta = 10`` in the thesis). Needs ``teacher_apply_fn`` in :func:`make_loss_fn`.

    One forward+backward pass per model per step: the teacher (eval mode; its maps are constants) and the student
    (frozen-moments pass, :meth:`TermInputs.student_handle`; differentiated w.r.t. its parameters by double
    backprop). ``pairs=None``: :func:`gradjax.losses.fullgrad_matching.default_pairs` (earliest conv of each of
    ``num_resolutions`` resolutions), resolved at trace time from shapes. ``output``: ``"target"`` (correct class,
    L1358) or ``"top"`` (the teacher's arg-max, used for both models). Other arguments:
    :func:`~gradjax.losses.fullgrad_matching.full_gradient_matching`,
    :func:`~gradjax.losses.fullgrad_matching.bias_gradient_maps`.
    """
    FM._check_reduce(channel_reduce)
    if output not in ("target", "top"):
        raise ValueError(f"output must be 'target' or 'top'; got {output!r}.")
    fixed = None if pairs is None else FM._check_pairs(pairs)

    def fn(inp: TermInputs) -> Array:
        sh, th = inp.student_handle(), inp.teacher_handle()
        use = fixed if fixed is not None else FM.default_pairs(sh, th, inp.x, merge=merge,
                                                               num_resolutions=num_resolutions)
        t_maps, t = FM.bias_gradient_maps(th, inp.x, _fg_target(inp, output, "full_gradient_matching_term"),
                                          merge=merge)
        t_maps = jax.lax.stop_gradient(t_maps)
        s_maps, _ = FM.bias_gradient_maps(sh, inp.x, jax.lax.stop_gradient(t), merge=merge)
        return FM.full_gradient_matching(s_maps, t_maps, use, channel_reduce=channel_reduce,
                                         align_corners=align_corners)

    return Term(name, fn, float(weight))


def bias_gradient_penalty_term(weight: float = 1e2, *, layers: Optional[Sequence[str]] = None,
                               output: str = "target", merge: str = "conv_bn", noise: FM.Noise = "parameter",
                               name: str = "bias_grad") -> Term:
    """Term ``lambda * mean_b sum_l ||b_l ⊙ grad_{b_l} f(x_b)||^2`` (thesis §4.3, Proposition 10,
    :func:`gradjax.losses.fullgrad_matching.bias_gradient_penalty`; Table 4.3 uses ``lambda = 1e2`` on one final
    conv layer). ``layers=None``: the last convolutional layer in call order
    (:func:`~gradjax.losses.fullgrad_matching.conv_layers`). The student's maps come from one frozen-moments pass
    (:meth:`TermInputs.student_handle`)."""
    if output not in ("target", "top"):
        raise ValueError(f"output must be 'target' or 'top'; got {output!r}.")
    if noise not in ("parameter", "unit"):
        raise ValueError(f"noise must be 'parameter' (Prop. 10) or 'unit'; got {noise!r}.")
    fixed = None if layers is None else tuple(str(l) for l in ([layers] if isinstance(layers, str) else layers))

    def fn(inp: TermInputs) -> Array:
        sh = inp.student_handle()
        use = fixed if fixed is not None else (FM.conv_layers(sh, inp.x, merge=merge)[-1][0],)
        maps, _ = FM.bias_gradient_maps(sh, inp.x, _fg_target(inp, output, "bias_gradient_penalty_term"),
                                        merge=merge)
        return FM.bias_gradient_penalty(maps, use, noise=noise)

    return Term(name, fn, float(weight))


def bias_l2_term(weight: float = 1e-1, *, layers: Sequence[str], name: str = "bias_wd") -> Term:
    """Term ``gamma * 0.5 ||bias params of layers||^2`` — the bias weight-decay baseline of thesis Table 4.3
    (``gamma = 1e-1``; :func:`gradjax.losses.fullgrad_matching.bias_l2`). A scalar (parameter-level) term."""
    use = tuple(str(l) for l in ([layers] if isinstance(layers, str) else layers))
    if not use:
        raise ValueError("bias_l2_term needs at least one layer.")
    return Term(name, lambda inp: FM.bias_l2(inp.params, use), float(weight))


# ------------------------------------------------------------------------------------------- chapter 5 terms
def score_matching_term(weight: float = 1e-3, *, mu: float = 1e-4, name: str = "score_matching",
                        **trace_options) -> Term:
    """Term of :func:`gradjax.losses.score_matching.score_matching` (eq. 5.4 with §5.3.3's stability term) on the
    label logit, weight ``λ`` (thesis λ = 1e-3, μ = 1e-4; authors' code λ = 1e-5, μ = 1e-3); fresh probes every
    step from the term's key. ``trace_options``: :func:`gradjax.losses.score_matching.density_terms`. The passes go
    through ``inputs.student``, i.e. the BatchNorm policy of :func:`make_loss_fn`: ``"frozen"`` (per-example traces)
    or ``"train"`` (the authors': every noisy batch normalized with its own moments; the running statistics are
    updated by the clean pass only)."""
    SM._check_positive(mu, "mu", allow_zero=True)
    if "probes" in trace_options:
        raise ValueError("score_matching_term draws fresh probes every step from its key; it takes no probes=.")

    def fn(inp):
        f = SM.label_logit_fn(inp.student, _labels(inp, "score_matching_term (the density is the label's logit)"))
        return SM.score_matching(f, inp.x, inp.rng, mu=mu, **trace_options)[0]

    return Term(name, fn, float(weight))


def anti_score_matching_term(weight: float = 1e-4, *, tau: float = 1000.0, sigma: float = 1e-3,
                             name: str = "anti_score_matching", **trace_options) -> Term:
    """Term of :func:`gradjax.losses.score_matching.anti_score_matching` (§5.5; thesis λ = 1e-4, τ = 1000) on
    the label logit; fresh probes every step from the term's key."""
    if "probes" in trace_options:
        raise ValueError("anti_score_matching_term draws fresh probes every step from its key; it takes no probes=.")

    def fn(inp):
        f = SM.label_logit_fn(inp.student, _labels(inp, "anti_score_matching_term (the density is the label's logit)"))
        return SM.anti_score_matching(f, inp.x, inp.rng, tau=tau, sigma=sigma, **trace_options)[0]

    return Term(name, fn, float(weight))


def fooling_loss_term(weight: float, *, mask, name: str = "fool") -> Term:
    """Term of eq. 5.7 (:func:`gradjax.losses.fooling.fooling_loss`) on the label's logit-gradient, through
    ``inputs.student`` (the extra-pass BatchNorm policy; frozen moments by default). Fine-tune with
    ``[cross_entropy_term(1), fooling_loss_term(λ, mask=corner_mask(H))]`` (the thesis does not give λ)."""
    mask = np.asarray(mask, np.float32)
    FO._check_mask(mask, mask.shape)

    def fn(inp):
        return FO.fooling_loss_of_model(inp.student, inp.x, _labels(inp, "fooling_loss_term"), mask)[0]

    return Term(name, fn, float(weight))
