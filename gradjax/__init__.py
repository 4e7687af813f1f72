"""gradjax: gradient-based interpretability and knowledge transfer in JAX/Flax.

Modules: ``models`` (thesis networks with bias taps), ``data`` (TFDS + embedded digits), ``train`` (jit / pmap /
sharded training engine), ``gradients`` (input-gradients, Jacobians), ``fullgrad`` (full-gradients),
``trace`` (Hessian-trace estimators), ``saliency``, ``metrics``.
"""
__version__ = "0.1.0"
