"""One process of tests/test_experiments_multiprocess.py: a chapter-2 distillation smoke run (teacher trained first,
then passed to the student's steps in ``frozen``) and a chapter-5 score-matching smoke run, both through the
experiment scripts' ``main`` in this one process (the multi-process runtime is started once, by the first parser).

    python tests/_experiments_mp_worker.py OUT [--coordinator-address A --num-processes N --process-id I]

Writes ``OUT/ch2/results.json`` and ``OUT/ch5/{results.json, score_matching/seed0/checkpoints}`` (process 0), and
``OUT/params-p<I>.npz``: the score-matching model's final parameters as this process restored them."""
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(out, mp_flags):
    import jax

    from experiments import common, density_models, distill_fewshot

    distill_fewshot.main(["--scale", "smoke", "--seeds", "1", "--methods", "CE + J", "--n-per-class", "2",
                          "--out", os.path.join(out, "ch2"), *mp_flags])
    density_models.main(["--scale", "smoke", "--model", "mlp", "--image-size", "8", "--objectives", "score_matching",
                         "--no-policy-gap", "--out", os.path.join(out, "ch5"), *mp_flags])
    _, state, _ = density_models.load_trained(os.path.join(out, "ch5", "score_matching", "seed0"))
    flat = jax.tree_util.tree_flatten_with_path(common.local_copy(state.params))[0]
    np.savez(os.path.join(out, f"params-p{jax.process_index()}.npz"),
             **{jax.tree_util.keystr(k): np.asarray(v) for k, v in flat})


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
