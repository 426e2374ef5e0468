#!/usr/bin/env bash
# The GPU check in one run: GPU-marked tests, the Triton kernels' tests compiled for the GPU,
# `facert doctor`, `facert bench decode`, `throughput` and `load` on the base shape, with
# every log, JSON, nvidia-smi's output and the package versions written into one folder.
#
#   bench/gpu_check.sh [OUT_DIR]        (default: $OUT, else ./gpu-check)
#
# Made for a fresh GPU machine reached through a tool that allows 10 minutes: the whole run ends
# within DEADLINE_S (7m40s), each step under its own `timeout` cut to the time left, and a step
# that fails or times out does not stop the later ones (summary.txt lists each step's exit
# status; 124 = timed out). facert is installed from this checkout when it is not already: with
# no index (pip --no-build-isolation --no-deps) where its dependencies are installed, as on a GPU
# machine with no network, else from pip's usual index. Without nvidia-smi or a CUDA PyTorch, the
# GPU steps are skipped with the reason and doctor runs its CPU checks only.
set -u

cd "$(dirname "$0")/.."
OUT_DIR="${1:-${OUT:-gpu-check}}"
mkdir -p "$OUT_DIR"
OUT_DIR="$(cd "$OUT_DIR" && pwd)"
DEADLINE_S="${DEADLINE_S:-460}"
SUMMARY="$OUT_DIR/summary.txt"
PY="${PYTHON:-python}"
export PYTHONUNBUFFERED=1
: >"$SUMMARY"

note() { echo "$*" | tee -a "$SUMMARY"; }

# step NAME LIMIT_S CMD...: run CMD with its output in NAME.log, under min(LIMIT_S, time left).
step() {
  local name=$1 limit=$2 left rc start
  shift 2
  left=$((DEADLINE_S - SECONDS - 5))
  if ((left < 20)); then
    note "$name: SKIPPED (only ${left}s of the ${DEADLINE_S}s budget left)"
    return
  fi
  ((limit > left)) && limit=$left
  echo "== $name (up to ${limit}s): $*"
  start=$SECONDS
  timeout -k 10 "$limit" "$@" >"$OUT_DIR/$name.log" 2>&1
  rc=$?
  note "$name: exit $rc after $((SECONDS - start))s (limit ${limit}s)$( ((rc == 124)) && echo ', TIMED OUT')"
  tail -n 5 "$OUT_DIR/$name.log"
}

# ---- the machine -------------------------------------------------------------------------------
{
  date -u
  uname -a
  "$PY" --version
  git rev-parse HEAD 2>/dev/null && git status --short 2>/dev/null | head -50
} >"$OUT_DIR/versions.txt" 2>&1
GPU=yes
if command -v nvidia-smi >/dev/null 2>&1; then
  nvidia-smi >"$OUT_DIR/nvidia-smi.txt" 2>&1 || GPU="no (nvidia-smi failed: see nvidia-smi.txt)"
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem \
    --format=csv >>"$OUT_DIR/nvidia-smi.txt" 2>&1
else
  GPU="no (nvidia-smi not found)"
  echo "nvidia-smi not found" >"$OUT_DIR/nvidia-smi.txt"
fi

# ---- facert from this checkout -----------------------------------------------------------------
NEEDS="torch, numpy, onnx, onnx_ir, onnxruntime, tokenizers, safetensors, PIL, tqdm, pytest"
NEEDS="$NEEDS, scikit_build_core"
if "$PY" -c "import facert, facert.kernels as k, sys; k.cpu_library();
sys.exit(not facert.__file__.startswith('$PWD/'))" >/dev/null 2>&1; then
  note "install: facert from $PWD already importable, kernels built"
elif "$PY" -c "import $NEEDS" >/dev/null 2>&1; then # what facert needs is there: no index needed
  step install-offline 180 "$PY" -m pip install --no-build-isolation --no-deps -e .
else
  step install 240 "$PY" -m pip install -e '.[test]'
fi

"$PY" - >>"$OUT_DIR/versions.txt" 2>&1 <<'EOF'
from importlib import metadata
for pkg in ("facert", "torch", "triton", "onnxruntime", "onnxruntime-gpu", "numpy", "pytest"):
    try:
        print(f"{pkg} {metadata.version(pkg)}")
    except metadata.PackageNotFoundError:
        print(f"{pkg} not installed")
try:
    import torch
    print("torch.version.cuda", torch.version.cuda, "| cuda available", torch.cuda.is_available())
    if torch.cuda.is_available():
        print("device", torch.cuda.get_device_name(0), torch.cuda.get_device_capability(0))
except Exception as e:
    print("torch:", type(e).__name__, e)
try:
    import facert.kernels.triton  # noqa: F401
    print("facert.kernels.triton imports")
except Exception as e:
    print("facert.kernels.triton:", type(e).__name__, e)
EOF
if [[ $GPU == yes ]] && ! "$PY" -c "import torch, sys; sys.exit(not torch.cuda.is_available())" \
  >/dev/null 2>&1; then
  GPU="no (PyTorch cannot see a CUDA GPU: see versions.txt)"
fi
note "gpu: $GPU"

# ---- checks ------------------------------------------------------------------------------------
if [[ $GPU == yes ]]; then
  # this file alone: tests/test_triton_kernels.py turns the Triton interpreter on when imported
  step gpu-tests 150 "$PY" -m pytest -q -m gpu -rA -p no:cacheprovider \
    tests/test_cuda_backend.py --junitxml="$OUT_DIR/gpu-tests.xml"
  # every Triton kernel's tests (numpy references, edge cases), compiled here instead of interpreted
  step triton-kernels 150 env FACERT_TRITON_TESTS=cuda "$PY" -m pytest -q -rA -p no:cacheprovider \
    tests/test_triton_kernels.py --junitxml="$OUT_DIR/triton-kernels.xml"
  step doctor 150 "$PY" -m facert.cli doctor --json "$OUT_DIR/doctor.json"
  step bench-decode 120 "$PY" -m facert.cli bench decode --model base \
    --configs cuda:fp16,cuda:fp32 --steps 20 -o "$OUT_DIR"
  step bench-throughput 150 "$PY" -m facert.cli bench throughput --model base \
    --configs cuda:fp16 --batches 1,16 --no-competitors --lengths 2 -q -o "$OUT_DIR"
  # One 256-code face and the device floor at the real shape (its ONNX Runtime CPU reference is
  # exported first, so this comes last and may be cut short by the budget).
  BASE=$("$PY" -c "from facert.bench.base_model import make_base_model as m
from facert.runtime.onnx_engines import cache_root as c; print(m(c() / 'base-random'))" 2>/dev/null)
  if [[ -n $BASE ]]; then
    step doctor-base 200 "$PY" -m facert.cli doctor -m "$BASE" --only cuda \
      --json "$OUT_DIR/doctor-base.json"
  else
    note "doctor-base: SKIPPED (the base-shape model could not be made)"
  fi
  # The scheduler on the device: Poisson arrivals of the mixed stream beside FIFO and one at a time
  step bench-load 200 "$PY" -m facert.cli bench load --model base --configs cuda:fp16 \
    --rates 1,4 --requests 24 -q -o "$OUT_DIR"
else
  note "gpu-tests, triton-kernels, bench-decode, bench-throughput, doctor-base, bench-load: SKIPPED, no GPU: $GPU"
  step doctor 150 "$PY" -m facert.cli doctor --json "$OUT_DIR/doctor.json"
fi

note "total: ${SECONDS}s of ${DEADLINE_S}s; results in $OUT_DIR"
exit 0
