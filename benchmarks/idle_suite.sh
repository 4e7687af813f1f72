#!/usr/bin/env bash
# The idle re-measurement of issue 27 in one command: every CPU peer table and the per-layer profile, on a machine
# that nothing else is using. Run from the repository root with the venv active:
#
#     bash benchmarks/idle_suite.sh                  # ~15-20 min on 2 idle cores (estimated); JSON in benchmarks/results/
#
# Estimated idle minutes per part (from loaded runs' CPU time): captum ~3, captum_fast ~3, jax ~3, layers ~2-3,
# cpu_ops ~3, ig ~3-4 (loaded: 640 s wall, 228 s CPU). The suite prints the real elapsed time of every part.
#     OUT=/tmp/idle bash benchmarks/idle_suite.sh    # elsewhere
#     PARTS="captum jax" bash benchmarks/idle_suite.sh   # a subset (captum captum_fast jax layers cpu_ops ig)
#
# Every part pins XLA's and torch's threads to the machine's cores (benchmarks/_common.py:pin_threads; --threads N
# to change) and records the load before (the suite's start, GRADJAX_BENCH_LOAD_BEFORE), during and after, and the
# CPU that other processes used; a part during which the machine was shared is marked "loaded" in its JSON and in
# its table caption (**LOADED**): such a table must not become a headline in docs/BENCHMARKS.md.
set -euo pipefail
OUT=${OUT:-benchmarks/results}
PARTS=${PARTS:-"captum captum_fast jax layers cpu_ops ig"}
mkdir -p "$OUT"
read -r L1 L5 L15 _ < /proc/loadavg
export GRADJAX_BENCH_LOAD_BEFORE="$L1,$L5,$L15"
echo "idle_suite: $(date -u '+%Y-%m-%d %H:%M:%S UTC'), $(nproc) cores, load average before: $L1 $L5 $L15"
if awk -v l="$L1" -v n="$(nproc)" 'BEGIN { exit !(l > n / 2) }'; then
  echo "idle_suite: WARNING: the 1-minute load average ($L1) exceeds half the cores: every part will be marked loaded"
fi
SUITE_START=$(date +%s)
declare -A ELAPSED
run() {  # name, then the command
  local name=$1; shift
  case " $PARTS " in *" $name "*) ;; *) return 0 ;; esac
  local t0; t0=$(date +%s)
  echo "=== $name: $* ($(date -u +%H:%M:%S))"
  local rc=0
  "$@" || rc=$?  # a failing part is reported, the others still run
  ELAPSED[$name]=$(( $(date +%s) - t0 ))
  echo "=== $name: ${ELAPSED[$name]} s$([ "$rc" = 0 ] || echo ", FAILED (exit $rc)")"
}
# 1. gradjax vs PyTorch + Captum, the default model (the issue's table), and with the opt-in CPU ops
run captum python -m benchmarks.peers_captum --repeats 5 --out "$OUT"
run captum_fast python -m benchmarks.peers_captum --repeats 5 --conv-impl im2col_small --pool-impl mask --out "$OUT"
# 2. gradjax vs PAIR saliency and traceax (the IG accuracy part is item 6)
run jax python -m benchmarks.peers_jax --repeats 5 --trace-keys 12 --skip accuracy --out "$OUT"
# 3. per layer type, forward / input-gradient / weight-gradient, gradjax vs PyTorch
run layers python -m benchmarks.layer_profile --repeats 5 --conv-impls lax,lax-nchw,im2col,im2col-ad --out "$OUT"
# 4. the opt-in CPU ops end to end, and IG images per call
run cpu_ops python -m benchmarks.cpu_ops_cost --repeats 5 --variants lax/lax,lax/mask,im2col_small/mask \
  --ig-chunks auto,256 --out "$OUT"
# 5. IG time to accuracy, ReLU and softplus VGG, every rule vs the peers' defaults
run ig python -m benchmarks.ig_time_to_accuracy --repeats 3 --out "$OUT"
echo "idle_suite: elapsed per part (s):"
for k in "${!ELAPSED[@]}"; do echo "  $k ${ELAPSED[$k]}"; done
read -r A1 A5 A15 _ < /proc/loadavg
echo "idle_suite: total $(( $(date +%s) - SUITE_START )) s; load average after: $A1 $A5 $A15"
python - "$OUT" <<'EOF'
import glob, json, os, sys
names = ["peers_captum-cpu.json", "peers_captum-cpu-im2col_small-mask.json", "peers_jax-cpu.json",
         "layer_profile-cpu.json", "cpu_ops_cost-cpu.json", "ig_time_to_accuracy-cpu.json"]
for n in names:
    p = os.path.join(sys.argv[1], n)
    if os.path.exists(p):
        r = json.load(open(p))
        print(f"  {n}: loaded={r.get('loaded')} other_cpu={r.get('load', {}).get('other_cpu_cores', float('nan')):.2f}")
EOF
