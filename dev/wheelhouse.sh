#!/usr/bin/env bash
# An offline wheelhouse for the GPU run (bench/gpu_run.sh) on a machine without internet.
#
# On a machine with internet, download the versions pinned in bench/gpu_kit.txt into a folder:
#     bash dev/wheelhouse.sh download wheels/
#     bash dev/wheelhouse.sh download wheels/ --no-deps     # the GPU machine already has PyTorch & co.
# For a GPU machine with another Python or platform, pass pip's own targeting options after `--`:
#     bash dev/wheelhouse.sh download wheels/ -- --python-version 3.12 \
#         --platform manylinux2014_x86_64 --only-binary=:all:
# Copy the folder to the GPU machine (with this repository), then:
#     bash dev/wheelhouse.sh install wheels/
# which runs `pip install --no-index --find-links wheels/ -r bench/gpu_kit.txt`: nothing is fetched
# online, and a package that is neither installed nor in the folder is named by pip.
# --dry-run prints the pip command instead of running it. PYTHON picks the interpreter (default python3).
set -euo pipefail
PY=${PYTHON:-python3}
REPO=$(cd "$(dirname "$0")/.." && pwd)
PINS=$REPO/bench/gpu_kit.txt

usage() {
    echo "usage: dev/wheelhouse.sh download DIR [--no-deps] [--dry-run] [-- PIP_ARGS...]" >&2
    echo "       dev/wheelhouse.sh install DIR [--no-deps] [--dry-run] [-- PIP_ARGS...]" >&2
    exit 2
}

[ $# -ge 2 ] || usage
action=$1
dir=$2
shift 2
case "$action" in download | install) ;; *) usage ;; esac
case "$dir" in -* | "") usage ;; /*) ;; *) dir=$PWD/$dir ;; esac  # relative to the caller

dry_run=0
opts=()
while [ $# -gt 0 ]; do
    case "$1" in
        --dry-run) dry_run=1 ;;
        --no-deps) opts+=(--no-deps) ;;
        --) shift; opts+=("$@"); break ;;
        *) echo "dev/wheelhouse.sh: unknown option $1 (pip's own options go after --)" >&2; usage ;;
    esac
    shift
done

if [ "$action" = download ]; then
    cmd=("$PY" -m pip download -r "$PINS" -d "$dir" "${opts[@]+"${opts[@]}"}")
else
    if [ "$dry_run" = 0 ] && [ ! -d "$dir" ]; then
        echo "dev/wheelhouse.sh: no wheelhouse folder $dir (make one with: dev/wheelhouse.sh download $dir)" >&2
        exit 2
    fi
    cmd=("$PY" -m pip install --no-index --find-links "$dir" -r "$PINS" "${opts[@]+"${opts[@]}"}")
fi

if [ "$dry_run" = 1 ]; then
    printf '%q ' "${cmd[@]}"
    echo
else
    [ "$action" = download ] && mkdir -p "$dir"
    exec "${cmd[@]}"
fi
