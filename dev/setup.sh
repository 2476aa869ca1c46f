#!/usr/bin/env bash
# Creates .venv (once) and installs the project with its test extras. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
if ! .venv/bin/python -c "import ovsam_ray, torch, torchvision, ray, open_clip, segment_anything, moto, aiohttp_cors, transformers, pytest_timeout, mypy, polars, duckdb, datasets" 2>/dev/null; then
    .venv/bin/python -m pip install -q --upgrade pip
    # torch/torchvision first, pinned to the builds that work together on these machines.
    .venv/bin/python -m pip install -q torch==2.14.1 torchvision==0.29.1
    .venv/bin/python -m pip install -q -e '.[test]'
fi
