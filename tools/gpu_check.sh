#!/usr/bin/env bash
# GPU validation in one go (docs/gpu_check.md): CUDA build for this GPU, the cuda/Triton tests
# on the device, compute-sanitizer, the GPU benchmarks, and gpu_check.json + gpu_check.md.
#
# usage: tools/gpu_check.sh [--out DIR] [--dry-run] [--steps build,tests,sanitize,bench]
#                           [--budget SECONDS] [--step-budget STEP=SECONDS] [--test-workers N]
# env:   PYTHON  the interpreter to build, test and benchmark with (default: python3)
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
exec "${PYTHON:-python3}" "$root/tools/gpu_check" "$@"
