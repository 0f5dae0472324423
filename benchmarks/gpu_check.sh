#!/usr/bin/env bash
# The GPU check (benchmarks/gpu_check.py): `paper` training and TTA at full size, a short `r50` run; one table.
#
#   bash benchmarks/gpu_check.sh            on a GPU machine, in <= 8 minutes: installs what a bare machine lacks
#                                           (Python 3.12 + torch only) from the carried .gpu/wheels, reads the
#                                           carried real-data subset .gpu/data/sartorius (python benchmarks/gpu_bundle.py
#                                           builds both, <= 64 MiB), writes $OUT/gpu_check.json when OUT is set
#   bash benchmarks/gpu_check.sh --smoke    the same steps tiny on the CPU (CI runs it through tests/test_gpu_check.py)
#
# Extra arguments go to gpu_check.py (--iters, --tta-images, --r50-minutes, --data, --work).
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ "${1:-}" == "--smoke" ]]; then
  if [[ -n "${PYTHON:-}" ]]; then PY=$PYTHON; elif [[ -x .venv/bin/python ]]; then PY=.venv/bin/python; else PY=python3; fi
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
  exec "$PY" benchmarks/gpu_check.py "$@"
fi
PY=${PYTHON:-python3}
if ! "$PY" -c "import detectron2, fvcore, iopath, yacs, omegaconf, hydra, pycocotools" 2>/dev/null; then
  if ! compgen -G ".gpu/wheels/*.whl" >/dev/null; then
    echo "gpu_check.sh: detectron2 and its dependencies are missing and .gpu/wheels holds no wheel" >&2
    echo "  build the bundle here first: python benchmarks/gpu_bundle.py (then carry .gpu)" >&2
    exit 2
  fi
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/cellkit_site \
    .gpu/wheels/*.whl
  export PYTHONPATH=/tmp/cellkit_site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
JSON=()
if [[ -n "${OUT:-}" ]]; then JSON=(--json "$OUT/gpu_check.json"); fi
exec timeout 470 "$PY" benchmarks/gpu_check.py "${JSON[@]}" "$@"
