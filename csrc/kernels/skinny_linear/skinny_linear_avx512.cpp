// AVX-512 row kernel of the skinny-M linear (see skinny_linear.h).
//
// One pass: R rows of W x MB rows of x. Per step (16 columns; 32 for the bf16-dot policy)
// it loads R weight vectors (bf16 by a zero-extend + shift, fp16 by vcvtph2ps) and MB x
// vectors, and does R x MB multiply-adds into R x MB register accumulators (R x MB <= 16,
// so with the R + 1 loaded vectors everything stays in the 32 zmm registers). K goes by in
// blocks (k_block) so the M rows of x stay in L1; the K tail is a masked load. Blocking
// breaks W's rows into short segments the hardware prefetcher does not follow, so each pass
// prefetches the next pass's rows (the 56 projections of the served fixture at M = 8:
// 51 -> 38-42 ms, 1 thread). At the end of a block the R x MB accumulators are summed across
// lanes together (reduce16) and added to the tile. M > 16 never reaches here (kMaxM).
#include "kernels/skinny_linear/skinny_linear.h"

#include <algorithm>
#include <utility>

#include "core/cpu_features.h"

#if defined(__x86_64__)
#include <immintrin.h>
#endif

namespace lfm::skinny {

#if defined(__x86_64__)
#define LFM_AVX512 __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl")))

namespace {

// Pass policies: W's element type T, x's element type X, columns per step kStep, and per
// step the W load (full / masked tail), the x load and the multiply-accumulate.
struct FmaF32X {  // x as fp32, one FMA per 16 columns
    using X = float;
    using V = __m512;
    using Mask = __mmask16;
    static constexpr int kStep = 16;
    LFM_AVX512 static __m512 xload(const X* p) { return _mm512_loadu_ps(p); }
    LFM_AVX512 static __m512 xload(const X* p, Mask k) { return _mm512_maskz_loadu_ps(k, p); }
    LFM_AVX512 static __m512 mac(__m512 acc, __m512 w, __m512 x) { return _mm512_fmadd_ps(w, x, acc); }
};
struct F32 : FmaF32X {
    using T = float;
    LFM_AVX512 static __m512 load(const T* p) { return _mm512_loadu_ps(p); }
    LFM_AVX512 static __m512 load(const T* p, __mmask16 k) { return _mm512_maskz_loadu_ps(k, p); }
};
struct BF16 : FmaF32X {
    using T = uint16_t;
    LFM_AVX512 static __m512 widen(__m256i h) {
        return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
    }
    LFM_AVX512 static __m512 load(const T* p) { return widen(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))); }
    LFM_AVX512 static __m512 load(const T* p, __mmask16 k) { return widen(_mm256_maskz_loadu_epi16(k, p)); }
};
struct F16 : FmaF32X {
    using T = uint16_t;
    LFM_AVX512 static __m512 load(const T* p) {
        return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
    }
    LFM_AVX512 static __m512 load(const T* p, __mmask16 k) { return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(k, p)); }
};

// bf16 x and bf16 W with vdpbf16ps (AVX512_BF16): both operands stay bf16; one instruction
// does the 32 multiply-adds of a 32-column step into 16 fp32 lanes (adjacent column pairs),
// half the instructions of the fp32 path and no widening. x's block is zero past K.
#define LFM_AVX512BF16 __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,avx512bf16")))
struct BF16Dot {
    using T = uint16_t;
    using X = uint16_t;
    using V = __m512i;
    using Mask = __mmask32;
    static constexpr int kStep = 32;
    LFM_AVX512 static V load(const T* p) { return _mm512_loadu_si512(p); }
    LFM_AVX512 static V load(const T* p, Mask k) { return _mm512_maskz_loadu_epi16(k, p); }
    LFM_AVX512 static V xload(const X* p) { return _mm512_loadu_si512(p); }
    LFM_AVX512 static V xload(const X* p, Mask k) { return _mm512_maskz_loadu_epi16(k, p); }
    LFM_AVX512BF16 static __m512 mac(__m512 acc, V w, V x) { return _mm512_dpbf16_ps(acc, (__m512bh)w, (__m512bh)x); }
};

// Rows of W per pass for MB rows of x: R x MB accumulators, at most 16, at least 8 where
// possible (independent FMA chains cover the FMA latency).
constexpr int rows_per_pass(int mb) { return mb == 1 ? 8 : mb <= 4 ? 4 : 2; }  // mb > 8: two halves

