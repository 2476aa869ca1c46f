#!/usr/bin/env bash
# The GPU run: every GPU figure and check the README states, in one command (bench/gpu_run.py says
# what each stage does and what it writes). On a machine with an NVIDIA GPU, from anywhere:
#     bash bench/gpu_run.sh RESULTS_DIR
# On any CPU, before a GPU run (tiny sizes, the same stages and checks, the GPU's code branches):
#     bash bench/gpu_run.sh --smoke /tmp/gpu_smoke
# The Python environment is yours to prepare: the project's dependencies installed (pip install -e .,
# or offline from a wheelhouse: dev/wheelhouse.sh), versions as pinned in bench/gpu_kit.txt (the env
# stage reports any other). PYTHON picks the interpreter (default python3). If the environment
# lives elsewhere, source its activation script first or set PYTHON and PYTHONPATH.
set -uo pipefail
STARTED_AT=$(date +%s)
cd "$(dirname "$0")/.."
exec "${PYTHON:-python3}" -m bench.gpu_run --started-at "$STARTED_AT" "$@"
