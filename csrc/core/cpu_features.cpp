#include "core/cpu_features.h"

namespace lfm {

#if defined(__x86_64__) || defined(_M_X64)
bool cpu_has_avx2() {
    static const bool v = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    return v;
}
bool cpu_has_f16c() {
    static const bool v = cpu_has_avx2() && __builtin_cpu_supports("f16c");
    return v;
}
bool cpu_has_avx512f() {
    static const bool v = __builtin_cpu_supports("avx512f");
    return v;
}
const char* cpu_simd_level() {
    if (cpu_has_avx512f()) return "avx512";
    if (cpu_has_avx2()) return "avx2";
    return "sse2";
}
#else
bool cpu_has_avx2() { return false; }
bool cpu_has_f16c() { return false; }
bool cpu_has_avx512f() { return false; }
const char* cpu_simd_level() { return "portable"; }
#endif

}  // namespace lfm
