#!/usr/bin/env bash
# GPU check: run the bundles prepared by prepare_gpu_check.py on this machine's NVIDIA GPU and
# print agreement with the stored reference outputs and batch-1 latency.
# Needs python3 with numpy and Pillow and an NVIDIA driver (R580+); edgeq and cffi come from the
# prepared wheels when this Python lacks them. No tvm, no compiler.
#   bash benchmarks/gpu_check.sh [PREPARED_DIR] [--runs 100] [--json rows.json]
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
DIR=${1:-$HERE/../.gpu-check}
PY=${PYTHON:-python3}
if ! "$PY" -c "import edgeq, cffi" 2>/dev/null; then
  SITE=$(mktemp -d)
  "$PY" -m pip install -q --no-index --no-deps --no-compile --target "$SITE" "$DIR"/wheels/*.whl
  export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
fi
exec "$PY" "$HERE/gpu_check.py" "$DIR" "${@:2}"
