#!/usr/bin/env bash
# The README's demo command: set-up (idempotent) + `ovsam-ray demo` on a local Ray.
set -euo pipefail
cd "$(dirname "$0")/.."
bash dev/setup.sh
.venv/bin/ovsam-ray demo "$@"
