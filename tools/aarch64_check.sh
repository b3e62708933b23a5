#!/usr/bin/env bash
# aarch64 job (correctness only, no speed claim): cross-build liblfm (CPU only) with
# Debian's gcc-aarch64-linux-gnu, then run the C ABI tests (tests/capi/*.c, tests/c/*.c)
# and the C examples under qemu-user, at both aarch64 SIMD levels (LFM_SIMD=baseline, the
# scalar build of the merge loops, and neon, the NEON-vectorised one).
# tests/capi/merge_digest_test.c merges a fixed seeded case with every method at every
# level and compares digests recorded on x86-64: ARM must give the same bits.
#
# The packages (gcc-aarch64-linux-gnu g++-aarch64-linux-gnu qemu-user) are installed with
# apt-get when missing and this runs as root (LFM_AARCH64_INSTALL=0 forbids it); when they
# cannot be had, the job prints "aarch64 check SKIPPED: <why>" and exits 0.
#
# usage: tools/aarch64_check.sh          env: LFM_AARCH64_BUILD (default build/aarch64)
set -euo pipefail
cd "$(dirname "$0")/.."
build=${LFM_AARCH64_BUILD:-build/aarch64}
cc=aarch64-linux-gnu-gcc
cxx=aarch64-linux-gnu-g++
qemu=qemu-aarch64
sysroot=/usr/aarch64-linux-gnu

have_tools() { command -v "$cc" >/dev/null && command -v "$cxx" >/dev/null && command -v "$qemu" >/dev/null; }

if ! have_tools; then
  if [ "${LFM_AARCH64_INSTALL:-1}" != 0 ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "aarch64: installing gcc-aarch64-linux-gnu g++-aarch64-linux-gnu qemu-user (apt-get)"
    export DEBIAN_FRONTEND=noninteractive
    { apt-get update -q && apt-get install -y -q gcc-aarch64-linux-gnu g++-aarch64-linux-gnu qemu-user; } \
      >/tmp/lfm-aarch64-apt.log 2>&1 || true
  fi
  if ! have_tools; then
    echo "aarch64 check SKIPPED: $cc, $cxx or $qemu is missing and could not be installed" \
         "(Debian packages gcc-aarch64-linux-gnu g++-aarch64-linux-gnu qemu-user; see /tmp/lfm-aarch64-apt.log)"
    exit 0
  fi
fi

t0=$(date +%s)
gen=()
command -v ninja >/dev/null && gen=(-G Ninja)
cmake -S . -B "$build" "${gen[@]}" -DCMAKE_SYSTEM_NAME=Linux -DCMAKE_SYSTEM_PROCESSOR=aarch64 \
  -DCMAKE_C_COMPILER="$cc" -DCMAKE_CXX_COMPILER="$cxx" -DLFM_ENABLE_CUDA=OFF -DLFM_BUILD_PYTHON=OFF \
  -DCMAKE_BUILD_TYPE=Release >/dev/null
cmake --build "$build" --target lfm --parallel "${LFM_BUILD_JOBS:-2}" >/dev/null
lib="$build/liblfm.so"
if command -v file >/dev/null && ! file -L "$lib" | grep -q aarch64; then
  echo "aarch64: $lib is not an aarch64 library"; exit 1
fi
echo "aarch64: liblfm cross-built in $(( $(date +%s) - t0 )) s"

export QEMU_LD_PREFIX=$sysroot LFM_NUM_THREADS=2
fail=0
for src in tests/capi/*.c tests/c/*.c examples/c/*.c; do
  exe="$build/$(basename "${src%.c}")"
  "$cc" -std=c99 -Wall -Werror -O2 "$src" -Iinclude "$lib" -Wl,-rpath,"$(cd "$(dirname "$lib")" && pwd)" -lm -o "$exe"
  for level in baseline neon; do
    if out=$(LFM_SIMD=$level "$qemu" "$exe" 2>&1); then
      echo "aarch64 [$level]: $src: $(printf '%s\n' "$out" | tail -n 1)"
    else
      rc=$?
      echo "aarch64 [$level]: $src FAILED (exit $rc):"
      printf '%s\n' "$out" | tail -n 40
      fail=1
    fi
  done
done
echo "aarch64: done in $(( $(date +%s) - t0 )) s"
exit $fail
