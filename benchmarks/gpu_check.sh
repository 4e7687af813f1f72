#!/usr/bin/env bash
# The GPU verification of issue 23 on one chip, in at most ~10 minutes on one H200 (run from the repository root):
#
#     bash benchmarks/gpu_check.sh                 # JAX_PLATFORMS=cuda; writes $OUT (default benchmarks/results)
#     SMOKE=1 JAX_PLATFORMS=cpu bash benchmarks/gpu_check.sh   # the same steps on the CPU at smoke size (by hand)
#
# 1. the numerical test files on the chip with the library's defaults (one GPU: tests that need 8 devices skip);
# 2. benchmarks/accelerator.py: measured matmul rates, analytic-FLOP utilisation, exact vs TF32 vs bfloat16 (time,
#    map agreement, completeness), CE and gradient-norm train steps, a short digits training per precision.
# Each part has its own time limit, so the script ends in ~10 minutes whatever happens; logs and JSON go to $OUT.
set -u
cd "$(dirname "$0")/.."
export JAX_PLATFORMS="${JAX_PLATFORMS:-cuda}"
export XLA_PYTHON_CLIENT_PREALLOCATE=false   # several pytest workers share the one GPU
export TQDM_DISABLE=1
OUT="${OUT:-benchmarks/results}"
mkdir -p "$OUT"
TESTS="tests/test_gradients.py tests/test_fullgrad.py tests/test_trace.py tests/test_precision.py"

{
  date -u
  python -c "import jax, jaxlib, flax, optax; print('jax', jax.__version__, 'jaxlib', jaxlib.__version__, 'flax', flax.__version__, 'optax', optax.__version__); print(jax.devices())"
  (nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>/dev/null || true)
} 2>&1 | tee "$OUT/gpu_check_env.txt"

if [ "${SMOKE:-0}" = "1" ]; then
  BENCH_ARGS="--smoke"
  TEST_ARGS="-n 0 -k composes_with_an_outer_jit"
else
  BENCH_ARGS="--steps 16 --repeats 5 --train-epochs 2"
  TEST_ARGS="-n 4 --dist loadfile"
fi

echo "== 1. numerical tests on $JAX_PLATFORMS ($TESTS)"
timeout 300 python -m pytest -q $TEST_ARGS -p no:cacheprovider $TESTS 2>&1 | tee "$OUT/gpu_check_tests.log" | tail -25
echo "tests exit: ${PIPESTATUS[0]}" | tee -a "$OUT/gpu_check_tests.log"

echo "== 2. benchmarks/accelerator.py $BENCH_ARGS"
timeout 270 python -m benchmarks.accelerator $BENCH_ARGS --out "$OUT" 2>&1 | tee "$OUT/gpu_check_accelerator.log"
echo "accelerator exit: ${PIPESTATUS[0]}" | tee -a "$OUT/gpu_check_accelerator.log"
date -u
