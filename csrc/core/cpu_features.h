// Run-time CPU feature detection (the default build targets baseline x86-64;
// hot loops pick AVX2/AVX-512 paths with these checks).
#pragma once

namespace lfm {
bool cpu_has_avx2();
bool cpu_has_f16c();
bool cpu_has_avx512f();
const char* cpu_simd_level();  // "avx512", "avx2", "sse2" or "portable"
}  // namespace lfm
