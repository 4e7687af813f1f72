"""Multi-process data-parallel training on jax.distributed, on this machine: 2 processes x 4 fake CPU devices
(loopback coordinator, gloo collectives) train a gradient-norm-regularized classifier and a teacher-matching
(Jacobian) objective to the same parameters and batch statistics as the single-process 8-device run and the
1-device run; both processes are SIGKILLed mid-run and resume from the orbax checkpoint to the same result; bad
configurations fail fast with clear messages. Workers: tests/_distributed_worker.py, always killed in a
``finally`` with timeouts."""
import json
import os
import signal
import socket
import subprocess
import sys
import time

import chex
import jax
import numpy as np
import pytest

from gradjax import data as gdata
from gradjax import distributed as gdist
from gradjax import train as gtrain

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
WORKER = os.path.join(HERE, "_distributed_worker.py")
sys.path.insert(0, HERE)
import _distributed_worker as W  # noqa: E402

pytestmark = pytest.mark.usefixtures("fast_compilation")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(cache_dir=None):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu",
               PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("TQDM_DISABLE", None)  # process 0 shows its progress bar (checked)
    if cache_dir:  # the kill-and-resume launch reuses the first launch's compiled programs
        env.update(JAX_COMPILATION_CACHE_DIR=str(cache_dir), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                   JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
    return env


class Launch:
    """Worker processes writing stdout+stderr to files; :meth:`kill` (SIGKILL) in every ``finally``."""

    def __init__(self, tmp, name, arg_lists, cache_dir=None):
        self.procs, self.logs = [], []
        for i, args in enumerate(arg_lists):
            log = tmp / f"{name}-{i}.log"
            self.logs.append(log)
            with open(log, "w") as f:
                self.procs.append(subprocess.Popen([sys.executable, WORKER, *map(str, args)], stdout=f,
                                                   stderr=subprocess.STDOUT, env=_env(cache_dir), cwd=ROOT))

    def wait(self, timeout):
        deadline = time.time() + timeout
        for p in self.procs:
            try:
                p.wait(max(0.1, deadline - time.time()))
            except subprocess.TimeoutExpired:
                self.kill()
                pytest.fail(f"workers did not finish within {timeout} s:\n{self.output()}")
        return [p.returncode for p in self.procs]

    def kill(self):
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGKILL)
                p.wait(10)

    def output(self, i=None):
        logs = self.logs if i is None else [self.logs[i]]
        return "\n".join(f"--- {log.name}\n" + log.read_text()[-3000:] for log in logs)


def _two(port, out, *extra, timeout=120):
    return [["--coordinator-address", f"127.0.0.1:{port}", "--num-processes", 2, "--process-id", p, "--out", out,
             "--timeout", timeout, *extra] for p in (0, 1)]


def _load(path):
    with np.load(path) as z:
        return {k: z[k] for k in z.files}


def _close(a, b, what, atol=2e-5, rtol=2e-4):
    assert sorted(a) == sorted(b), what
    chex.assert_trees_all_close(a, b, atol=atol, rtol=rtol, custom_message=what)


def _flat(state):
    return {"/".join(str(k.key) for k in path): np.asarray(v) for path, v in jax.tree_util.tree_flatten_with_path(
        jax.device_get({"params": state.params, "batch_stats": state.batch_stats}))[0]}


def _one_device_reference(kind):
    """The plain single-device engine: jit step + gradjax.data.batches of the same global batches."""
    train_ds, test_ds = W.make_data()
    state, teacher, tv = W.setup()
    step = gtrain.jit_train_step(W.loss_for(kind, teacher), num_classes=W.K, donate=False)
    state, _ = gtrain.fit(state, step, lambda e, s: gdata.batches(train_ds, W.GLOBAL_BATCH, seed=0, epoch=e, start=s),
                          num_epochs=W.EPOCHS, steps_per_epoch=W.STEPS_PER_EPOCH, progress=False,
                          frozen=tv if kind == "jacobian" else None)
    ev = gtrain.evaluate(state, gdata.batches(test_ds, 7, shuffle=False, drop_remainder=False))
    return _flat(state), ev