// Columns of x per block: the M rows' block stays at or under 16 KiB, half of L1, while W
// streams past it (M = 8 and 16 at K = 1024 without blocking ran at half the FMA rate).
inline int64_t k_block(int64_t M) { return std::max<int64_t>(256, 4096 / M / 16 * 16); }

// s[i] = sum of the 16 lanes of v[i], i < 16: three rounds of in-lane unpacks and 128-bit
// shuffles, ~45 instructions for all 16 sums instead of ~8 per vector.
LFM_AVX512 inline __m512 reduce16(const __m512* v) {
    __m512 t[8], u[4];
    for (int i = 0; i < 8; ++i)  // per 128-bit lane: [a0+a2, b0+b2, a1+a3, b1+b3]
        t[i] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]), _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));
    for (int i = 0; i < 4; ++i) {  // per 128-bit lane: [a, b, c, d] partial sums
        const __m512d a = _mm512_castps_pd(t[2 * i]), b = _mm512_castps_pd(t[2 * i + 1]);
        u[i] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(a, b)), _mm512_castpd_ps(_mm512_unpackhi_pd(a, b)));
    }
    // sum the four 128-bit lanes of each u[i]; 128-bit lane i of the result holds u[i]'s sums
    const __m512 x = _mm512_add_ps(_mm512_shuffle_f32x4(u[0], u[1], 0x44), _mm512_shuffle_f32x4(u[0], u[1], 0xEE));
    const __m512 y = _mm512_add_ps(_mm512_shuffle_f32x4(u[2], u[3], 0x44), _mm512_shuffle_f32x4(u[2], u[3], 0xEE));
    return _mm512_add_ps(_mm512_shuffle_f32x4(x, y, 0x88), _mm512_shuffle_f32x4(x, y, 0xDD));
}

// out[r * ldo + m] += dot over columns [k0, k1) of (W row r, x row m), r < R, m < MB.
// Compiled with the AVX512_BF16 target for every policy (BF16Dot's mac needs it); the
// other policies emit no bf16 instruction, so they run on any AVX-512 CPU.
template <class D, int MB, int R>
LFM_AVX512BF16 inline void pass(const typename D::T* w, int64_t K, int64_t k0, int64_t k1,
                                const typename D::X* xs, int64_t ldx, float* out, int64_t ldo) {
    constexpr int S = D::kStep;
    __m512 acc[16];
#pragma GCC unroll 16
    for (int i = 0; i < 16; ++i) acc[i] = _mm512_setzero_ps();
    int64_t k = k0;
    for (; k + S <= k1; k += S) {
        typename D::V wv[R];
#pragma GCC unroll 16
        for (int r = 0; r < R; ++r) {
            wv[r] = D::load(w + r * K + k);
            // the next pass's rows, same columns: one pass ahead (~200 ns) covers the memory
            // latency that the broken-up row streams hide from the hardware prefetcher
            _mm_prefetch(reinterpret_cast<const char*>(w + (R + r) * K + k), _MM_HINT_T0);
        }
#pragma GCC unroll 16
        for (int m = 0; m < MB; ++m) {
            typename D::V xv = D::xload(xs + m * ldx + k);
            // keep x in a register: GCC otherwise folds the load into each of the R FMAs,
            // R loads of the same x where one does (the load ports are the tighter limit)
            if constexpr (R > 1) asm("" : "+v"(xv));
#pragma GCC unroll 16
            for (int r = 0; r < R; ++r) acc[r * MB + m] = D::mac(acc[r * MB + m], wv[r], xv);
        }
    }
    if (k < k1) {
        const auto tail = static_cast<typename D::Mask>((1ull << (k1 - k)) - 1ull);
        typename D::V wv[R];
#pragma GCC unroll 16
        for (int r = 0; r < R; ++r) wv[r] = D::load(w + r * K + k, tail);
#pragma GCC unroll 16
        for (int m = 0; m < MB; ++m) {
            const typename D::V xv = D::xload(xs + m * ldx + k, tail);
#pragma GCC unroll 16
            for (int r = 0; r < R; ++r) acc[r * MB + m] = D::mac(acc[r * MB + m], wv[r], xv);
        }
    }
    const __m512 sums = reduce16(acc);
    if (ldo == MB) {  // the R x MB sums are contiguous in the tile
        constexpr __mmask16 used = static_cast<__mmask16>((1u << (R * MB)) - 1u);
        _mm512_mask_storeu_ps(out, used, _mm512_add_ps(_mm512_maskz_loadu_ps(used, out), sums));
    } else {
        alignas(64) float t[16];
        _mm512_store_ps(t, sums);
        for (int r = 0; r < R; ++r)
            for (int m = 0; m < MB; ++m) out[r * ldo + m] += t[r * MB + m];
    }
}

