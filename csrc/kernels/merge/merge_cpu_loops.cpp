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
void philox_blocks(uint64_t seed, uint32_t stream, uint64_t q0, int64_t nblocks, uint32_t* __restrict out);

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
namespace loops_avx512 {
#include "kernels/merge/merge_cpu_loops_impl.inc"
}  // namespace loops_avx512
#pragma GCC pop_options
#define LFM_HAVE_LOOPS_AVX512 1
#endif

namespace {
// One table per level, every member from the level's namespace (philox_blocks has its
// own dispatch).
#define LFM_LOOP_TABLE(name, ns)                                                                           \
    LoopTable {                                                                                         \
        name, &ns::sub_check, &ns::check_finite, &ns::cut_keep, &ns::bracket, &ns::delta_bracket,     \
            &ns::count_equal_abs, &ns::draws_below, &ns::weigh, &ns::weigh_add, &ns::elect_add64,         \
            &ns::sign_of, &ns::agree_add_bits, &ns::agree_add_div, &ns::scale_by_table, &ns::l1_sums,     \
            &ns::or_bit, &ns::divide_guarded, &ns::finish, &ns::scale, &ns::fused_ties, &ns::merge_direct, &philox_blocks   \
    }
const LoopTable kBaseline = LFM_LOOP_TABLE("baseline", loops_baseline);
#ifdef LFM_HAVE_LOOPS_AVX2
const LoopTable kAvx2 = LFM_LOOP_TABLE("avx2", loops_avx2);
#endif
#ifdef LFM_HAVE_LOOPS_AVX512
const LoopTable kAvx512 = LFM_LOOP_TABLE("avx512", loops_avx512);
#endif
#ifdef LFM_HAVE_LOOPS_NEON
const LoopTable kNeon = LFM_LOOP_TABLE("neon", loops_neon);
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

namespace {

void philox_blocks_portable(uint64_t seed, uint32_t stream, uint64_t q0, int64_t nblocks, uint32_t* __restrict out);

#if defined(__x86_64__)
// 8 blocks per step: 32x32->64-bit products of the even and odd lanes (vpmuludq),
// hi/lo words recombined with blends.
__attribute__((target("avx2"))) void philox_blocks_avx2(uint64_t seed, uint32_t stream, uint64_t q0,
                                                        int64_t nblocks, uint32_t* __restrict out) {
    const __m256i M0 = _mm256_set1_epi64x(0xD2511F53u), M1 = _mm256_set1_epi64x(0xCD9E8D57u);
    const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    int64_t b = 0;
    alignas(32) uint32_t w[4][8];
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
        _mm256_store_si256(reinterpret_cast<__m256i*>(w[0]), c0);
        _mm256_store_si256(reinterpret_cast<__m256i*>(w[1]), c1);
        _mm256_store_si256(reinterpret_cast<__m256i*>(w[2]), c2);
        _mm256_store_si256(reinterpret_cast<__m256i*>(w[3]), c3);
        uint32_t* o = out + 4 * b;
        for (int l = 0; l < 8; ++l)
            for (int k = 0; k < 4; ++k) o[4 * l + k] = w[k][l];
    }
    if (b < nblocks) philox_blocks_portable(seed, stream, q0 + static_cast<uint64_t>(b), nblocks - b, out + 4 * b);
}

#endif

}  // namespace

void philox_blocks(uint64_t seed, uint32_t stream, uint64_t q0, int64_t nblocks, uint32_t* __restrict out) {
#if defined(__x86_64__)
    if (cpu_has_avx2()) return philox_blocks_avx2(seed, stream, q0, nblocks, out);
#endif
    philox_blocks_portable(seed, stream, q0, nblocks, out);
}

namespace {
void philox_blocks_portable(uint64_t seed, uint32_t stream, uint64_t q0, int64_t nblocks,
                            uint32_t* __restrict out) {
    constexpr int L = 16;  // lanes processed together (vectorizes to vpmuludq on AVX2)
    const uint32_t key0 = static_cast<uint32_t>(seed), key1 = static_cast<uint32_t>(seed >> 32);
    for (int64_t base = 0; base < nblocks; base += L) {
        const int n = static_cast<int>(nblocks - base < L ? nblocks - base : L);
        uint32_t c0[L], c1[L], c2[L], c3[L];
        for (int l = 0; l < L; ++l) {
            const uint64_t q = q0 + static_cast<uint64_t>(base + l);
            c0[l] = static_cast<uint32_t>(q);
            c1[l] = static_cast<uint32_t>(q >> 32);
            c2[l] = stream;
            c3[l] = 0;
        }
        uint32_t k0 = key0, k1 = key1;
        for (int r = 0; r < 10; ++r) {
            for (int l = 0; l < L; ++l) {
                const uint64_t p0 = static_cast<uint64_t>(0xD2511F53u) * c0[l];
                const uint64_t p1 = static_cast<uint64_t>(0xCD9E8D57u) * c2[l];
                const uint32_t n0 = static_cast<uint32_t>(p1 >> 32) ^ c1[l] ^ k0;
                const uint32_t n2 = static_cast<uint32_t>(p0 >> 32) ^ c3[l] ^ k1;
                c1[l] = static_cast<uint32_t>(p1);
                c3[l] = static_cast<uint32_t>(p0);
                c0[l] = n0;
                c2[l] = n2;
            }
            k0 += 0x9E3779B9u;
            k1 += 0xBB67AE85u;
        }
        for (int l = 0; l < n; ++l) {
            uint32_t* o = out + 4 * (base + l);
            o[0] = c0[l];
            o[1] = c1[l];
            o[2] = c2[l];
            o[3] = c3[l];
        }
    }
}

}  // namespace
}  // namespace lfm::merge
