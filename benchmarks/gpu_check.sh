#!/usr/bin/env bash
# The GPU check (benchmarks/gpu_check.py): bash benchmarks/gpu_check.sh RESULTS_DIR [--dry-run]
#
# The GPU machine has PyTorch and CUDA but no network, so cbart cannot be pip-installed there. The folders are
# exposed as the `cbart` package through a scratch directory of links (as pyproject.toml maps them when
# installing), first on PYTHONPATH: the script runs the same way there, in CI (--dry-run) and in a checkout.
# $PYTHON picks the interpreter (default python3: the GPU machine has no `python`).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
scratch="$(mktemp -d)"
trap 'rm -rf "$scratch"' EXIT
mkdir "$scratch/cbart"
for entry in "$root"/cbart/*; do ln -s "$entry" "$scratch/cbart/"; done
for folder in compression exporter runtime benchmarks serving; do ln -s "$root/$folder" "$scratch/cbart/$folder"; done
export PYTHONPATH="$scratch${PYTHONPATH:+:$PYTHONPATH}"
# Without an installed cbart, the checkout's own cbart/ folder (no benchmarks/ inside) would shadow the links
# when Python prepends the working directory to sys.path; safe-path mode (Python >= 3.11) stops that.
export PYTHONSAFEPATH=1
"${PYTHON:-python3}" -m cbart.benchmarks.gpu_check "$@"
