"""Mutation sweep: plant realistic one-line bugs in gradjax/, one at a time, and check that the tests catch them.

    python -m benchmarks.mutation_sweep [--out DIR] [--only ID ...] [--check] [--timeout S] [--rev REV]

Not collected by pytest (it lives in ``benchmarks/``) and not run by CI: about 10-15 minutes on 2 CPU cores.

How it works. The committed tree (``git archive REV``, default ``HEAD``) is extracted to a temporary directory —
the working tree is never touched, so it is safe while other people edit gradjax/. For every mutation in
:data:`MUTATIONS` — ``(file, exact original substring of one line, replacement)`` — the original text is looked up
in the copy (in the named file, or, if a refactor moved it, in any ``gradjax/**/*.py`` file that holds it exactly
once), replaced, and the covering test files are run from the copy with ``PYTHONPATH=<copy>`` (so ``import
gradjax`` resolves to the mutated copy; checked before the sweep) as ``pytest -x -q -n 0``; then the file is
restored. A mutation is

* ``killed`` — the tests failed (or errored);
* ``survived`` — the tests passed: a test is missing, unless the mutant is provably equivalent (say why in
  docs/TESTING.md);
* ``stale`` — the original text is no longer in the code (refactored away): update the entry;
* ``timeout`` — the tests ran past ``--timeout``.

A baseline run of every covering test file on the unmutated copy comes first (a failing baseline would make every
mutant look killed). ``--check`` only reports which mutations apply (found / stale), without running tests.
Results: ``DIR/mutation_sweep.json`` and ``DIR/mutation_sweep.md`` (default DIR: a new temporary directory).
"""
from __future__ import annotations

import argparse
import dataclasses
import glob
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Optional

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# covering test files (narrow on purpose: the sweep must fit in ~15 minutes)
T_RNG = "tests/test_properties_train_rng.py"
T_TRACE = "tests/test_properties_trace.py"
T_DISC = "tests/test_properties_discriminative.py"
T_FROZEN = "tests/test_properties_frozen_teacher.py"
T_SAL = "tests/test_properties_saliency_options.py"
T_TERMS = "tests/test_properties_loss_terms.py"


@dataclasses.dataclass(frozen=True)
class Mutation:
    id: str
    kind: str  # sign | constant | axis | dropped term | ignored option | reused key | missing stop_gradient
    file: str
    original: str
    replacement: str
    tests: tuple[str, ...]
    note: str = ""


def M(id, kind, file, original, replacement, tests, note=""):  # noqa: N802
    return Mutation(id, kind, file, original, replacement, tuple(tests) if isinstance(tests, (list, tuple))
                    else (tests,), note)


SAL = lambda k: (T_SAL, "-k", k)  # noqa: E731

