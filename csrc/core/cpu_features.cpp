#include "core/cpu_features.h"

#include <atomic>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <string>

#include "core/status.h"

namespace lfm {
namespace {

bool host_avx2() {
#if defined(__x86_64__) || defined(_M_X64)
    static const bool v = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    return v;
#else
    return false;
#endif
}

bool host_f16c() {
#if defined(__x86_64__) || defined(_M_X64)
    static const bool v = __builtin_cpu_supports("f16c");
    return v;
#else
    return false;
#endif
}

bool host_avx512bf16() {
#if defined(__x86_64__) || defined(_M_X64)
    static const bool v = __builtin_cpu_supports("avx512bf16");
    return v;
#else
    return false;
#endif
}

bool host_avx512() {
#if defined(__x86_64__) || defined(_M_X64)
    static const bool v = host_avx2() && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                          __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
                          __builtin_cpu_supports("avx512cd");  // the x86-64-v4 set the merge loops use
    return v;
#else
    return false;
#endif
}

// Parse a level name; returns false with `why` filled when it is unknown or unrunnable.
bool parse_level(const char* name, SimdLevel* out, std::string* why) {
    static const struct { const char* name; SimdLevel level; } kNames[] = {
        {"baseline", SimdLevel::Baseline}, {"avx2", SimdLevel::Avx2}, {"avx512", SimdLevel::Avx512},
        {"neon", SimdLevel::Neon}};
    for (const auto& n : kNames) {
        if (std::strcmp(name, n.name) != 0) continue;
        const SimdLevel host = host_simd_level();
        const bool arm = host == SimdLevel::Neon;
        const bool ok = n.level == SimdLevel::Baseline ||
                        (arm ? n.level == SimdLevel::Neon
                             : n.level != SimdLevel::Neon && static_cast<int>(n.level) <= static_cast<int>(host));
        if (!ok) {
            *why = cat("SIMD level '", name, "' cannot run on this CPU (its best level is '", simd_level_name(host),
                       "')");
            return false;
        }
        *out = n.level;
        return true;
    }
    *why = cat("unknown SIMD level '", name, "' (use baseline, avx2, avx512 or neon)");
    return false;
}

// -2: not read yet; -1: none forced; else a SimdLevel
std::atomic<int> g_forced{-2};
std::string g_env_error;  // written once under g_once, before g_forced is published
std::once_flag g_once;

int forced() {
    int f = g_forced.load(std::memory_order_acquire);
    if (f != -2) return f;
    std::call_once(g_once, [] {
        const char* env = std::getenv("LFM_SIMD");
        int v = -1;
        if (env && *env) {
            SimdLevel lvl;
            std::string why;
            if (parse_level(env, &lvl, &why))
                v = static_cast<int>(lvl);
            else
                g_env_error = cat("LFM_SIMD: ", why);
        }
        int expected = -2;
        g_forced.compare_exchange_strong(expected, v, std::memory_order_acq_rel);
    });
    return g_forced.load(std::memory_order_acquire);
}

std::atomic<bool> g_set_explicitly{false};

}  // namespace

SimdLevel host_simd_level() {
#if defined(__aarch64__)
    return SimdLevel::Neon;
#else
    if (host_avx512()) return SimdLevel::Avx512;
    if (host_avx2()) return SimdLevel::Avx2;
    return SimdLevel::Baseline;
#endif
}

SimdLevel simd_level() {
    const int f = forced();
    return f >= 0 ? static_cast<SimdLevel>(f) : host_simd_level();
}

const char* simd_level_name(SimdLevel level) {
    switch (level) {
        case SimdLevel::Baseline: return "baseline";
        case SimdLevel::Avx2: return "avx2";
        case SimdLevel::Avx512: return "avx512";
        case SimdLevel::Neon: return "neon";
    }
    return "unknown";
}

void set_simd_level(const char* name) {
    forced();  // read LFM_SIMD first, so a later first read cannot undo this call
    int v = -1;
    if (name && *name) {
        SimdLevel lvl;
        std::string why;
        if (!parse_level(name, &lvl, &why)) fail(LFM_STATUS_INVALID_ARGUMENT, why);
        v = static_cast<int>(lvl);
    }
    g_set_explicitly.store(true, std::memory_order_release);
    g_forced.store(v, std::memory_order_release);
}

void check_simd_env() {
    forced();
    if (!g_env_error.empty() && !g_set_explicitly.load(std::memory_order_acquire))
        fail(LFM_STATUS_INVALID_ARGUMENT, g_env_error);
}

bool cpu_has_avx2() {
    const SimdLevel l = simd_level();
    return (l == SimdLevel::Avx2 || l == SimdLevel::Avx512) && host_avx2();
}
bool cpu_has_f16c() { return cpu_has_avx2() && host_f16c(); }
bool cpu_has_avx512f() { return simd_level() == SimdLevel::Avx512 && host_avx512(); }
bool cpu_has_avx512bf16() { return cpu_has_avx512f() && host_avx512bf16(); }
const char* cpu_simd_level() { return simd_level_name(simd_level()); }

}  // namespace lfm
