#!/usr/bin/env bash
# The checks that need an NVIDIA GPU, in one script, for the day a machine
# with one is available (none of this project's machines has one, so CI runs
# only the "no GPU" path of this script, tests/test_gpu_check.py).
#
#   bash bench/gpu_check.sh [OUT_DIR]
#
# On a machine with a GPU, a CUDA toolkit (nvcc, compute-sanitizer) and the
# CUDA build of torch already installed in the active Python environment (no
# network is assumed), it:
#   1. builds logitkit for the GPU's own architecture (plus the shipped ones
#      when LOGITKIT_GPU_CHECK_ALL_ARCHS=1) and installs it;
#   2. runs the whole test suite on the `cuda` backend;
#   3. runs compute-sanitizer memcheck and racecheck on a small subset
#      (row ops, Top-H, sampling, linear cross-entropy);
#   4. runs the benchmark's default cases on the GPU.
# Every step has its own time limit; the whole script stays under 8 minutes on
# a 16-core host. Logs go to OUT_DIR (default: a new temporary directory).
# Exit status: 0 all passed, 1 a step failed, 77 no GPU (nothing was checked).
set -uo pipefail
cd "$(dirname "$0")/.."

python=${PYTHON:-python3}
out=${1:-$(mktemp -d)}
mkdir -p "$out"

no_gpu() {
  echo "gpu_check: no NVIDIA GPU available ($1); nothing was checked." >&2
  exit 77
}
command -v nvidia-smi >/dev/null 2>&1 || no_gpu "nvidia-smi not found"
nvidia-smi -L >/dev/null 2>&1 || no_gpu "nvidia-smi lists no device"
"$python" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null ||
  no_gpu "torch.cuda.is_available() is False for $python"

failed=0
step() {  # step NAME SECONDS COMMAND...
  local name=$1 limit=$2
  shift 2
  local begin=$SECONDS
  echo "== $name (limit ${limit}s)"
  if timeout "$limit" "$@" >"$out/$name.log" 2>&1; then
    echo "   ok in $((SECONDS - begin)) s"
  else
    echo "   FAILED (status $?) after $((SECONDS - begin)) s; last lines of $out/$name.log:"
    tail -n 25 "$out/$name.log" | sed 's/^/   | /'
    failed=1
  fi
}

arch=$("$python" -c "import torch; major, minor = torch.cuda.get_device_capability(); print(f'{major}{minor}-real')")
if [ "${LOGITKIT_GPU_CHECK_ALL_ARCHS:-0}" = 1 ]; then arch="80-real;90-real;90-virtual"; fi
echo "gpu_check: $(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | head -n 1); building for $arch; logs in $out"

export CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}
step build 300 env LOGITKIT_CUDA=1 "$python" -m pip install --no-build-isolation --no-deps \
  --config-settings=cmake.define.LOGITKIT_CUDA_ARCHITECTURES="$arch" .
step tests-cuda 240 "$python" -m pytest tests -q -x -k "cuda and not emulated" -p no:cacheprovider

if command -v compute-sanitizer >/dev/null 2>&1; then
  subset=(tests/test_row_ops.py tests/test_top_h.py tests/test_linear_cross_entropy.py)
  filter="cuda and not emulated and (matches_fp64 or (against_reference and 0.05) or sample_draw or options_match_reference)"
  step memcheck 120 compute-sanitizer --tool memcheck --error-exitcode 1 \
    "$python" -m pytest "${subset[@]}" -q -x -k "$filter" -p no:cacheprovider
  step racecheck 120 compute-sanitizer --tool racecheck --racecheck-report hazard --error-exitcode 1 \
    "$python" -m pytest tests/test_top_h.py -q -x -k "cuda and not emulated and against_reference and 0.05" -p no:cacheprovider
else
  echo "== compute-sanitizer not on PATH: memcheck and racecheck skipped (add the CUDA toolkit's bin directory)"
  failed=1
fi

step bench 120 "$python" -m logitkit.bench --device cuda --repeats 10 --plain --json "$out/bench.json"
cat "$out/bench.log" 2>/dev/null | tail -n 20

echo "gpu_check: $([ $failed = 0 ] && echo 'all steps passed' || echo 'some steps FAILED') (logs in $out)"
exit $failed
