#!/usr/bin/env bash
# The README's test command: set-up (idempotent) + ruff + the CPU test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash dev/setup.sh
.venv/bin/python -m ruff check ovsam_ray jobs tests bench
.venv/bin/python -m pytest -q -m "not gpu" --durations=25 "$@"
