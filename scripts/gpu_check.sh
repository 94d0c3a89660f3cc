#!/usr/bin/env bash
# GPU check of torch_rankone on a machine with an NVIDIA GPU, from a fresh clone:
#
#   1. a Python environment whose torch sees the GPU: the current python if its torch does,
#      else a virtual environment (.venv-gpu, reusing site packages) with `pip install torch`;
#   2. the extension built with its CUDA sources: pip install --no-build-isolation -e . (ninja);
#   3. every `cuda`-marked test: pytest -m cuda tests (tests/test_gpu_ready.py includes the
#      no-host-synchronisation check of ordinary CUDA optimizer steps);
#   4. the GPU benchmarks, tests/benchmarks/test_bench_cuda.py --benchmark-enable: kernels vs
#      memory bandwidth, optimizer steps vs Adam, NewtonLearn on a9a/w8a when
#      ../shared/data/libsvm (or any shared/data/libsvm above the checkout) has them.
#
# Results: tests/benchmarks/results/*_cuda.txt, and logs under tests/benchmarks/results/gpu_check/;
# when $OUT names a folder, everything is copied there too (for a remote runner). Budget: about
# 8 minutes in all (GPU_CHECK_BUDGET seconds, default 470, plus the download of torch if it has
# to be installed): each phase gets what is left, at most its own cap.
# Exit status: 0 when the build, the tests and the benchmarks all passed.
#
#   bash scripts/gpu_check.sh            # PYTHON=python3.12 bash scripts/gpu_check.sh
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
START=$(date +%s)
BUDGET=${GPU_CHECK_BUDGET:-470}
LOGS="$ROOT/tests/benchmarks/results/gpu_check"
mkdir -p "$LOGS"
STATUS=0

