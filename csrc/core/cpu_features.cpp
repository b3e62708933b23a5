#include "core/cpu_features.h"

#include <cctype>
#include <cstdlib>
#include <cstring>
#include <string>

#include "core/status.h"

namespace lfm {
namespace {

enum Level { kPortable = 0, kBaseline = 1, kNeon = 1, kAvx2 = 2, kAvx512 = 3 };

struct SimdState {
    int host = kPortable;       // best level of this CPU
    int effective = kPortable;  // min(host, LFM_SIMD)
    std::string env;            // LFM_SIMD as given
    std::string env_shown;      // the same with anything but [A-Za-z0-9_-] as '?', safe inside JSON
    std::string error;          // non-empty: LFM_SIMD is unusable
};

int host_level() {
#if defined(__x86_64__) || defined(_M_X64)
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"))
        return kAvx512;
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return kAvx2;
    return kBaseline;
#elif defined(__aarch64__)
    return kNeon;  // Advanced SIMD is mandatory on aarch64
#else
    return kPortable;
#endif
}

const char* level_name(int l) {
#if defined(__aarch64__)
    if (l == kNeon) return "neon";
#endif
    switch (l) {
        case kAvx512: return "avx512";
        case kAvx2: return "avx2";
        case kBaseline: return "baseline";
        default: return "portable";
    }
}

SimdState make_state() {
    SimdState s;
    s.host = host_level();
    s.effective = s.host;
    const char* e = std::getenv("LFM_SIMD");
    if (!e || !*e) return s;
    s.env = e;
    for (char c : s.env) s.env_shown += (std::isalnum(static_cast<unsigned char>(c)) || c == '_' || c == '-') ? c : '?';
#if defined(__x86_64__) || defined(_M_X64)
    const bool x86 = true;
#else
    const bool x86 = false;
#endif
    int want = -1;
    if (s.env == "baseline") want = x86 ? kBaseline : -2;
    else if (s.env == "avx2") want = x86 ? kAvx2 : -2;
    else if (s.env == "avx512") want = x86 ? kAvx512 : -2;
    else if (s.env == "neon") want = x86 ? -2 : (s.host == kNeon ? kNeon : -2);
    if (want == -1)
        s.error = cat("LFM_SIMD=\"", s.env, "\" is not a SIMD level (use baseline, avx2, avx512 or neon)");
    else if (want == -2 || want > s.host)
        s.error = cat("LFM_SIMD=", s.env, " cannot run on this CPU (its best level is ", level_name(s.host), ")");
    else
        s.effective = want;
    return s;
}

const SimdState& state() {
    static const SimdState s = make_state();
    return s;
}

}  // namespace

bool cpu_has_avx2() {
#if defined(__x86_64__) || defined(_M_X64)
    return state().effective >= kAvx2;
#else
    return false;
#endif
}
bool cpu_has_f16c() {
#if defined(__x86_64__) || defined(_M_X64)
    static const bool v = __builtin_cpu_supports("f16c");
    return v && cpu_has_avx2();
#else
    return false;
#endif
}
bool cpu_has_avx512f() {
#if defined(__x86_64__) || defined(_M_X64)
    return state().effective >= kAvx512;
#else
    return false;
#endif
}
const char* cpu_simd_level() { return cpu_simd_env_ok() ? level_name(state().effective) : "invalid"; }
const char* cpu_simd_host_level() { return level_name(state().host); }
const char* cpu_simd_env() { return state().env_shown.c_str(); }
bool cpu_simd_env_ok() { return state().error.empty(); }
void check_simd_env() {
    if (!cpu_simd_env_ok()) fail(LFM_STATUS_INVALID_ARGUMENT, state().error);
}

}  // namespace lfm
