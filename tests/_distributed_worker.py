"""One process of the multi-process tests (tests/test_distributed.py); also importable for the single-process
reference (:func:`train`).

    python tests/_distributed_worker.py --coordinator-address 127.0.0.1:PORT --num-processes 2 --process-id P \\
        --out DIR [--kill-after K | --resume | --init-only] [--timeout S]

Trains a tiny VGG with two double-backprop objectives from tests/test_train_contract.py — a gradient-norm-
regularized classifier and Jacobian matching against a frozen teacher (``ctx.frozen``) — through
:func:`gradjax.train.fit` with the sharded step on the global mesh, per-process input, orbax checkpoints and a
distributed evaluation; writes ``{kind}-p{P}.npz`` (final params and batch statistics) and ``{kind}-p{P}.json``
(final evaluation, metric records). With ``--kill-after K`` it then starts a second run of each objective with
checkpoints in ``ckpt-{kind}`` (reusing the compiled steps), stops it after K steps (checkpoint written), writes
``ready-p{P}`` and sleeps until the test kills it; ``--resume`` continues those runs from their checkpoints to the
end and writes ``{kind}-resumed-p{P}.npz/.json``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))

K, IMG = 5, (8, 8, 1)
GLOBAL_BATCH, N_TRAIN, N_TEST, EVAL_BATCH = 16, 48, 20, 8
EPOCHS, STEPS_PER_EPOCH, CHECKPOINT_EVERY = 2, N_TRAIN // GLOBAL_BATCH, 2
KINDS = ("grad_norm", "jacobian")


def make_data():
    """Deterministic tiny train/test splits (the same in every process)."""
    import numpy as np

    from gradjax.data import ArrayDataset

    rng = np.random.default_rng(0)

    def split(n):
        return ArrayDataset(images=(rng.normal(size=(n,) + IMG) * 2 + 0.5).astype(np.float32),
                            labels=rng.integers(0, K, size=(n,)).astype(np.int32), num_classes=K, name="toy",
                            mean=np.zeros(1, np.float32), std=np.ones(1, np.float32))

    return split(N_TRAIN), split(N_TEST)


def setup():
    """(initial student state, teacher module, teacher variables with non-trivial running statistics)."""
    import jax
    import optax

    sys.path.insert(0, HERE)
    from test_train_contract import _student  # noqa: E402

    from gradjax import train as gtrain
    from gradjax.models import create_model

    x = jax.random.normal(jax.random.PRNGKey(0), (2,) + IMG)
    state = gtrain.create_train_state(_student(), optax.sgd(0.1, momentum=0.9), x, seed=0)
    teacher = create_model("vgg4", K, width=1 / 8)
    tv = teacher.init(jax.random.PRNGKey(7), x, train=False)
    _, upd = teacher.apply(tv, x * 2 + 1, train=True, mutable=["batch_stats"])
    return state, teacher, {"params": tv["params"], **upd}


def loss_for(kind, teacher):
    sys.path.insert(0, HERE)
    from test_train_contract import grad_norm_loss, jacobian_matching_loss, _student  # noqa: E402

    apply_fn = _student().apply
    return grad_norm_loss(apply_fn) if kind == "grad_norm" else jacobian_matching_loss(apply_fn, teacher.apply)


_STEPS: dict = {}


def train(kind, mesh, *, checkpoint_dir=None, log_path=None, max_steps=None, progress=False):
    """Train objective ``kind`` on ``mesh`` (all devices of all processes) with per-process input; returns
    (final state, metric records, final distributed evaluation)."""
    from gradjax import distributed as gdist
    from gradjax import train as gtrain

    train_ds, test_ds = make_data()
    state0, teacher, tv = setup()
    if (kind, mesh) not in _STEPS:  # one compiled step per objective and mesh
        _STEPS[kind, mesh] = gtrain.sharded_train_step(loss_for(kind, teacher), mesh, num_classes=K, donate=False)
    step = _STEPS[kind, mesh]
    if (kind, mesh, "eval") not in _STEPS:  # one compiled eval step per model, built by the caller
        _STEPS[kind, mesh, "eval"] = gtrain.make_eval_step(state0.apply_fn)
    eval_step = _STEPS[kind, mesh, "eval"]
    state = gtrain.replicate(state0, mesh)
    frozen = gtrain.replicate(tv, mesh, check_equal=True) if kind == "jacobian" else None
    eval_fn = lambda s: gtrain.evaluate(
        s, gdist.global_batches(test_ds, EVAL_BATCH, mesh, shuffle=False, drop_remainder=False), eval_step)
    state, records = gtrain.fit(
        state, step, lambda e, s: gdist.global_batches(train_ds, GLOBAL_BATCH, mesh, seed=0, epoch=e, start=s),
        num_epochs=EPOCHS, steps_per_epoch=STEPS_PER_EPOCH, checkpoint_dir=checkpoint_dir,
        checkpoint_every=CHECKPOINT_EVERY, log_path=log_path, log_every=1, eval_fn=eval_fn, max_steps=max_steps,
        progress=progress, frozen=frozen)
    return state, records, eval_fn(state)


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--coordinator-address", required=True)
    p.add_argument("--num-processes", type=int, required=True)
    p.add_argument("--process-id", type=int, required=True)
    p.add_argument("--timeout", type=float, default=60.0)
    p.add_argument("--out", default=None)
    p.add_argument("--kill-after", type=int, default=None)
    p.add_argument("--resume", action="store_true")
    p.add_argument("--init-only", action="store_true")
    args = p.parse_args(argv)

    sys.path.insert(0, os.path.dirname(HERE))
    import jax

    from gradjax import distributed as gdist
    from gradjax import train as gtrain

    gdist.initialize(args.coordinator_address, args.num_processes, args.process_id, timeout_s=args.timeout,
                     heartbeat_timeout_s=30)
    pid = jax.process_index()
    print(f"process {pid}/{jax.process_count()}: {jax.local_device_count()} local of {jax.device_count()} devices",
          flush=True)
    if args.init_only:
        return
    import numpy as np

    jax.config.update("jax_disable_most_optimizations", True)  # tiny models: compile time dominates
    mesh = gtrain.data_mesh()  # every device of every process

    def save(name, state, records, ev):
        flat = {"/".join(str(k.key) for k in path): np.asarray(v)
                for path, v in jax.tree_util.tree_flatten_with_path(
                    jax.device_get({"params": state.params, "batch_stats": state.batch_stats}))[0]}
        np.savez(os.path.join(args.out, f"{name}-p{pid}.npz"), **flat)
        with open(os.path.join(args.out, f"{name}-p{pid}.json"), "w") as f:
            json.dump({"eval": ev, "step": int(jax.device_get(state.step)), "records": records}, f)

    for kind in KINDS:
        ckpt = os.path.join(args.out, f"ckpt-{kind}")
        if args.resume:
            save(f"{kind}-resumed", *train(kind, mesh, checkpoint_dir=ckpt, progress=True))
            continue
        save(kind, *train(kind, mesh, log_path=os.path.join(args.out, f"{kind}-metrics.jsonl"), progress=True))
        if args.kill_after is not None:
            train(kind, mesh, checkpoint_dir=ckpt, max_steps=args.kill_after)
    if args.kill_after is not None:
        open(os.path.join(args.out, f"ready-p{pid}"), "w").close()
        print(f"process {pid}: checkpoint at step {args.kill_after} written; waiting to be killed", flush=True)
        time.sleep(600)


if __name__ == "__main__":
    main()
