"""One process of tests/test_determinism.py: trains the two double-backprop objectives of
tests/_distributed_worker.py (gradient-norm regularization and Jacobian matching against a frozen teacher) through
:func:`gradjax.train.fit` with the sharded step on this process's devices, and prints one line per objective:
``<kind> <sha1 of params, batch statistics and optimizer state> <final evaluation>``.

    python tests/_determinism_worker.py [KIND ...]      # default: every kind
"""
from __future__ import annotations

import hashlib
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))


def digest(state) -> str:
    import jax
    import numpy as np

    leaves = jax.tree_util.tree_leaves(jax.device_get((state.params, state.batch_stats, state.opt_state)))
    return hashlib.sha1(b"".join(np.ascontiguousarray(np.asarray(x)).tobytes() for x in leaves)).hexdigest()


def main() -> None:
    sys.path[:0] = [HERE, os.path.dirname(HERE)]
    import jax

    jax.config.update("jax_disable_most_optimizations", True)  # tiny models: compile time dominates
    from _distributed_worker import KINDS, train

    from gradjax import train as gtrain

    mesh = gtrain.data_mesh()
    for kind in sys.argv[1:] or KINDS:
        state, _, ev = train(kind, mesh)
        print(kind, digest(state), {k: round(float(v), 8) for k, v in sorted(ev.items())}, flush=True)


if __name__ == "__main__":
    main()
