#!/usr/bin/env bash
# Sanitizer job: build liblfm (CPU only) and the C ABI programs with AddressSanitizer +
# UndefinedBehaviorSanitizer, run the C ABI tests, the C examples and a bounded, seeded
# fuzz of every exported lfm_ entry point (tests/fuzz/abi_fuzz.c). Any sanitizer report
# stops the program (-fno-sanitize-recover=all, halt_on_error) and fails this script.
#
# usage: tools/sanitize_check.sh [fuzz cases (default 3000)] [seed (default 1)]
# env:   LFM_SANITIZE_BUILD  build folder (default build/sanitize)
set -euo pipefail
cd "$(dirname "$0")/.."
cases=${1:-3000}
seed=${2:-1}
build=${LFM_SANITIZE_BUILD:-build/sanitize}
san="-fsanitize=address,undefined -fno-sanitize-recover=all -fno-omit-frame-pointer -g"
gen=()
command -v ninja >/dev/null && gen=(-G Ninja)
t0=$(date +%s)
cmake -S . -B "$build" "${gen[@]}" -DLFM_ENABLE_CUDA=OFF -DLFM_BUILD_PYTHON=OFF -DCMAKE_BUILD_TYPE=RelWithDebInfo \
  -DCMAKE_C_FLAGS="$san" -DCMAKE_CXX_FLAGS="$san" -DCMAKE_SHARED_LINKER_FLAGS="$san" >/dev/null
cmake --build "$build" --target lfm >/dev/null
echo "sanitize: liblfm built in $(( $(date +%s) - t0 )) s"
lib=$(ls "$build"/liblfm.so)
export ASAN_OPTIONS=halt_on_error=1:abort_on_error=0:detect_leaks=1:exitcode=86
export UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1:exitcode=87
export LFM_NUM_THREADS=2
cc=${CC:-cc}
fail=0
for src in tests/capi/*.c tests/c/*.c examples/c/*.c tests/fuzz/abi_fuzz.c; do
  exe="$build/$(basename "${src%.c}")"
  $cc -std=c99 -Wall -Werror $san "$src" -Iinclude "$lib" -Wl,-rpath,"$(dirname "$lib")" -lm -o "$exe"
  args=()
  [ "$src" = tests/fuzz/abi_fuzz.c ] && args=("$cases" "$seed")
  if out=$("$exe" "${args[@]}" 2>&1); then
    echo "sanitize: $src: $(printf '%s\n' "$out" | tail -n 1)"
  else
    rc=$?
    echo "sanitize: $src FAILED (exit $rc):"
    printf '%s\n' "$out" | tail -n 40
    fail=1
  fi
done
echo "sanitize: done in $(( $(date +%s) - t0 )) s"
exit $fail