MUTATIONS: list[Mutation] = [
    # --------------------------------------------------------------------------------- training engine: keys
    M("train-same-key", "reused key", "gradjax/train/steps.py",
      "rng = jax.random.fold_in(state.rng, state.step)", "rng = state.rng", [T_RNG],
      "every step hands the loss the same key (identical dropout masks / probes)"),
    M("train-no-device-fold", "reused key", "gradjax/train/steps.py",
      "rng = jax.random.fold_in(rng, lax.axis_index(axis_name))", "rng = rng", [T_RNG],
      "every pmap device draws the same noise"),
    M("train-step-not-counted", "constant", "gradjax/train/steps.py",
      "step=state.step + ok.astype(state.step.dtype)", "step=state.step", [T_RNG],
      "the step counter never advances (keys, schedules and checkpoints stall)"),
    M("ckpt-rng-not-saved", "dropped term", "gradjax/train/checkpoint.py",
      '_STATE_FIELDS = ("step", "params", "model_state", "opt_state", "rng", "diverged")',
      '_STATE_FIELDS = ("step", "params", "model_state", "opt_state", "diverged")', (T_RNG, "-k", "resume"),
      "a checkpoint without the base key: a resumed run draws from whatever key it was given"),
    # ------------------------------------------------------------------------------------- trace estimators
    M("trace-hutchpp-reuse-sketch", "reused key", "gradjax/trace.py",
      "t_res = _probe_mean(estimate, draw, key, probes, r, chunk, memory_budget, offset=k)",
      "t_res = _probe_mean(estimate, draw, key, probes, r, chunk, memory_budget, offset=0)", [T_TRACE],
      "Hutch++'s residual probes are the sketch probes"),
    M("trace-hutchpp-no-deflation", "dropped term", "gradjax/trace.py",
      'Gp = G - jnp.einsum("bdc,bc->bd", Q, jnp.einsum("bdc,bd->bc", Q, G))', "Gp = G", [T_TRACE],
      "residual probes not projected off the sketch (double counts the top space)"),
    M("trace-hutchpp-no-low-rank", "dropped term", "gradjax/trace.py",
      "t_low = jnp.sum(Q * HQ, axis=(1, 2))", "t_low = 0.0 * jnp.sum(Q * HQ, axis=(1, 2))", [T_TRACE],
      "the exact low-rank part tr(QᵀHQ) is dropped"),
    M("trace-hutchpp-sketch-without-h", "dropped term", "gradjax/trace.py",
      "Q, _ = jnp.linalg.qr(HS)", "Q, _ = jnp.linalg.qr(as_cols(S))", [T_TRACE],
      "Hutch++ sketch Q = qr(S) instead of qr(H S): still unbiased, no deflation"),
    M("trace-probe-reused", "reused key", "gradjax/trace.py",
      "drawn = lambda idx: batched(jax.vmap(lambda i: draw(jax.random.fold_in(key, i)))(idx))",
      "drawn = lambda idx: batched(jax.vmap(lambda i: draw(jax.random.fold_in(key, 0 * i)))(idx))", [T_TRACE],
      "all N probes are one probe (variance not reduced by N)"),
    M("trace-taylor-factor", "constant", "gradjax/trace.py",
      "return 2.0 / s**2 * (f(x + v) - fx)", "return 1.0 / s**2 * (f(x + v) - fx)", [T_TRACE],
      "one-sided Taylor estimator halved"),
    M("trace-taylor-sigma-power", "constant", "gradjax/trace.py",
      "return (f(x + v) + f(x - v) - 2.0 * fx) / s**2", "return (f(x + v) + f(x - v) - 2.0 * fx) / s", [T_TRACE],
      "antithetic form divides by sigma, not sigma^2"),
    M("trace-control-variate-sign", "sign", "gradjax/trace.py",
      "return 2.0 / s**2 * (f(x + v) - fx - per_example_sum(grad_fx * v))",
      "return 2.0 / s**2 * (f(x + v) - fx + per_example_sum(grad_fx * v))", [T_TRACE],
      "control variate added instead of subtracted (still unbiased on average: caught only by the spread)"),
    M("trace-hutchinson-quadratic-form", "dropped term", "gradjax/trace.py",
      "return per_example_sum(v * hv(v))", "return per_example_sum(hv(v))", [T_TRACE],
      "1ᵀHv instead of vᵀHv"),
    # -------------------------------------------------------------------------------- discriminative (§5.5.2)
    M("disc-abs-after-sum", "axis", "gradjax/discriminative.py",
      "return jnp.sum(jnp.abs(gradient), axis=-1)", "return jnp.abs(jnp.sum(gradient, axis=-1))", [T_DISC],
      "channel sum before abs"),
    M("disc-std-of-abs", "sign", "gradjax/discriminative.py",
      "return jnp.std(gradient, axis=-1)", "return jnp.std(jnp.abs(gradient), axis=-1)", [T_DISC],
      "std of |g| instead of the signed gradient"),
    M("disc-most-salient", "sign", "gradjax/discriminative.py",
      "most_salient=False", "most_salient=True", [T_DISC], "removes the most relevant pixels instead"),
    M("disc-gradient-model-ignored", "ignored option", "gradjax/discriminative.py",
      "gradient_fn if gradient_fn is not None else evaluation_fn", "evaluation_fn", [T_DISC],
      "Fig. 5.3b's gradient model ignored"),
    M("metrics-fill-mean-all-channels", "axis", "gradjax/metrics.py",
      "return jnp.mean(x, axis=(1, 2), keepdims=True)", "return jnp.mean(x, axis=(1, 2, 3), keepdims=True)",
      [T_DISC], "fill='mean' with one mean over all channels instead of per channel"),
    M("metrics-removes-one-more", "constant", "gradjax/metrics.py",
      "return (ranks < n).reshape(B, H, W)", "return (ranks <= n).reshape(B, H, W)", [T_DISC],
      "k + 1 pixels removed (the authors' off-by-one, mirrored)"),
    M("gradients-target-shifted", "constant", "gradjax/gradients.py",
      "gradient = pullback(jax.nn.one_hot(t, logits.shape[1], dtype=logits.dtype))",
      "gradient = pullback(jax.nn.one_hot((t + 1) % logits.shape[1], logits.shape[1], dtype=logits.dtype))",
      SAL("raw_gradient"), "every gradient explains the next class"),
    M("fooling-abs-after-sum", "axis", "gradjax/losses/fooling.py",
      "return jnp.sum(jnp.abs(grad), axis=-1)", "return jnp.abs(jnp.sum(grad, axis=-1))", [T_DISC],
      "fooling saliency distribution: channel sum before abs"),
    M("attention-square-of-sum", "axis", "gradjax/losses/attention.py",
      "return jnp.sum(jnp.square(features), axis=-1)", "return jnp.square(jnp.sum(features, axis=-1))", [T_DISC],
      "attention map eq. 2.7: square of the channel sum"),
    # ------------------------------------------------------------------------------------ frozen teachers
    M("frozen-jacobian", "missing stop_gradient", "gradjax/losses/distillation.py",
      "t_jac = jax.lax.stop_gradient(t_jac)", "t_jac = t_jac", [T_FROZEN],
      "the teacher's Jacobian is trained"),
    M("frozen-noisy-activation", "missing stop_gradient", "gradjax/losses/distillation.py",
      "return activation_matching(student_fn(z), jax.lax.stop_gradient(teacher_fn(z)))",
      "return activation_matching(student_fn(z), teacher_fn(z))", [T_FROZEN], ""),
    M("frozen-attention-jacobian", "missing stop_gradient", "gradjax/losses/attention.py",
      "loss = normalized_gradient_matching(s_grad, lax.stop_gradient(t_grad))",
      "loss = normalized_gradient_matching(s_grad, t_grad)", [T_FROZEN], ""),
    M("frozen-stochastic-jacobian", "missing stop_gradient", "gradjax/losses/distillation.py",
      "jt = jax.lax.stop_gradient(jax.jvp(teacher_fn, (x,), (v,))[1])",
      "jt = jax.jvp(teacher_fn, (x,), (v,))[1]", [T_FROZEN], ""),
    M("frozen-term-teacher-variables", "missing stop_gradient", "gradjax/losses/terms.py",
      'return jax.lax.stop_gradient(frozen["teacher"])', 'return frozen["teacher"]', [T_TERMS],
      "the teacher variables of every Term are differentiable"),
    # ------------------------------------------------------------------------------------------ term weights
    M("terms-weight-dropped", "dropped term", "gradjax/losses/terms.py",
      "total = total + t.weight * m", "total = total + m", [T_TERMS], "the combinator ignores every weight"),
    M("terms-factory-weight-dropped", "ignored option", "gradjax/losses/terms.py",
      "return Term(name, fn, float(weight), clean_layers=tuple(s for s, _ in pairs))",
      "return Term(name, fn, 1.0, clean_layers=tuple(s for s, _ in pairs))", [T_TERMS],
      "one factory (attention matching) drops its weight"),
    M("terms-anti-sigma-ignored", "ignored option", "gradjax/losses/terms.py",
      "tau=tau, sigma=sigma", "tau=tau", [T_TERMS], "anti-score-matching term ignores sigma"),
    M("score-matching-mu-ignored", "ignored option", "gradjax/losses/score_matching.py",
      "score_matching_from_terms(terms.trace, terms.grad, mu=mu)",
      "score_matching_from_terms(terms.trace, terms.grad, mu=0.0)", [T_TERMS], "stability term dropped"),
    M("anti-score-default-sigma", "constant", "gradjax/losses/score_matching.py",
      "sigma: float = 1e-3, **trace_options) -> tuple[jax.Array, DensityTerms]:",
      "sigma: float = 1e-2, **trace_options) -> tuple[jax.Array, DensityTerms]:",
      [T_TERMS], "anti-score-matching's default sigma (1e-3, the authors' code)"),
    M("anti-score-term-default-sigma", "constant", "gradjax/losses/terms.py",
      "tau: float = 1000.0, sigma: float = 1e-3,", "tau: float = 1000.0, sigma: float = 1e-2,",
      [T_TERMS], "the anti-score-matching term's default sigma"),
    # ------------------------------------------------------------------------------------ saliency options
    M("sal-fullgrad-merge-ignored", "ignored option", "gradjax/saliency/fullgrad_family.py",
      "dec = _decompose(handle, x, target, merge)", 'dec = _decompose(handle, x, target, "none")',
      SAL("fullgrad- and merge"), ""),
    M("sal-smooth-fullgrad-noise-range", "ignored option", "gradjax/saliency/fullgrad_family.py",
      "sigma = noise_scale(x, noise_level, noise_range)", "sigma = noise_scale(x, noise_level)",
      SAL("smooth_fullgrad and noise_range"), ""),
    M("sal-input-sum-ignored", "ignored option", "gradjax/saliency/fullgrad_family.py",
      'if input_sum == "before":', "if False:", SAL("fullgrad and input_sum"), ""),
    M("sal-rescale-channel", "axis", "gradjax/saliency/postprocess.py",
      '(1, 2, 3) if rescale == "layer" else (1, 2)', "(1, 2, 3)", SAL("rescale"), ""),
    M("sal-abs-max-sign", "sign", "gradjax/saliency/postprocess.py",
      "return jnp.max(jnp.abs(a), axis=-1)", "return jnp.max(a, axis=-1)", SAL("reduce"), ""),
    M("sal-gradcam-relu-always", "ignored option", "gradjax/saliency/internal_layers.py",
      "    if relu:", "    if True:", SAL("gradcam"), ""),
    M("sal-ig-baseline-ignored", "ignored option", "gradjax/saliency/gradient_family.py",
      "base = jnp.asarray(baseline, x.dtype)", "base = jnp.asarray(0.0, x.dtype)",
      SAL("integrated_gradients and baseline"), ""),
    M("sal-vargrad-mean-not-squared", "dropped term", "gradjax/saliency/noise_family.py",
      "jnp.maximum(m2 - m1 * m1, 0)", "jnp.maximum(m2 - m1, 0)", SAL("vargrad or definition"), ""),
    M("sal-smoothgrad-sq-not-squared", "dropped term", "gradjax/saliency/noise_family.py",
      "return g, g * g", "return g, g", SAL("smoothgrad_sq or definition"), ""),
    M("sal-ig-left-is-right", "constant", "gradjax/saliency/gradient_family.py",
      "return np.arange(m) / m, np.full(m, 1.0 / m)", "return np.arange(1, m + 1) / m, np.full(m, 1.0 / m)",
      SAL("quadrature"), "the left Riemann rule uses the right end points"),
    M("sal-noise-range-example", "axis", "gradjax/saliency/noise_family.py",
      "rng = flat.max(axis=1) - flat.min(axis=1)", "rng = flat.max(axis=1)", SAL("definition"),
      "noise scale from the maximum, not the range"),
    M("sal-noise-key-reused", "reused key", "gradjax/saliency/noise_family.py",
      "jax.random.normal(keys[i], x.shape, x.dtype) for i in range(keys.shape[0])",
      "jax.random.normal(keys[0], x.shape, x.dtype) for i in range(keys.shape[0])", SAL("definition"),
      "every SmoothGrad sample draws the same noise"),
    M("sm-score-half-grad-norm", "constant", "gradjax/losses/score_matching.py",
      "return trace + 0.5 * gradient_sq_norm(grad) + mu * jnp.square(trace)",
      "return trace + 1.0 * gradient_sq_norm(grad) + mu * jnp.square(trace)", (T_TERMS, "-k", "defaults"),
      "eq. 5.4's 1/2 on the gradient norm"),
    M("sm-anti-clamp", "sign", "gradjax/losses/score_matching.py",
      "return -jnp.minimum(trace, jnp.asarray(tau, trace.dtype))",
      "return -jnp.maximum(trace, jnp.asarray(tau, trace.dtype))", (T_TERMS, "-k", "defaults"),
      "the anti-score-matching clamp"),
    M("sal-fullgrad-noabs-merge-ignored", "ignored option", "gradjax/saliency/fullgrad_family.py",
      'return fullgrad(model, x, target, postprocess="none", merge=merge, align_corners=align_corners)',
      'return fullgrad(model, x, target, postprocess="none", merge="none", align_corners=align_corners)',
      SAL("fullgrad_noabs"), "expected equivalent: without psi the maps are linear, so grouping does not matter"),
    # ------------------------------------------------------------------------------ input-agnostic (seed 003)
    M("ia-step-not-scaled", "ignored option", "gradjax/input_agnostic.py",
      "return project(rho + updates * (ball_radius / radius), ball_radius, norm)",
      "return project(rho + updates, ball_radius, norm)", ("tests/test_input_agnostic.py", "-k", "step_scaling"),
      "continuation steps at smaller radii not scaled by r / eta (eq. IA.3)"),
]


