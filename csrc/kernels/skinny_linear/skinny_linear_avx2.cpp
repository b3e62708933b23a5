// AVX2 + FMA row kernel of the skinny-M linear (see skinny_linear.h).
//
// Same pass structure as the AVX-512 kernel with 8 lanes and 16 ymm registers: R x MB <= 12
// accumulators, M taken in chunks of at most 8 rows of x. With M > 8 the rows of W go by in
// blocks of 12 (every R divides it) and each chunk reads the block, so the second chunk
// finds it in L1/L2 instead of memory. fp16 weights need F16C. The K % 8 tail is summed
// in scalar fp32 after the lane reduction.
#include "kernels/skinny_linear/skinny_linear.h"

#include <algorithm>
#include <utility>

#include "core/cpu_features.h"
#include "core/dtype.h"

#if defined(__x86_64__)
#include <immintrin.h>
#endif

namespace lfm::skinny {

#if defined(__x86_64__)
#define LFM_AVX2 __attribute__((target("avx2,fma,f16c")))

namespace {

constexpr int kChunk = 8;  // rows of x per pass

struct F32 {
    using T = float;
    LFM_AVX2 static __m256 load(const T* p) { return _mm256_loadu_ps(p); }
    static float one(T v) { return v; }
};
struct BF16 {
    using T = uint16_t;
    LFM_AVX2 static __m256 load(const T* p) {
        const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
        return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
    }
    static float one(T v) { return bf16_to_f32(v); }
};
struct F16 {
    using T = uint16_t;
    LFM_AVX2 static __m256 load(const T* p) { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }
    static float one(T v) { return f16_to_f32(v); }
};

LFM_AVX2 inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

constexpr int rows_per_pass(int mb) { return mb <= 2 ? 4 : mb <= 4 ? 3 : mb <= 6 ? 2 : 1; }

template <class D, int MB, int R>
LFM_AVX2 inline void pass(const typename D::T* w, int64_t K, const float* xs, int64_t ldx, float* out,
                           int64_t ldo) {
    __m256 acc[R][MB];
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r)
#pragma GCC unroll 16
        for (int m = 0; m < MB; ++m) acc[r][m] = _mm256_setzero_ps();
    int64_t k = 0;
    for (; k + 8 <= K; k += 8) {
        __m256 wv[R];
#pragma GCC unroll 16
        for (int r = 0; r < R; ++r) wv[r] = D::load(w + r * K + k);
#pragma GCC unroll 16
        for (int m = 0; m < MB; ++m) {
            const __m256 xv = _mm256_loadu_ps(xs + m * ldx + k);
#pragma GCC unroll 16
            for (int r = 0; r < R; ++r) acc[r][m] = _mm256_fmadd_ps(wv[r], xv, acc[r][m]);
        }
    }
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r)
#pragma GCC unroll 16
        for (int m = 0; m < MB; ++m) {
            float s = hsum(acc[r][m]);
            for (int64_t j = k; j < K; ++j) s += D::one(w[r * K + j]) * xs[m * ldx + j];
            out[r * ldo + m] += s;
        }
}

template <class D, int MB>
LFM_AVX2 void rows_mb(const void* wp, int64_t K, const float* xs, int64_t ldx, int64_t n0, int64_t n1,
                      float* out, int64_t ldo) {
    constexpr int R = rows_per_pass(MB);
    const typename D::T* w = static_cast<const typename D::T*>(wp);
    int64_t n = n0;
    for (; n + R <= n1; n += R) pass<D, MB, R>(w + n * K, K, xs, ldx, out + (n - n0) * ldo, ldo);
    for (; n < n1; ++n) pass<D, MB, 1>(w + n * K, K, xs, ldx, out + (n - n0) * ldo, ldo);
}

using Fn = void (*)(const void*, int64_t, const float*, int64_t, int64_t, int64_t, float*, int64_t);

template <class D, int... I>
const Fn* table(std::integer_sequence<int, I...>) {
    static const Fn t[] = {rows_mb<D, I + 1>...};
    return t;
}

template <class D>
const Fn* table_for() {
    return table<D>(std::make_integer_sequence<int, kChunk>{});
}

}  // namespace

bool avx2_ok(lfm_dtype w_dt) {
    if (!cpu_has_avx2()) return false;
    return w_dt == LFM_DTYPE_F32 || w_dt == LFM_DTYPE_BF16 || (w_dt == LFM_DTYPE_F16 && cpu_has_f16c());
}

void rows_avx2(const float* xs, int64_t ldx, int64_t M, int64_t K, const void* w, lfm_dtype w_dt, int64_t n0, int64_t n1,
               float* out, int64_t ldo) {
    const Fn* t = w_dt == LFM_DTYPE_F32 ? table_for<F32>() : w_dt == LFM_DTYPE_BF16 ? table_for<BF16>()
                                                                                     : table_for<F16>();
    if (M <= kChunk) {
        t[M - 1](w, K, xs, ldx, n0, n1, out, ldo);
        return;
    }
    constexpr int64_t kBlock = 12;  // rows of W per block: a multiple of every rows_per_pass
    for (int64_t b0 = n0; b0 < n1; b0 += kBlock) {
        const int64_t b1 = std::min(n1, b0 + kBlock);
        for (int64_t m0 = 0; m0 < M; m0 += kChunk) {
            const int64_t mb = std::min<int64_t>(kChunk, M - m0);
            t[mb - 1](w, K, xs + m0 * ldx, ldx, b0, b1, out + (b0 - n0) * ldo + m0, ldo);
        }
    }
}

#else  // not x86-64: never selected (avx2_ok is false)

bool avx2_ok(lfm_dtype) { return false; }
void rows_avx2(const float* xs, int64_t ldx, int64_t M, int64_t K, const void* w, lfm_dtype w_dt, int64_t n0, int64_t n1,
               float* out, int64_t ldo) {
    rows_baseline(xs, ldx, M, K, w, w_dt, n0, n1, out, ldo);
}

#endif

}  // namespace lfm::skinny
