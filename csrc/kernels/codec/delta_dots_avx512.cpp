// AVX-512 row-block dots of delta_apply; see delta_dots_avx512.h.
#include "kernels/codec/delta_dots_avx512.h"

#include "core/cpu_features.h"

#if defined(__x86_64__)
#include <immintrin.h>
#endif

namespace lfm::codec {

bool delta_dots_avx512_ok(bool sign1, int64_t in, int64_t group, bool deint) {
#if defined(__x86_64__)
    if (!cpu_has_avx512f()) return false;
    if (sign1) return in % 32 == 0;
    return deint && in % 32 == 0 && group % 32 == 0;
#else
    (void)sign1, (void)in, (void)group, (void)deint;
    return false;
#endif
}

#if defined(__x86_64__)
#define LFM_AVX512 __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl")))

LFM_AVX512 void sign1_block_avx512(const uint32_t* words, int64_t wpr, int64_t nr, const float* row_scale,
                                   const float* xs, const float* xsum, int64_t nt, int64_t in, float* acc) {
    const int64_t nw = in / 32;
    for (int64_t j = 0; j < nr; ++j) {
        const uint32_t* w = words + j * wpr;
        for (int64_t i = 0; i < nt; ++i) {
            const float* x = xs + i * in;
            __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps(), a2 = _mm512_setzero_ps(),
                   a3 = _mm512_setzero_ps();
            int64_t k = 0;
            for (; k + 2 <= nw; k += 2) {
                const uint32_t w0 = w[k], w1 = w[k + 1];
                const float* xk = x + 32 * k;
                a0 = _mm512_mask_add_ps(a0, static_cast<__mmask16>(w0), a0, _mm512_loadu_ps(xk));
                a1 = _mm512_mask_add_ps(a1, static_cast<__mmask16>(w0 >> 16), a1, _mm512_loadu_ps(xk + 16));
                a2 = _mm512_mask_add_ps(a2, static_cast<__mmask16>(w1), a2, _mm512_loadu_ps(xk + 32));
                a3 = _mm512_mask_add_ps(a3, static_cast<__mmask16>(w1 >> 16), a3, _mm512_loadu_ps(xk + 48));
            }
            if (k < nw) {
                const uint32_t w0 = w[k];
                const float* xk = x + 32 * k;
                a0 = _mm512_mask_add_ps(a0, static_cast<__mmask16>(w0), a0, _mm512_loadu_ps(xk));
                a1 = _mm512_mask_add_ps(a1, static_cast<__mmask16>(w0 >> 16), a1, _mm512_loadu_ps(xk + 16));
            }
            const float neg = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)));
            acc[i * nr + j] = row_scale[j] * (xsum[i] - 2.0f * neg);
        }
    }
}

LFM_AVX512 void int4_block_avx512(const uint8_t* packed, int64_t bpr, int64_t nr, const float* scales,
                                  int64_t group, const float* xs, int64_t nt, int64_t in, float* acc) {
    const int64_t half = in / 2, gb = group / 2, ng = (in + group - 1) / group;
    for (int64_t j = 0; j < nr; ++j) {
        const uint8_t* p = packed + j * bpr;
        const float* sc = scales + j * ng;
        for (int64_t i = 0; i < nt; ++i) {
            const float* xe = xs + i * in;
            const float* xo = xe + half;
            __m512 total = _mm512_setzero_ps();
            for (int64_t b0 = 0, gi = 0; b0 < half; b0 += gb, ++gi) {
                const int64_t b1 = b0 + gb < half ? b0 + gb : half;
                __m512 s0 = _mm512_setzero_ps(), s1 = _mm512_setzero_ps();
                for (int64_t b = b0; b < b1; b += 16) {
                    const __m512i v = _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + b)));
                    const __m512 lo = _mm512_cvtepi32_ps(_mm512_srai_epi32(_mm512_slli_epi32(v, 28), 28));
                    const __m512 hi = _mm512_cvtepi32_ps(_mm512_srai_epi32(v, 4));
                    s0 = _mm512_fmadd_ps(lo, _mm512_loadu_ps(xe + b), s0);
                    s1 = _mm512_fmadd_ps(hi, _mm512_loadu_ps(xo + b), s1);
                }
                total = _mm512_fmadd_ps(_mm512_add_ps(s0, s1), _mm512_set1_ps(sc[gi]), total);
            }
            acc[i * nr + j] = _mm512_reduce_add_ps(total);
        }
    }
}
#else
void sign1_block_avx512(const uint32_t*, int64_t, int64_t, const float*, const float*, const float*, int64_t, int64_t,
                        float*) {}
void int4_block_avx512(const uint8_t*, int64_t, int64_t, const float*, int64_t, const float*, int64_t, int64_t,
                       float*) {}
#endif

}  // namespace lfm::codec