# ----------------------------------------------------------------------------------------------------- engine
def _extract(rev: str, dest: str) -> None:
    archive = subprocess.run(["git", "-C", REPO, "archive", rev], check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", dest], input=archive, check=True)


def _locate(copy: str, m: Mutation) -> tuple[Optional[str], str]:
    """(path of the file holding ``m.original`` exactly once, status): the named file first, then any gradjax file."""
    named = os.path.join(copy, m.file)
    if os.path.exists(named):
        n = open(named).read().count(m.original)
        if n == 1:
            return named, "found"
        if n > 1:
            return None, f"ambiguous ({n} occurrences in {m.file})"
    hits = [p for p in glob.glob(os.path.join(copy, "gradjax", "**", "*.py"), recursive=True)
            if open(p).read().count(m.original) == 1]
    if len(hits) == 1:
        return hits[0], "found (moved to " + os.path.relpath(hits[0], copy) + ")"
    return None, "stale" if not hits else f"ambiguous ({len(hits)} files)"


def _pytest(copy: str, args, timeout: float) -> tuple[str, float, str]:
    env = dict(os.environ, PYTHONPATH=copy, JAX_PLATFORMS="cpu", TQDM_DISABLE="1")
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-n", "0", "-p", "no:cacheprovider", *args]
    t0 = time.time()
    try:
        r = subprocess.run(cmd, cwd=copy, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return "timeout", time.time() - t0, ""
    tail = (r.stdout + r.stderr).strip().splitlines()
    return ("passed" if r.returncode == 0 else f"failed (rc {r.returncode})"), time.time() - t0, \
        (tail[-1] if tail else "")


def _check_import(copy: str) -> str:
    env = dict(os.environ, PYTHONPATH=copy)
    out = subprocess.run([sys.executable, "-c", "import gradjax; print(gradjax.__file__)"], cwd=copy, env=env,
                         capture_output=True, text=True, check=True).stdout.strip()
    if not os.path.realpath(out).startswith(os.path.realpath(copy)):
        raise SystemExit(f"`import gradjax` resolves to {out}, not to the copy {copy}: refusing to run.")
    return out


def _markdown(results: list[dict], meta: dict) -> str:
    counts = {s: sum(r["status"] == s for r in results) for s in ("killed", "survived", "stale", "timeout")}
    applied = counts["killed"] + counts["survived"] + counts["timeout"]
    rate = counts["killed"] / applied if applied else float("nan")
    lines = [f"Mutation sweep of `{meta['rev']}` ({meta['commit'][:10]}), {meta['date']}: "
             f"**{counts['killed']} killed / {counts['survived']} survived** of {applied} applied "
             f"({rate:.0%}); {counts['stale']} stale, {counts['timeout']} timeout; {meta['seconds']:.0f} s.", "",
             "| id | kind | file | status | s | tests |", "|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['id']} | {r['kind']} | {r['file']} | {r['status']} | {r['seconds']:.0f} | "
                     f"{' '.join(r['tests'])} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rev", default="HEAD", help="git revision to mutate (default HEAD)")
    ap.add_argument("--out", default=None, help="directory for mutation_sweep.json / .md (default: a temp dir)")
    ap.add_argument("--only", nargs="*", default=None, help="mutation ids to run")
    ap.add_argument("--check", action="store_true", help="only report which mutations apply")
    ap.add_argument("--timeout", type=float, default=300.0, help="seconds per test run")
    ap.add_argument("--no-baseline", action="store_true", help="skip the unmutated baseline run")
    args = ap.parse_args(argv)

    ids = [m.id for m in MUTATIONS]
    assert len(set(ids)) == len(ids), "duplicate mutation ids"
    unknown = sorted(set(args.only or ()) - set(ids))
    if unknown:
        raise SystemExit(f"unknown mutation ids {unknown}")
    muts = [m for m in MUTATIONS if args.only is None or m.id in args.only]
    out = args.out or tempfile.mkdtemp(prefix="gradjax-mutation-sweep-")
    os.makedirs(out, exist_ok=True)
    copy = tempfile.mkdtemp(prefix="gradjax-mut-")
    t_start = time.time()
    try:
        _extract(args.rev, copy)
        commit = subprocess.run(["git", "-C", REPO, "rev-parse", args.rev], capture_output=True, text=True,
                                check=True).stdout.strip()
        print(f"copy of {args.rev} ({commit[:10]}) in {copy}; gradjax from {_check_import(copy)}", flush=True)
        if not args.check and not args.no_baseline:
            files = sorted({a for m in muts for a in m.tests if a.startswith("tests/")})
            status, secs, tail = _pytest(copy, files, args.timeout * 2)
            print(f"baseline {files}: {status} in {secs:.0f} s ({tail})", flush=True)
            if status != "passed":
                raise SystemExit("the covering tests fail on the unmutated copy: fix them first.")
        results = []
        for m in muts:
            path, where = _locate(copy, m)
            rec = dict(dataclasses.asdict(m), where=where, seconds=0.0, detail="")
            if path is None:
                rec["status"] = "stale"
                rec["detail"] = where
            elif args.check:
                rec["status"] = "applies"
            else:
                original = open(path).read()
                try:
                    with open(path, "w") as f:
                        f.write(original.replace(m.original, m.replacement, 1))
                    status, secs, tail = _pytest(copy, m.tests, args.timeout)
                finally:
                    with open(path, "w") as f:
                        f.write(original)
                rec["status"] = {"passed": "survived", "timeout": "timeout"}.get(status, "killed")
                rec["seconds"], rec["detail"] = secs, tail
            results.append(rec)
            print(f"{m.id:36s} {rec['status']:9s} {rec['seconds']:5.0f} s  {where}  {rec['detail']}", flush=True)
        meta = dict(rev=args.rev, commit=commit, date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                    seconds=time.time() - t_start, python=sys.version.split()[0])
        with open(os.path.join(out, "mutation_sweep.json"), "w") as f:
            json.dump({"meta": meta, "results": results}, f, indent=1)
        md = _markdown(results, meta)
        with open(os.path.join(out, "mutation_sweep.md"), "w") as f:
            f.write(md)
        print(md)
        print(f"results in {out}")
    finally:
        shutil.rmtree(copy, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
