"""Same seed, two fresh processes -> bitwise-identical training (params, batch statistics, optimizer state).

A double-backprop objective (Jacobian matching against a frozen teacher, with batch-norm statistics and a shuffled
data order) is trained through :func:`gradjax.train.fit` by two independent interpreters that differ in their
``PYTHONHASHSEED`` (set/dict iteration order). Bitwise equality holds on one machine with the same number of
visible CPU cores; XLA:CPU partitions its work by thread count, so e.g. ``taskset -c 0`` gives other low bits
(see README, "Reproducibility")."""
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(ROOT, "tests", "_determinism_worker.py")


def test_two_processes_same_seed_train_bitwise_identically():
    procs = [subprocess.Popen([sys.executable, WORKER, "jacobian"], cwd=ROOT, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True,
                              env={**os.environ, "PYTHONHASHSEED": str(hash_seed), "TQDM_DISABLE": "1"})
             for hash_seed in (1, 2)]
    outputs = []
    for p in procs:
        out, _ = p.communicate(timeout=300)
        assert p.returncode == 0, out
        outputs.append([line for line in out.splitlines() if line.startswith("jacobian ")])
    assert len(outputs[0]) == 1, outputs
    assert outputs[0] == outputs[1], f"same seed, different training results:\n{outputs[0]}\n{outputs[1]}"
