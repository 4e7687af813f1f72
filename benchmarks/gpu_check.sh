#!/usr/bin/env bash
# The GPU verification of issue 23 on one chip, in at most ~10 minutes on one H200 (run from the repository root):
#
#     bash benchmarks/gpu_check.sh                 # JAX_PLATFORMS=cuda; writes $OUT (default benchmarks/results)
#     SMOKE=1 JAX_PLATFORMS=cpu bash benchmarks/gpu_check.sh   # the same steps on the CPU at smoke size (by hand)
#     PARTS="1 2" bash benchmarks/gpu_check.sh     # only some parts (default: PARTS="1 2 3 4")
#
# 1. the numerical test files on the chip with the library's defaults (one GPU: tests that need 8 devices skip);
# 2. benchmarks/accelerator.py: measured matmul rates, analytic-FLOP utilisation, exact vs TF32 vs bfloat16 (time,
#    map agreement, completeness), CE and gradient-norm train steps, a short digits training per precision.
# 3. benchmarks/peers_captum.py --device cuda --preset imagenet: gradjax vs PyTorch/Captum saliency on the same GPU,
#    VGG-16-BN, then (3b) the CIFAR ResNet-18 twin, batch 8 of 224x224 (needs torch with CUDA and captum; ends
#    with a message if absent);
# 4. benchmarks/peers_train_steps.py --device cuda: gradjax vs PyTorch train steps (CE, grad-norm, Jacobian,
#    full-gradient and score matching) on a CIFAR-size VGG-16-BN, batch 64 (needs torch with CUDA).
# Each part has its own time limit; parts 1+2 end in ~10 minutes, parts 3+4 in ~8 more: where one command may run
# at most 10 minutes, run them as two commands, PARTS="1 2" and PARTS="3 4". Logs and JSON go to $OUT.
set -u
cd "$(dirname "$0")/.."
export JAX_PLATFORMS="${JAX_PLATFORMS:-cuda}"
export XLA_PYTHON_CLIENT_PREALLOCATE=false   # several pytest workers share the one GPU
export TQDM_DISABLE=1
OUT="${OUT:-benchmarks/results}"
PARTS="${PARTS:-1 2 3 4}"
want() { case " $PARTS " in *" $1 "*) return 0 ;; *) return 1 ;; esac; }
mkdir -p "$OUT"
TESTS="tests/test_gradients.py tests/test_fullgrad.py tests/test_trace.py tests/test_precision.py"

{
  date -u
  python -c "import jax, jaxlib, flax, optax; print('jax', jax.__version__, 'jaxlib', jaxlib.__version__, 'flax', flax.__version__, 'optax', optax.__version__); print(jax.devices())"
  (python -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())" 2>&1 | tail -1 || true)
  (python -c "import captum; print('captum', captum.__version__)" 2>&1 | tail -1 || true)
  (nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>/dev/null || true)
} 2>&1 | tee "$OUT/gpu_check_env.txt"

if [ "${SMOKE:-0}" = "1" ]; then
  BENCH_ARGS="--smoke"
  TEST_ARGS="-n 0 -k composes_with_an_outer_jit"
  PEERS_CAPTUM_ARGS="--device cpu --smoke"
  PEERS_RESNET_ARGS="--device cpu --preset smoke-resnet"
  PEERS_TRAIN_ARGS="--device cpu --smoke"
else
  BENCH_ARGS="--steps 16 --repeats 5 --train-epochs 2"
  TEST_ARGS="-n 4 --dist loadfile"
  PEERS_CAPTUM_ARGS="--device cuda --preset imagenet"
  PEERS_RESNET_ARGS="--device cuda --preset imagenet-resnet"
  PEERS_TRAIN_ARGS="--device cuda --preset cifar"
fi

if want 1; then
echo "== 1. numerical tests on $JAX_PLATFORMS ($TESTS)"
timeout 300 python -m pytest -q $TEST_ARGS -p no:cacheprovider $TESTS 2>&1 | tee "$OUT/gpu_check_tests.log" | tail -25
echo "tests exit: ${PIPESTATUS[0]}" | tee -a "$OUT/gpu_check_tests.log"
fi

if want 2; then
echo "== 2. benchmarks/accelerator.py $BENCH_ARGS"
timeout 270 python -m benchmarks.accelerator $BENCH_ARGS --out "$OUT" 2>&1 | tee "$OUT/gpu_check_accelerator.log"
echo "accelerator exit: ${PIPESTATUS[0]}" | tee -a "$OUT/gpu_check_accelerator.log"
fi

if want 3; then
echo "== 3. benchmarks/peers_captum.py $PEERS_CAPTUM_ARGS"
timeout 160 python -m benchmarks.peers_captum $PEERS_CAPTUM_ARGS --out "$OUT" 2>&1 | grep -v Warning | tee "$OUT/gpu_check_peers_captum.log"
echo "peers_captum exit: ${PIPESTATUS[0]}" | tee -a "$OUT/gpu_check_peers_captum.log"
echo "== 3b. benchmarks/peers_captum.py $PEERS_RESNET_ARGS"
timeout 140 python -m benchmarks.peers_captum $PEERS_RESNET_ARGS --out "$OUT" 2>&1 | grep -v Warning | tee "$OUT/gpu_check_peers_captum_resnet.log"
echo "peers_captum (resnet) exit: ${PIPESTATUS[0]}" | tee -a "$OUT/gpu_check_peers_captum_resnet.log"
fi

if want 4; then
echo "== 4. benchmarks/peers_train_steps.py $PEERS_TRAIN_ARGS"
timeout 200 python -m benchmarks.peers_train_steps $PEERS_TRAIN_ARGS --out "$OUT" 2>&1 | grep -v Warning | tee "$OUT/gpu_check_peers_train_steps.log"
echo "peers_train_steps exit: ${PIPESTATUS[0]}" | tee -a "$OUT/gpu_check_peers_train_steps.log"
fi
date -u
