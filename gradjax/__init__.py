"""gradjax: gradient-based interpretability and knowledge transfer in JAX/Flax.

Modules: ``model`` (the model interface), ``models`` (thesis networks with bias taps), ``data`` (TFDS + embedded
digits), ``gradients`` (input-gradients, Jacobians), ``fullgrad`` (full-gradients), ``trace`` (Hessian-trace
estimators), ``precision`` (the exact-by-default matmul precision policy), ``saliency``, ``metrics``,
``input_agnostic`` / ``backdoor`` / ``neural_cleanse`` (seed 003), ``losses`` (per-example objectives and their
training terms), ``density`` / ``sampling`` / ``discriminative`` (ch. 5), ``train`` (the jit / pmap / sharded
training engine), ``distributed`` (multi-process start-up and input), ``imaging``, ``viz``. Every public name is
listed in the API reference's *Public API at a glance* page.
"""
__version__ = "0.1.0"