template <class D, int MB>
LFM_AVX512BF16 void rows_mb(const void* wp, int64_t K, const void* xp, int64_t ldx, int64_t n0, int64_t n1,
                            float* out) {
    const typename D::T* w = static_cast<const typename D::T*>(wp);
    const typename D::X* xs = static_cast<const typename D::X*>(xp);
    // the same bytes of x per block: twice the columns when x is bf16 (a multiple of kStep)
    const int64_t kb = k_block(MB) * static_cast<int64_t>(sizeof(float) / sizeof(typename D::X));
    for (int64_t k0 = 0; k0 < K; k0 += kb) {
        const int64_t k1 = std::min(K, k0 + kb);
        int64_t n = n0;
        if constexpr (MB <= 8) {
            constexpr int R = rows_per_pass(MB);
            for (; n + R <= n1; n += R) pass<D, MB, R>(w + n * K, K, k0, k1, xs, ldx, out + (n - n0) * MB, MB);
        } else {
            // 9..16 rows of x: two passes of 8 and MB - 8 rows over the same 2 rows of W (the
            // second finds them in L1): 10 loads per 16 multiply-adds instead of 17 with R = 1
            constexpr int MB2 = MB - 8, R = 2;
            static_assert(R * MB2 <= 16);
            for (; n + R <= n1; n += R) {
                float* o = out + (n - n0) * MB;
                pass<D, 8, R>(w + n * K, K, k0, k1, xs, ldx, o, MB);
                pass<D, MB2, R>(w + n * K, K, k0, k1, xs + 8 * ldx, ldx, o + 8, MB);
            }
        }
        for (; n < n1; ++n) pass<D, MB, 1>(w + n * K, K, k0, k1, xs, ldx, out + (n - n0) * MB, MB);
    }
}

using Fn = void (*)(const void*, int64_t, const void*, int64_t, int64_t, int64_t, float*);

template <class D, int... I>
const Fn* table(std::integer_sequence<int, I...>) {
    static const Fn t[] = {rows_mb<D, I + 1>...};
    return t;
}

template <class D>
const Fn* table_for() {
    return table<D>(std::make_integer_sequence<int, static_cast<int>(kMaxM)>{});
}

}  // namespace

bool avx512_ok(lfm_dtype w_dt) {
    return cpu_has_avx512f() && (w_dt == LFM_DTYPE_F32 || w_dt == LFM_DTYPE_BF16 || w_dt == LFM_DTYPE_F16);
}

void rows_avx512(const float* xs, int64_t ldx, int64_t M, int64_t K, const void* w, lfm_dtype w_dt, int64_t n0, int64_t n1,
                 float* out, int64_t ldo) {
    const Fn* t = w_dt == LFM_DTYPE_F32 ? table_for<F32>() : w_dt == LFM_DTYPE_BF16 ? table_for<BF16>()
                                                                                     : table_for<F16>();
    t[M - 1](w, K, xs, ldx, n0, n1, out);  // ldo == M (see skinny_linear.h)
}

bool avx512_bf16_dot_ok(lfm_dtype x_dt, lfm_dtype w_dt) {
    return cpu_has_avx512bf16() && x_dt == LFM_DTYPE_BF16 && w_dt == LFM_DTYPE_BF16;
}

void rows_avx512_bf16_dot(const uint16_t* xs16, int64_t ldx16, int64_t M, int64_t K, const void* w, int64_t n0,
                          int64_t n1, float* out) {
    table_for<BF16Dot>()[M - 1](w, K, xs16, ldx16, n0, n1, out);
}

#else  // not x86-64: never selected (avx512_ok is false)

bool avx512_ok(lfm_dtype) { return false; }
bool avx512_bf16_dot_ok(lfm_dtype, lfm_dtype) { return false; }
void rows_avx512_bf16_dot(const uint16_t*, int64_t, int64_t, int64_t, const void*, int64_t, int64_t, float*) {}
void rows_avx512(const float* xs, int64_t ldx, int64_t M, int64_t K, const void* w, lfm_dtype w_dt, int64_t n0, int64_t n1,
                 float* out, int64_t ldo) {
    rows_baseline(xs, ldx, M, K, w, w_dt, n0, n1, out, ldo);
}

#endif

}  // namespace lfm::skinny
