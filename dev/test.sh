#!/usr/bin/env bash
# The README's test command: set-up (idempotent) + the checks (ruff, ruff format, mypy) + the CPU test suite.
#   bash dev/test.sh           everything but the GPU tests, the 25 slowest reported (what CI runs)
#   bash dev/test.sh --fast    the checks + the tests that start no Ray, no cluster, no subprocess and
#                              are not marked slow (a few minutes on 2 cores; README, "Tests")
# Other arguments go to pytest, e.g. `bash dev/test.sh --fast -k export` or `bash dev/test.sh -x`.
set -euo pipefail
cd "$(dirname "$0")/.."
markers="not gpu"
if [ "${1:-}" = "--fast" ]; then
    shift
    markers="not gpu and not ray and not cluster and not subprocess and not slow"
fi
bash dev/setup.sh
# The checks (also the pre-commit hooks, .pre-commit-config.yaml): lint, formatting, types.
.venv/bin/python -m ruff check ovsam_ray jobs tests bench
.venv/bin/python -m ruff format --check ovsam_ray jobs tests bench
.venv/bin/python -m mypy
.venv/bin/python -m pytest -q -m "$markers" --durations=25 "$@"