@pytest.mark.slow  # ~150 s of CPU in all (3 processes compile the steps); ~90 s wall on 2 idle cores
def test_two_processes_match_single_process_and_resume_after_kill(tmp_path):
    assert jax.device_count() >= 8, "conftest should give 8 fake CPU devices"
    out, cache = tmp_path / "out", tmp_path / "xla-cache"
    out.mkdir()
    first = Launch(tmp_path, "run", _two(_free_port(), out, "--kill-after", 4), cache)
    try:
        # meanwhile, the references in this process: single-process 8-device (the same fit/global_batches/evaluate
        # code with one process) and the 1-device engine
        mesh8 = gtrain.data_mesh(jax.devices()[:8])
        refs = {}
        for kind in W.KINDS:
            s8, _, ev8 = W.train(kind, mesh8)
            refs[kind] = (_flat(s8), ev8, *_one_device_reference(kind))
        # wait until both processes trained to the end, then checkpointed step 4 of a second run
        deadline = time.time() + 240
        while not all((out / f"ready-p{p}").exists() for p in (0, 1)):
            if any(p.poll() is not None for p in first.procs):
                pytest.fail(f"a worker exited early:\n{first.output()}")
            if time.time() > deadline:
                pytest.fail(f"workers did not reach the kill point in time:\n{first.output()}")
            time.sleep(0.2)
    finally:
        first.kill()  # SIGKILL both, mid-run (the second run is in its second epoch, 2 of 6 steps to go)
    assert "train:" in first.output(0) and "train:" not in first.output(1), "progress bar on process 0 only"
    for kind in W.KINDS:
        p8, ev8, p1, ev1 = refs[kind]
        _close(p8, p1, f"{kind}: single-process 8 devices vs 1 device")
        assert abs(ev8["cross_entropy"] - ev1["cross_entropy"]) < 1e-4 and ev8["accuracy"] == ev1["accuracy"]
        assert ev8["count"] == ev1["count"] == W.N_TEST
        for pid in (0, 1):
            got = _load(out / f"{kind}-p{pid}.npz")
            _close(got, p8, f"{kind}: process {pid} of 2 vs single-process 8 devices")
            _close(got, p1, f"{kind}: process {pid} of 2 vs 1 device")
            rec = json.loads((out / f"{kind}-p{pid}.json").read_text())
            assert rec["step"] == W.EPOCHS * W.STEPS_PER_EPOCH
            assert rec["eval"]["count"] == W.N_TEST and rec["eval"]["accuracy"] == ev1["accuracy"]
            assert abs(rec["eval"]["cross_entropy"] - ev1["cross_entropy"]) < 1e-4
        assert not np.allclose(p1["batch_stats/block0/bn/mean"], 0.0)
        # metrics written once, by process 0: one train record per step and one eval record per epoch
        lines = [json.loads(l) for l in (out / f"{kind}-metrics.jsonl").read_text().splitlines()]
        total = W.EPOCHS * W.STEPS_PER_EPOCH
        assert [r["step"] for r in lines if "loss" in r] == list(range(1, total + 1))
        assert [r["step"] for r in lines if "eval_accuracy" in r] == [W.STEPS_PER_EPOCH, total]
        assert sorted(os.listdir(out / f"ckpt-{kind}")) == ["2", "4"]

    second = Launch(tmp_path, "resume", _two(_free_port(), out, "--resume"), cache)
    try:
        assert second.wait(240) == [0, 0], second.output()
    finally:
        second.kill()
    for kind in W.KINDS:
        for pid in (0, 1):
            resumed = _load(out / f"{kind}-resumed-p{pid}.npz")
            _close(resumed, _load(out / f"{kind}-p0.npz"), f"{kind}: resumed vs uninterrupted", atol=0, rtol=0)
            assert json.loads((out / f"{kind}-resumed-p{pid}.json").read_text())["step"] == W.EPOCHS * W.STEPS_PER_EPOCH


