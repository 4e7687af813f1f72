"""Per-example training objectives (optax style: every function returns ``[B]``, no hidden batch reduction) and
their training terms.

Per-example losses, each in its module:

* :mod:`~gradjax.losses.classification` — the cross-entropy (``optax.smooth_labels`` for label smoothing);
* :mod:`~gradjax.losses.distillation` — activation matching, Jacobian matching (Prop. 1, eq. 2.2), stochastic
  all-class Jacobian matching, normalized gradient matching (eq. 2.9) — thesis ch. 2;
* :mod:`~gradjax.losses.attention` — attention maps (eq. 2.7), attention matching (eq. 2.8), attention-Jacobian
  matching (§2.5.2), Linen feature capture;
* :mod:`~gradjax.losses.regularizers` — the gradient-norm penalty (Prop. 2, eq. 2.3, §5.5), l2;
* :mod:`~gradjax.losses.fullgrad_matching` — full-gradient matching (eq. 4.3), bias-gradient penalty (Prop. 10);
* :mod:`~gradjax.losses.score_matching` — score-matching family (eq. 5.4, §5.5);
* :mod:`~gradjax.losses.fooling` — fooling gradient explanations (eq. 5.7).

Training terms, all in :mod:`~gradjax.losses.terms` under one naming rule (the term of loss ``X`` is
``terms.X_term``), with :class:`~gradjax.losses.terms.Term`, :func:`~gradjax.losses.terms.make_loss_fn` and
:func:`~gradjax.losses.terms.term` (re-exported here).
"""
from gradjax.losses import (attention, classification, distillation, fooling, fullgrad_matching, regularizers,
                            score_matching, terms)
from gradjax.losses.attention import (attention_jacobian_matching, attention_map, attention_matching,
                                      capture_features, pool_attention, pool_window)
from gradjax.losses.classification import cross_entropy
from gradjax.losses.distillation import (activation_matching, jacobian_matching, jacobian_matching_cross_entropy,
                                         noisy_activation_matching, normalized_gradient_matching,
                                         normalized_jacobian_matching, stochastic_jacobian_matching)
from gradjax.losses.regularizers import gradient_norm, gradient_sq_norm, l2, noisy_cross_entropy
from gradjax.losses.terms import Term, TermInputs, make_loss_fn, term
