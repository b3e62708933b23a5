// Run-time CPU feature detection (the default build targets baseline x86-64; hot loops
// pick AVX2/AVX-512 paths with these checks) and the forced level LFM_SIMD.
//
// LFM_SIMD=baseline|avx2|avx512|neon (read once, at the first call) caps the level the
// kernels use, so tests can compare every level a host runs. An unknown value, or a
// level this CPU cannot run, is an error: check_simd_env() throws lfm::Error naming it,
// and every C ABI entry point calls it (lfm::guard), so nothing silently falls back.
#pragma once

namespace lfm {
bool cpu_has_avx2();     // AVX2 + FMA, and the effective level allows it
bool cpu_has_f16c();     // F16C with AVX2 allowed
bool cpu_has_avx512f();  // AVX-512F, and the effective level allows it
// effective level: "avx512", "avx2", "baseline" (x86-64), "neon" (aarch64) or "portable"
const char* cpu_simd_level();
const char* cpu_simd_host_level();  // best level this CPU runs, ignoring LFM_SIMD
const char* cpu_simd_env();         // LFM_SIMD as read ("" when unset; odd characters as '?')
bool cpu_simd_env_ok();             // false when LFM_SIMD is unknown or not runnable here
void check_simd_env();              // throws lfm::Error when !cpu_simd_env_ok()
}  // namespace lfm
