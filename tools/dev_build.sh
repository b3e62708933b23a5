#!/usr/bin/env bash
# Developer build: compile liblfm + lfm_engine._C into build/dev and place them in
# lfm_engine/ so `python -c "import lfm_engine"` works from the source tree.
# Usage: tools/dev_build.sh [extra cmake -D options], e.g. -DLFM_ENABLE_CUDA=OFF
set -euo pipefail
cd "$(dirname "$0")/.."
pybind_dir=$(python3 -c "import pybind11; print(pybind11.get_cmake_dir())")
cmake -S . -B build/dev -G Ninja -DLFM_BUILD_PYTHON=ON -Dpybind11_DIR="$pybind_dir" \
  -DPython_EXECUTABLE="$(command -v python3)" "$@" >/dev/null
cmake --build build/dev
cp -f build/dev/liblfm.so build/dev/_C*.so lfm_engine/
echo "built: $(ls lfm_engine/*.so | tr '\n' ' ')"
