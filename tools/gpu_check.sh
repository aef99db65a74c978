#!/usr/bin/env bash
# The GPU check of issue 21 (item 5) as ONE command on a lent GPU machine (see tools/gpu_check.py for what it
# measures). From the repository root:
#
#   (here, once)  bash tools/gpu_wheels.sh                  # diffusers, omegaconf, ftfy, ... into .whl/
#   (device)      bash tools/gpu_check.sh                   # carry: [".whl"]; about 7.5 min; results in $OUT
#   (here)        bash tools/gpu_check.sh --cpu-smoke       # every code path on tiny configs, on the CPU
#
# On a lent machine (the session's `run` tool): the tree that travels must stay under 64 MiB, and the shipped
# data/*.safetensors (66 MiB, not needed here: every model is built with random weights) do not fit beside the
# rest; tools/gpu_wheels.sh prints the sizes. Move them aside for the one call, then back:
#   mkdir -p /tmp/sdkit-hold && mv data/*.safetensors /tmp/sdkit-hold/
#   run(command="bash tools/gpu_check.sh", carry=[".whl"], timeout_s=540)   # then give_back
#   mv /tmp/sdkit-hold/*.safetensors data/
#
# Extra arguments go to tools/gpu_check.py (--budget SECONDS, --groups eager train ..., --steps N,
# --sampler ddim|dpmpp_2m, --compile-mode MODE, --train-batch 8 32, --strict).
# Output: $OUT (else ./gpu_check_out): gpu_check.md (the table + published anchors), gpu_check.json,
# gpu_check.jsonl (one line per measurement, written as it is made), gpu_check.log (everything printed).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu_check_out}
mkdir -p "$OUT"
export OUT PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export PYTHONWARNINGS=${PYTHONWARNINGS:-ignore::FutureWarning,ignore::DeprecationWarning}

SMOKE=0
for a in "$@"; do [ "$a" = "--cpu-smoke" ] && SMOKE=1; done
[ "${GPU_CHECK_SMOKE:-0}" = "1" ] && [ $SMOKE = 0 ] && { SMOKE=1; set -- --cpu-smoke "$@"; }

if [ $SMOKE = 1 ]; then
    PY=${PY:-$PWD/.venv/bin/python}; [ -x "$PY" ] || PY=python3
    export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
    CUDA_VISIBLE_DEVICES="" "$PY" tools/gpu_check.py "$@" 2>&1 | tee "$OUT/gpu_check.log"
    exit "${PIPESTATUS[0]}"
fi

PY=${PY:-python3}
SITE=/tmp/site
if ls .whl/*.whl >/dev/null 2>&1; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl \
        || { echo "gpu_check: installing the carried wheels failed"; exit 1; }
    export PYTHONPATH="$PWD:$SITE${PYTHONPATH:+:$PYTHONPATH}"
else
    echo "gpu_check: no .whl/*.whl here (run tools/gpu_wheels.sh and carry .whl): diffusers may be missing"
    export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
"$PY" - <<'PY'
import importlib
for name in ("torch", "diffusers", "omegaconf", "ftfy", "transformers", "lightning", "sdkit"):
    try:
        m = importlib.import_module(name)
        print(f"  {name} {getattr(m, '__version__', '')} from {m.__file__}")
    except Exception as e:
        print(f"  {name}: NOT IMPORTABLE ({type(e).__name__}: {e})")
PY
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>/dev/null || true
# the parent keeps the budget (default 440 s); `timeout` is the last line of defence under the tool's limit
timeout -k 10 "${GPU_CHECK_HARD_LIMIT:-465}" "$PY" tools/gpu_check.py "$@" 2>&1 | tee "$OUT/gpu_check.log"
rc=${PIPESTATUS[0]}
[ -f "$OUT/gpu_check.md" ] || echo "gpu_check: no table written (rc $rc); partial results: $OUT/gpu_check.jsonl"
exit $rc
