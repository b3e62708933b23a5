#include "core/dtype.h"

#include "core/cpu_features.h"
#include "core/status.h"
#include "core/tensor.h"

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define LFM_X86 1
#endif

namespace lfm {
namespace {

void load_bf16_portable(const uint16_t* s, float* d, int64_t n) {
    for (int64_t i = 0; i < n; ++i) d[i] = bf16_to_f32(s[i]);
}
void store_bf16_portable(const float* s, uint16_t* d, int64_t n) {
    for (int64_t i = 0; i < n; ++i) d[i] = f32_to_bf16(s[i]);
}
void load_f16_portable(const uint16_t* s, float* d, int64_t n) {
    for (int64_t i = 0; i < n; ++i) d[i] = f16_to_f32(s[i]);
}
void store_f16_portable(const float* s, uint16_t* d, int64_t n) {
    for (int64_t i = 0; i < n; ++i) d[i] = f32_to_f16(s[i]);
}

#if LFM_X86
__attribute__((target("avx2,f16c"))) void load_f16_f16c(const uint16_t* s, float* d, int64_t n) {
    int64_t i = 0;
    for (; i + 8 <= n; i += 8)
        _mm256_storeu_ps(d + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(s + i))));
    for (; i < n; ++i) d[i] = f16_to_f32(s[i]);
}
__attribute__((target("avx2,f16c"))) void store_f16_f16c(const float* s, uint16_t* d, int64_t n) {
    int64_t i = 0;
    for (; i + 8 <= n; i += 8)
        _mm_storeu_si128(reinterpret_cast<__m128i*>(d + i),
                         _mm256_cvtps_ph(_mm256_loadu_ps(s + i), _MM_FROUND_TO_NEAREST_INT));
    for (; i < n; ++i) d[i] = f32_to_f16(s[i]);
}
__attribute__((target("avx2"))) void load_bf16_avx2(const uint16_t* s, float* d, int64_t n) {
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(s + i)));
        _mm256_storeu_ps(d + i, _mm256_castsi256_ps(_mm256_slli_epi32(w, 16)));
    }
    for (; i < n; ++i) d[i] = bf16_to_f32(s[i]);
}
__attribute__((target("avx2"))) void store_bf16_avx2(const float* s, uint16_t* d, int64_t n) {
    int64_t i = 0;
    const __m256i one = _mm256_set1_epi32(1), bias = _mm256_set1_epi32(0x7fff);
    const __m256i absmask = _mm256_set1_epi32(0x7fffffff), inf = _mm256_set1_epi32(0x7f800000);
    const __m256i qnan = _mm256_set1_epi32(0x40);
    for (; i + 8 <= n; i += 8) {
        __m256i u = _mm256_castps_si256(_mm256_loadu_ps(s + i));
        __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), one);
        __m256i r = _mm256_srli_epi32(_mm256_add_epi32(u, _mm256_add_epi32(bias, lsb)), 16);
        __m256i nanv = _mm256_or_si256(_mm256_srli_epi32(u, 16), qnan);
        __m256i isnan = _mm256_cmpgt_epi32(_mm256_and_si256(u, absmask), inf);
        r = _mm256_blendv_epi8(r, nanv, isnan);
        // pack 8 x u32 (values < 65536) to 8 x u16
        __m128i lo = _mm256_castsi256_si128(r), hi = _mm256_extracti128_si256(r, 1);
        _mm_storeu_si128(reinterpret_cast<__m128i*>(d + i), _mm_packus_epi32(lo, hi));
    }
    for (; i < n; ++i) d[i] = f32_to_bf16(s[i]);
}
#endif

}  // namespace

void load_f32(const void* src, lfm_dtype dt, float* dst, int64_t n) {
    switch (dt) {
        case LFM_DTYPE_F32:
            std::memcpy(dst, src, static_cast<size_t>(n) * 4);
            return;
        case LFM_DTYPE_BF16:
#if LFM_X86
            if (cpu_has_avx2()) return load_bf16_avx2(static_cast<const uint16_t*>(src), dst, n);
#endif
            return load_bf16_portable(static_cast<const uint16_t*>(src), dst, n);
        case LFM_DTYPE_F16:
#if LFM_X86
            if (cpu_has_f16c()) return load_f16_f16c(static_cast<const uint16_t*>(src), dst, n);
#endif
            return load_f16_portable(static_cast<const uint16_t*>(src), dst, n);
        default:
            fail(LFM_STATUS_UNSUPPORTED_DTYPE, "cannot convert ", dtype_name(dt), " to float32");
    }
}

void store_f32(const float* src, lfm_dtype dt, void* dst, int64_t n) {
    switch (dt) {
        case LFM_DTYPE_F32:
            std::memcpy(dst, src, static_cast<size_t>(n) * 4);
            return;
        case LFM_DTYPE_BF16:
#if LFM_X86
            if (cpu_has_avx2()) return store_bf16_avx2(src, static_cast<uint16_t*>(dst), n);
#endif
            return store_bf16_portable(src, static_cast<uint16_t*>(dst), n);
        case LFM_DTYPE_F16:
#if LFM_X86
            if (cpu_has_f16c()) return store_f16_f16c(src, static_cast<uint16_t*>(dst), n);
#endif
            return store_f16_portable(src, static_cast<uint16_t*>(dst), n);
        default:
            fail(LFM_STATUS_UNSUPPORTED_DTYPE, "cannot store float32 as ", dtype_name(dt));
    }
}

}  // namespace lfm
