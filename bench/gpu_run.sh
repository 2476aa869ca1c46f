#!/usr/bin/env bash
# The one GPU run (bench/gpu_run.py says what it does and what comes back). On the GPU machine,
# from the repository root, with .devkit/ carried (built here by ../shared/device/make-kit.sh):
#     source .devkit/on-device.sh && bash bench/gpu_run.sh $OUT/gpu
# On any CPU, before a GPU run (tiny sizes, same stages and checks):
#     bash bench/gpu_run.sh --smoke /tmp/gpu_smoke
# Installs the kit when .devkit/ is there and --smoke is not given (sourcing on-device.sh first,
# as above, is harmless: it installs once). PYTHON picks the interpreter (default python3).
set -uo pipefail
STARTED_AT=$(date +%s)
cd "$(dirname "$0")/.."
smoke=0
for arg in "$@"; do [ "$arg" = "--smoke" ] && smoke=1; done
if [ "$smoke" = 0 ] && [ -f .devkit/on-device.sh ]; then
  # shellcheck disable=SC1091
  source .devkit/on-device.sh || { echo "[gpu_run] installing the kit failed" >&2; exit 1; }
fi
exec "${PYTHON:-python3}" bench/gpu_run.py --started-at "$STARTED_AT" "$@"
