"""Per-example training objectives (optax style: every function returns ``[B]``, no hidden batch reduction) and
the combinator that turns weighted terms into a training ``loss_fn`` for :mod:`gradjax.train`.

* :mod:`~gradjax.losses.distillation` — activation matching, Jacobian matching (Prop. 1, eq. 2.2), stochastic
  all-class Jacobian matching, normalized gradient matching (eq. 2.9) — thesis ch. 2;
* :mod:`~gradjax.losses.attention` — attention maps (eq. 2.7), attention matching (eq. 2.8), attention-Jacobian
  matching (§2.5.2), Linen feature capture;
* :mod:`~gradjax.losses.regularizers` — gradient-norm penalty (Prop. 2, eq. 2.3), l2;
* :mod:`~gradjax.losses.combine` — :class:`Term`, :func:`make_loss_fn` and the standard term factories.
"""
from gradjax.losses import attention, combine, distillation, regularizers
from gradjax.losses.attention import (attention_jacobian_matching, attention_map, attention_matching,
                                      capture_features, pool_attention, pool_window)
from gradjax.losses.combine import Term, TermInputs, make_loss_fn, term
from gradjax.losses.distillation import (activation_matching, jacobian_matching, jacobian_matching_cross_entropy,
                                         noisy_activation_matching, normalized_gradient_matching,
                                         normalized_jacobian_matching, stochastic_jacobian_matching)
from gradjax.losses.regularizers import gradient_norm_penalty, l2_penalty, noisy_cross_entropy
from gradjax.losses import fooling, score_matching  # ch. 5: score-matching family (eq. 5.4), fooling (eq. 5.7)
from gradjax.losses import fullgrad_matching  # ch. 4: full-gradient matching (eq. 4.3), bias-gradient penalty (Prop. 10)
