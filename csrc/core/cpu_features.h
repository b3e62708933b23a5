// Run-time CPU feature detection and the active SIMD level.
//
// The default build targets baseline x86-64 (or plain aarch64); hot loops pick their
// AVX2/F16C paths at run time. The active level is the host's best unless the
// environment variable LFM_SIMD (baseline | avx2 | avx512 | neon) or lfm_set_simd()
// forces a lower one, so tests can compare every level a host supports bit for bit.
// A level the host cannot run, or an unknown name, is an error (never a silent fallback).
#pragma once

namespace lfm {

enum class SimdLevel { Baseline = 0, Avx2 = 1, Avx512 = 2, Neon = 3 };

SimdLevel host_simd_level();          // the best level this CPU runs
SimdLevel simd_level();               // the active level (forced or the host's)
const char* simd_level_name(SimdLevel level);
// Force a level by name; nullptr or "" returns to LFM_SIMD / the host's best.
// Throws lfm::Error (invalid argument) naming the problem.
void set_simd_level(const char* name);
// Throws lfm::Error when LFM_SIMD holds an unknown or unrunnable level (and no
// set_simd_level() call has overridden it); every C ABI entry point checks this.
void check_simd_env();

// Feature checks of the active level (false when a lower level is forced).
bool cpu_has_avx2();     // AVX2 + FMA
bool cpu_has_f16c();     // AVX2 level and F16C
bool cpu_has_avx512f();  // AVX-512 level
bool cpu_has_avx512bf16();  // AVX-512 level and AVX512_BF16 (vdpbf16ps)
const char* cpu_simd_level();  // simd_level_name(simd_level())

}  // namespace lfm
