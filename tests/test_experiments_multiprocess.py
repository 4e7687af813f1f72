"""Issue 29: the experiment scripts' one trainer runs multi-process (global mesh, per-process input, teachers in
``frozen`` and the state replicated), and scripts that cannot refuse the multi-process flags at start-up.

Two processes x 4 fake CPU devices (loopback coordinator) run a chapter-2 distillation smoke run (Jacobian matching
against a teacher passed in ``frozen``) and a chapter-5 score-matching smoke run (tests/_experiments_mp_worker.py);
their results equal the single-process run on an 8-device machine (``--xla_force_host_platform_device_count=8``)
up to float round-off."""
import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

from experiments import backdoor_discovery, density_evaluation, fullgrad_digits, randomization_study

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
WORKER = os.path.join(HERE, "_experiments_mp_worker.py")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(out, devices, flags_per_process, tmp_path, name):
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", JAX_PLATFORMS="cpu",
               TQDM_DISABLE="1", JAX_DISABLE_MOST_OPTIMIZATIONS="1",  # compiles ~2x faster; same in every run
               PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    procs, logs = [], []
    try:
        for i, flags in enumerate(flags_per_process):
            logs.append(tmp_path / f"{name}-{i}.log")
            with open(logs[-1], "w") as f:
                procs.append(subprocess.Popen([sys.executable, WORKER, str(out), *map(str, flags)], stdout=f,
                                              stderr=subprocess.STDOUT, env=env, cwd=ROOT))
        for p in procs:
            p.wait(timeout=300)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(10)
    output = "\n".join(f"--- {log.name}\n" + log.read_text()[-3000:] for log in logs)
    assert all(p.returncode == 0 for p in procs), output
    return output


@pytest.mark.slow  # three worker processes compile two small objectives: ~60-90 s wall on 2 busy cores
def test_two_processes_equal_one_process_for_ch2_distillation_and_ch5_score_matching(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    _launch(one, 8, [[]], tmp_path, "one")
    port = _free_port()
    _launch(two, 4, [["--coordinator-address", f"127.0.0.1:{port}", "--num-processes", 2, "--process-id", i,
                      "--distributed-timeout", 120] for i in (0, 1)], tmp_path, "two")
    # chapter 2: the teacher's and the Jacobian-matched student's test accuracy
    r1, r2 = (json.load(open(d / "ch2" / "results.json")) for d in (one, two))
    assert r2["environment"]["process_count"] == 2 and r1["environment"]["process_count"] == 1
    assert r2["teacher_accuracy"] == pytest.approx(r1["teacher_accuracy"], abs=1 / 64 + 1e-9)
    s1, s2 = r1["results"]["CE + J"]["2"], r2["results"]["CE + J"]["2"]
    assert s2["mean"] == pytest.approx(s1["mean"], abs=1 / 64 + 1e-9)
    # chapter 5: the score-matching model's parameters (both processes hold the same) and its evaluation
    p1 = np.load(one / "params-p0.npz")
    for p in (two / "params-p0.npz", two / "params-p1.npz"):
        p2 = np.load(p)
        assert sorted(p1.files) == sorted(p2.files)
        for k in p1.files:
            np.testing.assert_allclose(p2[k], p1[k], rtol=2e-4, atol=2e-5, err_msg=k)
    d1, d2 = (json.load(open(d / "ch5" / "results.json"))["runs"][0] for d in (one, two))
    assert d2["steps"] == d1["steps"] > 0
    assert d2["test_cross_entropy"] == pytest.approx(d1["test_cross_entropy"], rel=1e-3)
    assert d2["test_accuracy"] == pytest.approx(d1["test_accuracy"], abs=1 / 64 + 1e-9)


@pytest.mark.parametrize("script", [fullgrad_digits, randomization_study, backdoor_discovery, density_evaluation])
def test_single_process_scripts_refuse_multiprocess_flags(script, capsys):
    flags = ["--scale", "smoke", "--coordinator-address", "127.0.0.1:1", "--num-processes", "2", "--process-id", "0"]
    with pytest.raises(SystemExit) as e:
        script.main(flags)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "one process only" in err and "--coordinator-address" in err and "--num-processes" in err
