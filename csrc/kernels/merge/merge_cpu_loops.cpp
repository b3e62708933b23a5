// The CPU merge kernel's inner loops, compiled once per SIMD level (baseline x86-64,
// x86-64-v3, x86-64-v4; scalar and NEON on aarch64) from one source
// (merge_cpu_loops_impl.inc) and reached through LoopTable (merge_cpu_loops.h).
// The copies live in one translation unit, each under a target pragma, rather than in
// files built with different -march flags: inline functions from headers then exist once,
// compiled for the baseline, so no AVX2/AVX-512 code can leak into the baseline path.
#include "kernels/merge/merge_cpu_loops.h"

#include <algorithm>
#include <cmath>
#include <cstring>

#include "core/cpu_features.h"
#include "core/dtype.h"

#if defined(__x86_64__)
#include <immintrin.h>
#endif

namespace lfm::merge {

// baseline: plain x86-64 (SSE2), or on aarch64 the same source kept scalar (no
// auto-vectorisation), so an ARM host has two levels to compare bit for bit.
#if defined(__aarch64__) && defined(__GNUC__)
#pragma GCC push_options
#pragma GCC optimize("no-tree-vectorize", "no-tree-slp-vectorize")
#endif
namespace loops_baseline {
#include "kernels/merge/merge_cpu_loops_impl.inc"
}  // namespace loops_baseline
#if defined(__aarch64__) && defined(__GNUC__)
#pragma GCC pop_options
// neon: the default aarch64 build, where Advanced SIMD is part of the base ISA and GCC
// vectorises these loops with it.
namespace loops_neon {
#include "kernels/merge/merge_cpu_loops_impl.inc"
}  // namespace loops_neon
#define LFM_HAVE_LOOPS_NEON 1
#endif

#if defined(__x86_64__) && defined(__GNUC__)
#pragma GCC push_options
#pragma GCC target("arch=x86-64-v3")
namespace loops_avx2 {
#include "kernels/merge/merge_cpu_loops_impl.inc"
}  // namespace loops_avx2
#pragma GCC pop_options
#define LFM_HAVE_LOOPS_AVX2 1
// x86-64-v4: AVX-512 F/BW/CD/DQ/VL, 512-bit vectors preferred (GCC's generic tuning
// would keep 256). No AVX512-BF16 instructions: VCVTNEPS2BF16 flushes denormal inputs
// to zero, which the spec's rounding (core/dtype.h) does not, so bf16 is converted with
// the same integer arithmetic at every level.
#pragma GCC push_options
#pragma GCC target("arch=x86-64-v4", "prefer-vector-width=512")
#define LFM_LOOPS_AVX512 1  // the few loops with AVX-512 intrinsics (GCC does not vectorise them well)
namespace loops_avx512 {
#include "kernels/merge/merge_cpu_loops_impl.inc"
}  // namespace loops_avx512
#undef LFM_LOOPS_AVX512
#pragma GCC pop_options
#define LFM_HAVE_LOOPS_AVX512 1
#endif

namespace {

#if defined(__x86_64__)
// Philox over 8 blocks per step. Each 64-bit lane carries one block's counter word in its
// low half, so vpmuludq yields the whole 32x32->64 product in place (lo = low half,
// hi = product >> 32) without the even/odd split; the high halves carry junk that
// vpmuludq ignores and the final pack drops. Two independent groups of 4 blocks give the
// core two dependency chains. (The even/odd-lane form with blends it replaces ran 8 %
// slower, 18 against 16 operations per 8 blocks and round.)
__attribute__((target("avx2"))) void philox_blocks_avx2(uint64_t seed, uint32_t stream, uint64_t q0,
                                                        int64_t nblocks, uint32_t* __restrict out) {
    const __m256i M0 = _mm256_set1_epi64x(0xD2511F53u), M1 = _mm256_set1_epi64x(0xCD9E8D57u);
    const __m256i lane4 = _mm256_setr_epi64x(0, 1, 2, 3);
    int64_t b = 0;
    for (; b + 8 <= nblocks; b += 8) {
        // counters q .. q + 7 as 64-bit integers: the word carry is the 64-bit add's
        const __m256i qa = _mm256_add_epi64(_mm256_set1_epi64x(static_cast<long long>(q0 + static_cast<uint64_t>(b))), lane4);
        const __m256i qb = _mm256_add_epi64(qa, _mm256_set1_epi64x(4));
        __m256i a0 = qa, a1 = _mm256_srli_epi64(qa, 32), b0 = qb, b1 = _mm256_srli_epi64(qb, 32);
        __m256i a2 = _mm256_set1_epi64x(stream), b2 = a2, a3 = _mm256_setzero_si256(), b3 = a3;
        uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
        for (int r = 0; r < 10; ++r) {
            const __m256i K0 = _mm256_set1_epi32(static_cast<int>(k0)), K1 = _mm256_set1_epi32(static_cast<int>(k1));
            const __m256i pa0 = _mm256_mul_epu32(a0, M0), pa1 = _mm256_mul_epu32(a2, M1);
            const __m256i pb0 = _mm256_mul_epu32(b0, M0), pb1 = _mm256_mul_epu32(b2, M1);
            a0 = _mm256_xor_si256(_mm256_xor_si256(_mm256_srli_epi64(pa1, 32), a1), K0);
            a2 = _mm256_xor_si256(_mm256_xor_si256(_mm256_srli_epi64(pa0, 32), a3), K1);
            b0 = _mm256_xor_si256(_mm256_xor_si256(_mm256_srli_epi64(pb1, 32), b1), K0);
            b2 = _mm256_xor_si256(_mm256_xor_si256(_mm256_srli_epi64(pb0, 32), b3), K1);
            a1 = pa1;
            a3 = pa0;
            b1 = pb1;
            b3 = pb0;
            k0 += 0x9E3779B9u;
            k1 += 0xBB67AE85u;
        }
        // block l's words (c0, c1) and (c2, c3) packed into 64-bit lanes, then interleaved
        // so out holds block l's four words at 4 l .. 4 l + 3
        const __m256i ta = _mm256_blend_epi32(a0, _mm256_slli_epi64(a1, 32), 0xAA);
        const __m256i ua = _mm256_blend_epi32(a2, _mm256_slli_epi64(a3, 32), 0xAA);
        const __m256i tb = _mm256_blend_epi32(b0, _mm256_slli_epi64(b1, 32), 0xAA);
        const __m256i ub = _mm256_blend_epi32(b2, _mm256_slli_epi64(b3, 32), 0xAA);
        const __m256i la = _mm256_unpacklo_epi64(ta, ua), ha = _mm256_unpackhi_epi64(ta, ua);  // blocks 0, 2 | 1, 3
        const __m256i lb = _mm256_unpacklo_epi64(tb, ub), hb = _mm256_unpackhi_epi64(tb, ub);  // blocks 4, 6 | 5, 7
        __m256i* o = reinterpret_cast<__m256i*>(out + 4 * b);
        _mm256_storeu_si256(o + 0, _mm256_permute2x128_si256(la, ha, 0x20));
        _mm256_storeu_si256(o + 1, _mm256_permute2x128_si256(la, ha, 0x31));
        _mm256_storeu_si256(o + 2, _mm256_permute2x128_si256(lb, hb, 0x20));
        _mm256_storeu_si256(o + 3, _mm256_permute2x128_si256(lb, hb, 0x31));
    }
    if (b < nblocks) loops_avx2::philox_blocks(seed, stream, q0 + static_cast<uint64_t>(b), nblocks - b, out + 4 * b);
}

// The same lane layout in 512-bit vectors, 16 blocks per step, with the two XORs of each
// round in one vpternlogq: 1.8x the AVX2 kernel on Zen 4 (69-71 against 125-131 ms for
// 1.4e8 words, one thread).
__attribute__((target("avx512f"))) void philox_blocks_avx512(uint64_t seed, uint32_t stream, uint64_t q0,
                                                             int64_t nblocks, uint32_t* __restrict out) {
    const __m512i M0 = _mm512_set1_epi64(0xD2511F53u), M1 = _mm512_set1_epi64(0xCD9E8D57u);
    const __m512i lane8 = _mm512_setr_epi64(0, 1, 2, 3, 4, 5, 6, 7);
    // 64-bit lane pairs (t[l], u[l]) of blocks 0-3 and 4-7
    const __m512i lo_blocks = _mm512_setr_epi64(0, 8, 1, 9, 2, 10, 3, 11);
    const __m512i hi_blocks = _mm512_setr_epi64(4, 12, 5, 13, 6, 14, 7, 15);
    int64_t b = 0;
    for (; b + 16 <= nblocks; b += 16) {
        const __m512i qa = _mm512_add_epi64(_mm512_set1_epi64(static_cast<long long>(q0 + static_cast<uint64_t>(b))), lane8);
        const __m512i qb = _mm512_add_epi64(qa, _mm512_set1_epi64(8));
        __m512i a0 = qa, a1 = _mm512_srli_epi64(qa, 32), b0 = qb, b1 = _mm512_srli_epi64(qb, 32);
        __m512i a2 = _mm512_set1_epi64(stream), b2 = a2, a3 = _mm512_setzero_si512(), b3 = a3;
        uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
        for (int r = 0; r < 10; ++r) {
            const __m512i K0 = _mm512_set1_epi32(static_cast<int>(k0)), K1 = _mm512_set1_epi32(static_cast<int>(k1));
            const __m512i pa0 = _mm512_mul_epu32(a0, M0), pa1 = _mm512_mul_epu32(a2, M1);
            const __m512i pb0 = _mm512_mul_epu32(b0, M0), pb1 = _mm512_mul_epu32(b2, M1);
            a0 = _mm512_ternarylogic_epi64(_mm512_srli_epi64(pa1, 32), a1, K0, 0x96);  // 0x96: x ^ y ^ z
            a2 = _mm512_ternarylogic_epi64(_mm512_srli_epi64(pa0, 32), a3, K1, 0x96);
            b0 = _mm512_ternarylogic_epi64(_mm512_srli_epi64(pb1, 32), b1, K0, 0x96);
            b2 = _mm512_ternarylogic_epi64(_mm512_srli_epi64(pb0, 32), b3, K1, 0x96);
            a1 = pa1;
            a3 = pa0;
            b1 = pb1;
            b3 = pb0;
            k0 += 0x9E3779B9u;
            k1 += 0xBB67AE85u;
        }
        const __m512i ta = _mm512_mask_blend_epi32(0xAAAA, a0, _mm512_slli_epi64(a1, 32));
        const __m512i ua = _mm512_mask_blend_epi32(0xAAAA, a2, _mm512_slli_epi64(a3, 32));
        const __m512i tb = _mm512_mask_blend_epi32(0xAAAA, b0, _mm512_slli_epi64(b1, 32));
        const __m512i ub = _mm512_mask_blend_epi32(0xAAAA, b2, _mm512_slli_epi64(b3, 32));
        __m512i* o = reinterpret_cast<__m512i*>(out + 4 * b);
        _mm512_storeu_si512(o + 0, _mm512_permutex2var_epi64(ta, lo_blocks, ua));
        _mm512_storeu_si512(o + 1, _mm512_permutex2var_epi64(ta, hi_blocks, ua));
        _mm512_storeu_si512(o + 2, _mm512_permutex2var_epi64(tb, lo_blocks, ub));
        _mm512_storeu_si512(o + 3, _mm512_permutex2var_epi64(tb, hi_blocks, ub));
    }
    if (b < nblocks) philox_blocks_avx2(seed, stream, q0 + static_cast<uint64_t>(b), nblocks - b, out + 4 * b);
}

#endif

}  // namespace

namespace {
// One table per level, every member from the level's namespace; Philox on the AVX2 and
// AVX-512 levels is the level's hand-written kernel above (GCC's 512-bit vectorisation of
// the portable lanes loop measured ~10% slower on the DARE norm pass than even the AVX2
// kernel), elsewhere the lanes loop.
#define LFM_LOOP_TABLE(name, ns, philox)                                                                \
    LoopTable {                                                                                         \
        name, &ns::sub_check, &ns::check_finite, &ns::cut_keep, &ns::bracket, &ns::delta_bracket,     \
            &ns::delta_bracket_many, \
            &ns::count_equal_abs, &ns::draws_below, &ns::weigh, &ns::weigh_add, &ns::elect_add64,         \
            &ns::sign_of, &ns::agree_add_bits, &ns::agree_add_div, &ns::scale_by_table, &ns::l1_sums, &ns::l1_block, \
            &ns::or_bit, &ns::divide_guarded, &ns::finish, &ns::scale, &ns::fused_ties, \
            &ns::merge_direct, &ns::della_keep_row, philox                                              \
    }
const LoopTable kBaseline = LFM_LOOP_TABLE("baseline", loops_baseline, &loops_baseline::philox_blocks);
#ifdef LFM_HAVE_LOOPS_AVX2
const LoopTable kAvx2 = LFM_LOOP_TABLE("avx2", loops_avx2, &philox_blocks_avx2);
#endif
#ifdef LFM_HAVE_LOOPS_AVX512
const LoopTable kAvx512 = LFM_LOOP_TABLE("avx512", loops_avx512, &philox_blocks_avx512);
#endif
#ifdef LFM_HAVE_LOOPS_NEON
const LoopTable kNeon = LFM_LOOP_TABLE("neon", loops_neon, &loops_neon::philox_blocks);
#endif
#undef LFM_LOOP_TABLE
}  // namespace

const LoopTable& merge_loops() {
    switch (simd_level()) {
#ifdef LFM_HAVE_LOOPS_AVX2
        case SimdLevel::Avx2:
            return kAvx2;
#endif
#ifdef LFM_HAVE_LOOPS_AVX512
        case SimdLevel::Avx512:
            return kAvx512;
#endif
#ifdef LFM_HAVE_LOOPS_NEON
        case SimdLevel::Neon:
            return kNeon;
#endif
        default:
            return kBaseline;
    }
}

}  // namespace lfm::merge
