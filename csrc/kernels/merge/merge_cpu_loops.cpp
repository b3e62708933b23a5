#include "kernels/merge/merge_cpu_loops.h"

#include <algorithm>
#include <cmath>
#include <cstring>

#include "core/cpu_features.h"
#include "core/dtype.h"

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define LFM_MULTIVERSION __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define LFM_MULTIVERSION
#endif

namespace lfm::merge::loops {

LFM_MULTIVERSION uint32_t sub_check(float* __restrict x, const float* __restrict b, int64_t len) {
    uint32_t bad = 0;
    for (int64_t j = 0; j < len; ++j) {
        uint32_t ub, ux;
        std::memcpy(&ub, &b[j], 4);
        float d = x[j] - b[j];
        std::memcpy(&ux, &d, 4);
        // a NaN/Inf in x or b makes d NaN/Inf; a finite overflow makes d Inf
        bad |= ((ux & 0x7f800000u) == 0x7f800000u) | ((ub & 0x7f800000u) == 0x7f800000u);
        x[j] = d;
    }
    return bad;
}

LFM_MULTIVERSION uint32_t check_finite(const float* __restrict x, int64_t len) {
    uint32_t bad = 0;
    for (int64_t j = 0; j < len; ++j) {
        uint32_t u;
        std::memcpy(&u, &x[j], 4);
        bad |= (u & 0x7f800000u) == 0x7f800000u;
    }
    return bad;
}

LFM_MULTIVERSION void cut_keep(const float* __restrict x, int64_t start, uint32_t lo_v, int64_t lo_emin,
                               int64_t lo_emax, uint32_t hi_v, int64_t hi_emin, int64_t hi_emax,
                               uint8_t* __restrict keep, int64_t len) {
    // index bounds made block-local and clamped to [-1, len], so the loop compares 32-bit lanes
    auto local = [&](int64_t e) { return static_cast<int32_t>(std::min<int64_t>(std::max<int64_t>(e - start, -1), len)); };
    const int32_t l0 = local(lo_emin), l1 = local(lo_emax), h0 = local(hi_emin), h1 = local(hi_emax);
    for (int32_t j = 0; j < static_cast<int32_t>(len); ++j) {
        uint32_t u;
        std::memcpy(&u, &x[j], 4);
        u &= 0x7fffffffu;
        const uint32_t inside = (u >= lo_v) & (u <= hi_v);
        const uint32_t lo_ok = (u != lo_v) | ((j >= l0) & (j <= l1));
        const uint32_t hi_ok = (u != hi_v) | ((j >= h0) & (j <= h1));
        keep[j] = static_cast<uint8_t>(inside & lo_ok & hi_ok);
    }
}

LFM_MULTIVERSION int64_t bracket(const float* __restrict x, uint32_t lo, uint32_t hi, uint32_t* __restrict pos,
                                 int64_t* below, int64_t len) {
    // Chunks of 16: counting vectorizes; the scalar extraction runs only for the chunks
    // that hold a candidate (a narrow bracket leaves most chunks empty).
    constexpr int C = 16;
    int64_t nb = 0, c = 0, j0 = 0;
    for (; j0 + C <= len; j0 += C) {
        uint32_t inside = 0, under = 0;
        for (int j = 0; j < C; ++j) {
            uint32_t u;
            std::memcpy(&u, &x[j0 + j], 4);
            u &= 0x7fffffffu;
            under += u < lo;
            inside += (u >= lo) & (u <= hi);
        }
        nb += under;
        if (inside) {
            for (int j = 0; j < C; ++j) {
                uint32_t u;
                std::memcpy(&u, &x[j0 + j], 4);
                u &= 0x7fffffffu;
                pos[c] = static_cast<uint32_t>(j0 + j);  // always written, kept only when inside
                c += (u >= lo) & (u <= hi);
            }
        }
    }
    for (int64_t j = j0; j < len; ++j) {
        uint32_t u;
        std::memcpy(&u, &x[j], 4);
        u &= 0x7fffffffu;
        nb += u < lo;
        pos[c] = static_cast<uint32_t>(j);
        c += (u >= lo) & (u <= hi);
    }
    *below = nb;
    return c;
}

namespace {
inline float to_f32(uint16_t h) { return bf16_to_f32(h); }

template <typename T>
LFM_MULTIVERSION int64_t delta_bracket_t(const T* __restrict x, const float* __restrict b, uint32_t lo, uint32_t hi,
                                         uint32_t* __restrict pos, uint32_t* __restrict vals, int64_t* below,
                                         uint32_t* bad, int64_t len) {
    // As bracket(), chunks of 16: the counting vectorizes, extraction only where needed.
    constexpr int C = 16;
    int64_t nb = 0, c = 0, j0 = 0;
    uint32_t nonfinite = 0;
    auto abs_bits = [&](int64_t j, uint32_t& nf) {
        uint32_t u;
        const float d = to_f32(x[j]) - b[j];
        std::memcpy(&u, &d, 4);
        nf |= (u & 0x7f800000u) == 0x7f800000u;
        return u & 0x7fffffffu;
    };
    for (; j0 + C <= len; j0 += C) {
        uint32_t inside = 0, under = 0;
        for (int j = 0; j < C; ++j) {
            const uint32_t u = abs_bits(j0 + j, nonfinite);
            under += u < lo;
            inside += (u >= lo) & (u <= hi);
        }
        nb += under;
        if (inside) {
            uint32_t ignore = 0;
            for (int j = 0; j < C; ++j) {
                const uint32_t u = abs_bits(j0 + j, ignore);
                pos[c] = static_cast<uint32_t>(j0 + j);
                vals[c] = u;
                c += (u >= lo) & (u <= hi);
            }
        }
    }
    for (int64_t j = j0; j < len; ++j) {
        const uint32_t u = abs_bits(j, nonfinite);
        nb += u < lo;
        pos[c] = static_cast<uint32_t>(j);
        vals[c] = u;
        c += (u >= lo) & (u <= hi);
    }
    *below = nb;
    *bad |= nonfinite;
    return c;
}
}  // namespace

int64_t delta_bracket(const void* x, lfm_dtype dt, const float* __restrict b, uint32_t lo, uint32_t hi,
                      uint32_t* __restrict pos, uint32_t* __restrict vals, int64_t* below, uint32_t* bad,
                      int64_t len) {
    // float32 inputs are faster through the materialised path (memcpy + sub_check + bracket,
    // measured): only bfloat16, which halves the bytes read, takes the fused one
    if (dt == LFM_DTYPE_BF16)
        return delta_bracket_t(static_cast<const uint16_t*>(x), b, lo, hi, pos, vals, below, bad, len);
    return -1;
}

LFM_MULTIVERSION int64_t count_equal_abs(const float* __restrict x, uint32_t v, int64_t len) {
    int64_t c = 0;
    for (int64_t j = 0; j < len; ++j) {
        uint32_t u;
        std::memcpy(&u, &x[j], 4);
        c += (u & 0x7fffffffu) == v;
    }
    return c;
}

LFM_MULTIVERSION void draws_below(const uint32_t* __restrict draws, uint32_t thr, uint8_t* __restrict keep,
                                  int64_t len) {
    for (int64_t j = 0; j < len; ++j) keep[j] = static_cast<uint8_t>(draws[j] < thr);
}

LFM_MULTIVERSION void weigh(const float* x, const uint8_t* __restrict keep, float c, float* t, int64_t len) {
    if (keep) {
        for (int64_t j = 0; j < len; ++j) {
            const float v = c * x[j];  // loaded unconditionally: the select then vectorizes
            t[j] = keep[j] ? v : 0.0f;
        }
    } else {
        for (int64_t j = 0; j < len; ++j) t[j] = c * x[j];
    }
}

LFM_MULTIVERSION void weigh_add(const float* __restrict x, const uint8_t* __restrict keep, float c,
                                float* __restrict mixed, int64_t len) {
    if (keep) {
        for (int64_t j = 0; j < len; ++j) {
            const float v = c * x[j];
            mixed[j] += keep[j] ? v : 0.0f;
        }
    } else {
        for (int64_t j = 0; j < len; ++j) mixed[j] += c * x[j];
    }
}

LFM_MULTIVERSION void elect_add64(const float* __restrict x, const uint8_t* __restrict keep, double w, double f,
                                  double* __restrict S, int64_t len) {
    if (keep) {
        for (int64_t j = 0; j < len; ++j) {
            const double dv = w * (static_cast<double>(x[j]) * f);
            S[j] += keep[j] ? dv : 0.0;
        }
    } else {
        for (int64_t j = 0; j < len; ++j) S[j] += w * (static_cast<double>(x[j]) * f);
    }
}

LFM_MULTIVERSION void sign_of(const double* __restrict S, float* __restrict sgn, int64_t len) {
    for (int64_t j = 0; j < len; ++j) sgn[j] = S[j] >= 0.0 ? 1.0f : -1.0f;
}

LFM_MULTIVERSION void agree_add_bits(const float* e, const float* t, const float* __restrict sgn, float bit,
                                     float* __restrict mixed, float* __restrict bits, int64_t len) {
    for (int64_t j = 0; j < len; ++j) {
        const bool agree = e[j] * sgn[j] > 0.0f;
        const float tj = t[j];  // loaded unconditionally: the select then vectorizes
        mixed[j] += agree ? tj : 0.0f;
        bits[j] += agree ? bit : 0.0f;
    }
}

LFM_MULTIVERSION void agree_add_div(const float* e, const float* t, const float* __restrict sgn, double wd,
                                    float* __restrict mixed, double* __restrict div, int64_t len) {
    for (int64_t j = 0; j < len; ++j) {
        const bool agree = e[j] * sgn[j] > 0.0f;
        const float tj = t[j];
        mixed[j] += agree ? tj : 0.0f;
        div[j] += agree ? wd : 0.0;
    }
}

LFM_MULTIVERSION void scale_by_table(float* __restrict mixed, const float* __restrict bits,
                                     const float* __restrict table, int64_t len) {
    for (int64_t j = 0; j < len; ++j) mixed[j] *= table[static_cast<int32_t>(bits[j])];
}

LFM_MULTIVERSION void l1_sums(const float* __restrict x, const uint8_t* __restrict keep, int64_t len,
                              double* tot, double* kept) {
    constexpr int L = 8;
    double t[L] = {0}, k[L] = {0};
    int64_t j = 0;
    for (; j + L <= len; j += L)
        for (int l = 0; l < L; ++l) {
            const double v = std::fabs(static_cast<double>(x[j + l]));
            t[l] += v;
            k[l] += v * static_cast<double>(keep[j + l]);
        }
    for (int l = 0; j < len; ++j, ++l) {
        const double v = std::fabs(static_cast<double>(x[j]));
        t[l] += v;
        k[l] += v * static_cast<double>(keep[j]);
    }
    double ts = 0.0, ks = 0.0;
    for (int l = 0; l < L; ++l) {
        ts += t[l];
        ks += k[l];
    }
    *tot = ts;
    *kept = ks;
}

LFM_MULTIVERSION void or_bit(const uint8_t* __restrict keep, uint8_t bit, uint8_t* __restrict m, int64_t stride,
                             int64_t len) {
    if (stride == 1) {
        for (int64_t j = 0; j < len; ++j) m[j] |= static_cast<uint8_t>(keep[j] * bit);
    } else {
        for (int64_t j = 0; j < len; ++j) m[j * stride] |= static_cast<uint8_t>(keep[j] * bit);
    }
}

namespace {
// K is a template constant so the model loops unroll and the element loop vectorizes.
template <int K>
LFM_MULTIVERSION void fused_ties_k(const float* const* xs, const uint8_t* const* ks, const float* coef,
                                   const double* wd, const double* fd, const float* __restrict b, float lam,
                                   const float* __restrict table, float* __restrict out, int64_t len) {
    const float* x[K];
    const uint8_t* k[K];
    float c[K];
    double w[K], f[K];
    for (int i = 0; i < K; ++i) {
        x[i] = xs[i];
        k[i] = ks[i];
        c[i] = coef[i];
        w[i] = wd[i];
        f[i] = fd[i];
    }
    for (int64_t j = 0; j < len; ++j) {
        float t[K];
        double S = 0.0;  // the election in float64, ordered like the reference: w * (delta * f)
        for (int i = 0; i < K; ++i) {
            const float xv = x[i][j];
            const bool kept = k[i][j] != 0;
            const float v = c[i] * xv;
            t[i] = kept ? v : 0.0f;
            const double dv = w[i] * (static_cast<double>(xv) * f[i]);
            S += kept ? dv : 0.0;
        }
        const float sg = S >= 0.0 ? 1.0f : -1.0f;
        float mixed = 0.0f, bits = 0.0f;
        for (int i = 0; i < K; ++i) {
            const bool agree = t[i] * sg > 0.0f;
            mixed += agree ? t[i] : 0.0f;
            bits += agree ? static_cast<float>(1 << i) : 0.0f;
        }
        mixed *= table[static_cast<int32_t>(bits)];
        out[j] = b[j] + lam * mixed;
    }
}
}  // namespace

void fused_ties(int K, const float* const* x, const uint8_t* const* keep, const float* coef, const double* w,
                const double* f, const float* b, float lam, const float* table, float* out, int64_t len) {
    switch (K) {
        case 1: return fused_ties_k<1>(x, keep, coef, w, f, b, lam, table, out, len);
        case 2: return fused_ties_k<2>(x, keep, coef, w, f, b, lam, table, out, len);
        case 3: return fused_ties_k<3>(x, keep, coef, w, f, b, lam, table, out, len);
        case 4: return fused_ties_k<4>(x, keep, coef, w, f, b, lam, table, out, len);
        case 5: return fused_ties_k<5>(x, keep, coef, w, f, b, lam, table, out, len);
        case 6: return fused_ties_k<6>(x, keep, coef, w, f, b, lam, table, out, len);
        case 7: return fused_ties_k<7>(x, keep, coef, w, f, b, lam, table, out, len);
        default: return fused_ties_k<8>(x, keep, coef, w, f, b, lam, table, out, len);
    }
}

LFM_MULTIVERSION void divide_guarded(float* __restrict mixed, const double* __restrict div, int64_t len) {
    for (int64_t j = 0; j < len; ++j) {
        const double d = std::fabs(div[j]) < 1e-8 ? 1.0 : div[j];
        mixed[j] = static_cast<float>(static_cast<double>(mixed[j]) / d);
    }
}

LFM_MULTIVERSION void finish(const float* __restrict b, float lam, const float* __restrict mixed,
                             float* __restrict o, int64_t len) {
    if (b)
        for (int64_t j = 0; j < len; ++j) o[j] = b[j] + lam * mixed[j];
    else
        std::memcpy(o, mixed, static_cast<size_t>(len) * 4);
}

LFM_MULTIVERSION void scale(float* __restrict mixed, float s, int64_t len) {
    for (int64_t j = 0; j < len; ++j) mixed[j] *= s;
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
}  // namespace lfm::merge::loops