def test_bad_configuration_fails_fast_with_clear_message(tmp_path):
    """Unreachable coordinator, a missing process, processes disagreeing on the count: each ends within seconds
    with a message saying what to check (all four processes run at once)."""
    dead, alone, shared = _free_port(), _free_port(), _free_port()
    args = [["--coordinator-address", f"127.0.0.1:{dead}", "--num-processes", 2, "--process-id", 1],
            ["--coordinator-address", f"127.0.0.1:{alone}", "--num-processes", 2, "--process-id", 0],
            ["--coordinator-address", f"127.0.0.1:{shared}", "--num-processes", 2, "--process-id", 0],
            ["--coordinator-address", f"127.0.0.1:{shared}", "--num-processes", 3, "--process-id", 1]]
    launch = Launch(tmp_path, "bad", [a + ["--timeout", 4, "--init-only"] for a in args])
    try:
        t0 = time.time()
        rcs = launch.wait(90)
        elapsed = time.time() - t0
    finally:
        launch.kill()
    assert all(rc != 0 for rc in rcs), launch.output()
    assert "cannot reach the jax.distributed coordinator at 127.0.0.1" in launch.output(0)
    assert rcs[1] == gdist.INIT_FAILED_EXIT_CODE, launch.output(1)
    assert "timed out after 4 s waiting for all 2 processes" in launch.output(1)
    for i in (2, 3):
        assert "processes disagree on the process count" in launch.output(i), launch.output(i)
        assert "{0: 2, 1: 3}" in launch.output(i)
    assert elapsed < 80


def test_bad_configuration_in_process():
    with pytest.raises(gdist.DistributedInitError, match=r"process_id must be an integer in \[0, num_processes=2\)"):
        gdist.initialize("127.0.0.1:1234", 2, 2)
    with pytest.raises(gdist.DistributedInitError, match="missing \\['process_id'\\]"):
        gdist.initialize("127.0.0.1:1234", 2)
    with pytest.raises(gdist.DistributedInitError, match="host:port"):
        gdist.initialize("localhost", 2, 0)
    assert gdist.initialize() is False and gdist.initialize("127.0.0.1:1", 1, 0) is False  # single process
    mesh = gtrain.data_mesh(jax.devices()[:8])
    with pytest.raises(ValueError, match="global batch size 12 is not divisible by the 8 devices of the global mesh"):
        next(gdist.local_batches(W.make_data()[0], 12, mesh))


def test_per_process_rows_cover_the_global_batch_in_order():
    """With one process, local_batches is gradjax.data.batches (the global order), global_batches places them on
    the mesh, and evaluate over the padded, masked global batches agrees with the host batches."""
    train_ds, test_ds = W.make_data()
    mesh = gtrain.data_mesh(jax.devices()[:8])
    assert gdist.process_rows(16, mesh) == slice(0, 16)
    for got, want in zip(gdist.global_batches(train_ds, 16, mesh, seed=3, epoch=1, start=1),
                         gdata.batches(train_ds, 16, seed=3, epoch=1, start=1)):
        assert got["image"].sharding.spec == jax.sharding.PartitionSpec("data")
        np.testing.assert_array_equal(np.asarray(got["label"]), want["label"])
    padded = list(gdist.local_batches(test_ds, 8, mesh, shuffle=False, drop_remainder=False))
    assert [int(b["mask"].sum()) for b in padded] == [8, 8, 4]
    np.testing.assert_array_equal(padded[-1]["label"][:4], test_ds.labels[16:])
    state = W.setup()[0]
    eval_step = gtrain.make_eval_step(state.apply_fn)
    host = gtrain.evaluate(state, gdata.batches(test_ds, 7, shuffle=False, drop_remainder=False), eval_step)
    glob = gtrain.evaluate(gtrain.replicate(state, mesh),
                           gdist.global_batches(test_ds, 8, mesh, shuffle=False, drop_remainder=False), eval_step)
    assert glob["count"] == host["count"] == W.N_TEST
    assert glob["accuracy"] == host["accuracy"]
    np.testing.assert_allclose(glob["cross_entropy"], host["cross_entropy"], rtol=1e-5)
