#include "kernels/merge/merge_cpu_loops.h"

#include <cmath>
#include <cstring>

#include "core/dtype.h"

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
    for (int64_t j = 0; j < len; ++j) {
        uint32_t u;
        std::memcpy(&u, &x[j], 4);
        u &= 0x7fffffffu;
        const int64_t e = start + j;
        const uint32_t inside = (u >= lo_v) & (u <= hi_v);
        const uint32_t lo_ok = (u != lo_v) | ((e >= lo_emin) & (e <= lo_emax));
        const uint32_t hi_ok = (u != hi_v) | ((e >= hi_emin) & (e <= hi_emax));
        keep[j] = static_cast<uint8_t>(inside & lo_ok & hi_ok);
    }
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

LFM_MULTIVERSION void elect_add(const float* __restrict e, float* __restrict S, float* __restrict A,
                                int64_t len) {
    for (int64_t j = 0; j < len; ++j) {
        S[j] += e[j];
        A[j] += std::fabs(e[j]);
    }
}

LFM_MULTIVERSION int64_t elect_sign(const float* __restrict S, const float* __restrict A, float tol,
                                    float* __restrict sgn, int64_t len) {
    int64_t undecided = 0;
    for (int64_t j = 0; j < len; ++j) {
        const bool sure = std::fabs(S[j]) > tol * A[j];
        const float v = S[j] >= 0.0f ? 1.0f : -1.0f;
        sgn[j] = sure ? v : 0.0f;
        undecided += !sure;
    }
    return undecided;
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

LFM_MULTIVERSION void philox_blocks(uint64_t seed, uint32_t stream, uint64_t q0, int64_t nblocks,
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

}  // namespace lfm::merge::loops