log() { echo "[gpu_check $(($(date +%s) - START))s] $*" | tee -a "$LOGS/summary.txt"; }
left() { echo $((BUDGET - ($(date +%s) - START))); }
# run_phase NAME CAP CMD...: run CMD with a timeout of min(CAP, time left), output to a log
run_phase() {
  local name=$1 cap=$2 limit rc
  shift 2
  limit=$(left)
  ((limit > cap)) && limit=$cap
  if ((limit < 20)); then
    log "$name: skipped, out of time"
    STATUS=1
    return 1
  fi
  log "$name: start (limit ${limit}s)"
  timeout --signal=INT --kill-after=15 "$limit" "$@" >"$LOGS/$name.log" 2>&1
  rc=$?
  tail -n 25 "$LOGS/$name.log"
  log "$name: exit $rc"
  ((rc != 0)) && STATUS=1
  return $rc
}
copy_out() {
  if [[ -n "${OUT:-}" ]]; then
    mkdir -p "$OUT"
    cp -f tests/benchmarks/results/*_cuda.txt "$OUT"/ 2>/dev/null
    cp -f "$LOGS"/*.log "$LOGS"/*.xml "$LOGS/summary.txt" "$OUT"/ 2>/dev/null
  fi
  return 0
}
trap copy_out EXIT
: >"$LOGS/summary.txt"

# ---- 1. Python with a CUDA torch ----------------------------------------------------------------
PY=${PYTHON:-python3}
has_cuda_torch() { "$1" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; }
if ! has_cuda_torch "$PY"; then
  log "torch with CUDA not importable by $PY: creating .venv-gpu"
  [[ -x .venv-gpu/bin/python ]] || "$PY" -m venv --system-site-packages .venv-gpu || exit 1
  PY="$ROOT/.venv-gpu/bin/python"
  if ! has_cuda_torch "$PY"; then
    T0=$(date +%s)
    run_phase install_torch 600 "$PY" -m pip install -q torch || exit 1
    BUDGET=$((BUDGET + $(date +%s) - T0)) # the download does not count against the 8 minutes
  fi
  has_cuda_torch "$PY" || { log "torch still sees no GPU (nvidia-smi below)"; nvidia-smi; exit 1; }
elif ! "$PY" - <<'EOF'
import os, sys, sysconfig
paths = sysconfig.get_paths()
managed = os.path.exists(os.path.join(paths["stdlib"], "EXTERNALLY-MANAGED"))
in_venv = sys.prefix != sys.base_prefix
sys.exit(0 if in_venv or (not managed and os.access(paths["purelib"], os.W_OK)) else 1)
EOF
then
  # an externally managed or read-only interpreter: a venv that sees its torch
  log "$PY cannot take packages: creating .venv-gpu (it sees the installed torch)"
  [[ -x .venv-gpu/bin/python ]] || "$PY" -m venv --system-site-packages .venv-gpu || exit 1
  PY="$ROOT/.venv-gpu/bin/python"
fi
log "python: $PY; $("$PY" -c 'import torch; p = torch.cuda.get_device_properties(0); print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, {p.name}, sm_{p.major}{p.minor}")')"

# build and test tools: only the missing ones are installed (nothing to fetch when all are there)
MISSING=$("$PY" - <<'EOF'
import importlib.util, shutil
need = {"setuptools": "setuptools>=64", "wheel": "wheel", "numpy": "numpy", "pytest": "pytest>=7",
        "pytest_benchmark": "pytest-benchmark>=4", "hypothesis": "hypothesis>=6", "scipy": "scipy",
        "sklearn": "scikit-learn"}
missing = [spec for mod, spec in need.items() if importlib.util.find_spec(mod) is None]
if shutil.which("ninja") is None and importlib.util.find_spec("ninja") is None:
    missing.append("ninja")
print(" ".join(missing))
EOF
)
if [[ -n "$MISSING" ]]; then
  log "installing: $MISSING"
  # shellcheck disable=SC2086
  PIP_DEFAULT_TIMEOUT=20 "$PY" -m pip install -q --retries 2 $MISSING >"$LOGS/pip_tools.log" 2>&1 ||
    log "warning: some tools failed to install (see pip_tools.log)"
fi
# ninja installed by pip lives next to the interpreter
PATH="$(dirname "$PY"):$PATH"
export PATH

# ---- 2. the extension, with its CUDA sources ----------------------------------------------------
# nvcc: CUDA_HOME, else the usual places; torch's build helpers find it there
if [[ -z "${CUDA_HOME:-}" ]] && ! command -v nvcc >/dev/null; then
  for d in /usr/local/cuda /usr/local/cuda-*; do
    [[ -x "$d/bin/nvcc" ]] && export CUDA_HOME="$d" && break
  done
fi
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
# only the GPU present (torch's default when TORCH_CUDA_ARCH_LIST is unset)
run_phase build 300 "$PY" -m pip install --no-build-isolation --no-deps -v -e . || {
  log "build failed (see build.log)"
  exit 1
}
"$PY" - <<'EOF' 2>&1 | tee -a "$LOGS/summary.txt"
import torch_rankone
from torch_rankone import _ext
ok = _ext.has_extension() and bool(_ext._C.with_cuda)
print("torch_rankone._C loaded:", _ext.has_extension(), "| built with CUDA:", ok)
raise SystemExit(0 if ok else 1)
EOF
[[ ${PIPESTATUS[0]} -eq 0 ]] || { log "the extension has no CUDA ops (no nvcc found?)"; STATUS=1; }

# ---- 3. every cuda-marked test ------------------------------------------------------------------
# (the cuda-marked benchmarks run with timings in step 4, not twice)
run_phase tests_cuda 240 "$PY" -m pytest -m cuda tests -p no:cacheprovider -q -rfEsx \
  --ignore=tests/benchmarks/test_bench_cuda.py --continue-on-collection-errors \
  --junitxml="$LOGS/tests_cuda.xml"

# ---- 4. GPU benchmarks ------------------------------------------------------------------------
run_phase bench_cuda 240 "$PY" -m pytest tests/benchmarks/test_bench_cuda.py -p no:cacheprovider \
  -q -s --benchmark-enable --benchmark-columns=min,mean,rounds \
  --junitxml="$LOGS/bench_cuda.xml"
for f in tests/benchmarks/results/*_cuda.txt; do
  [[ -f "$f" ]] && { echo "== $f"; cat "$f"; } | tee -a "$LOGS/summary.txt"
done

log "done: status $STATUS in $(($(date +%s) - START))s"
exit $STATUS
