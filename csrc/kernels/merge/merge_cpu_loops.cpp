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
// 8 blocks per step: 32x32->64-bit products of the even and odd lanes (vpmuludq),
// hi/lo words recombined with blends.
__attribute__((target("avx2"))) void philox_blocks_avx2(uint64_t seed, uint32_t stream, uint64_t q0,
                                                        int64_t nblocks, uint32_t* __restrict out) {
    const __m256i M0 = _mm256_set1_epi64x(0xD2511F53u), M1 = _mm256_set1_epi64x(0xCD9E8D57u);
    const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    int64_t b = 0;
    for (; b + 8 <= nblocks; b += 8) {
        const uint64_t q = q0 + static_cast<uint64_t>(b);
        // counters q..q+7: low words q_lo + lane (carry into the high word handled per lane)
        __m256i c0 = _mm256_add_epi32(_mm256_set1_epi32(static_cast<int>(static_cast<uint32_t>(q))), lane);
        const __m256i carry = _mm256_cmpgt_epi32(  // unsigned c0 < q_lo means the add wrapped
            _mm256_xor_si256(_mm256_set1_epi32(static_cast<int>(static_cast<uint32_t>(q) ^ 0x80000000u)), _mm256_setzero_si256()),
            _mm256_xor_si256(c0, _mm256_set1_epi32(static_cast<int>(0x80000000u))));
        __m256i c1 = _mm256_sub_epi32(_mm256_set1_epi32(static_cast<int>(static_cast<uint32_t>(q >> 32))), carry);
        __m256i c2 = _mm256_set1_epi32(static_cast<int>(stream));
        __m256i c3 = _mm256_setzero_si256();
        uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
        for (int r = 0; r < 10; ++r) {
            const __m256i pe0 = _mm256_mul_epu32(c0, M0), po0 = _mm256_mul_epu32(_mm256_srli_epi64(c0, 32), M0);
            const __m256i pe1 = _mm256_mul_epu32(c2, M1), po1 = _mm256_mul_epu32(_mm256_srli_epi64(c2, 32), M1);
            const __m256i lo0 = _mm256_blend_epi32(pe0, _mm256_slli_epi64(po0, 32), 0xAA);
            const __m256i hi0 = _mm256_blend_epi32(_mm256_srli_epi64(pe0, 32), po0, 0xAA);
            const __m256i lo1 = _mm256_blend_epi32(pe1, _mm256_slli_epi64(po1, 32), 0xAA);
            const __m256i hi1 = _mm256_blend_epi32(_mm256_srli_epi64(pe1, 32), po1, 0xAA);
            const __m256i n0 = _mm256_xor_si256(_mm256_xor_si256(hi1, c1), _mm256_set1_epi32(static_cast<int>(k0)));
            const __m256i n2 = _mm256_xor_si256(_mm256_xor_si256(hi0, c3), _mm256_set1_epi32(static_cast<int>(k1)));
            c0 = n0;
            c1 = lo1;
            c2 = n2;
            c3 = lo0;
            k0 += 0x9E3779B9u;
            k1 += 0xBB67AE85u;
        }
        // out holds block l's four words at 4 l .. 4 l + 3: a 4 x 8 transpose in registers
        // (the scalar copy through memory it replaces was a quarter of the kernel)
        const __m256i t0 = _mm256_unpacklo_epi32(c0, c1), t1 = _mm256_unpackhi_epi32(c0, c1);
        const __m256i t2 = _mm256_unpacklo_epi32(c2, c3), t3 = _mm256_unpackhi_epi32(c2, c3);
        const __m256i u0 = _mm256_unpacklo_epi64(t0, t2), u1 = _mm256_unpackhi_epi64(t0, t2);  // blocks 0, 1 | 4, 5
        const __m256i u2 = _mm256_unpacklo_epi64(t1, t3), u3 = _mm256_unpackhi_epi64(t1, t3);  // blocks 2, 3 | 6, 7
        __m256i* o = reinterpret_cast<__m256i*>(out + 4 * b);
        _mm256_storeu_si256(o + 0, _mm256_permute2x128_si256(u0, u1, 0x20));
        _mm256_storeu_si256(o + 1, _mm256_permute2x128_si256(u2, u3, 0x20));
        _mm256_storeu_si256(o + 2, _mm256_permute2x128_si256(u0, u1, 0x31));
        _mm256_storeu_si256(o + 3, _mm256_permute2x128_si256(u2, u3, 0x31));
    }
    if (b < nblocks) loops_avx2::philox_blocks(seed, stream, q0 + static_cast<uint64_t>(b), nblocks - b, out + 4 * b);
}

#endif

}  // namespace

namespace {
// One table per level, every member from the level's namespace; Philox on the AVX2 and
// AVX-512 levels is the hand-written AVX2 kernel above (GCC's 512-bit vectorisation of the
// portable lanes loop measured ~10% slower on the DARE norm pass), elsewhere the lanes loop.
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
const LoopTable kAvx512 = LFM_LOOP_TABLE("avx512", loops_avx512, &philox_blocks_avx2);  // measured faster than 512-bit lanes
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
