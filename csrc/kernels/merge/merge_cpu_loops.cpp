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

LFM_MULTIVERSION void cut_interior(const float* __restrict x, uint32_t lo_v, uint32_t hi_v,
                                   uint8_t* __restrict keep, int64_t len) {
    for (int64_t j = 0; j < len; ++j) {
        uint32_t u;
        std::memcpy(&u, &x[j], 4);
        u &= 0x7fffffffu;
        keep[j] = static_cast<uint8_t>((u > lo_v) & (u < hi_v));
    }
}

LFM_MULTIVERSION void draws_below(const uint32_t* __restrict draws, uint32_t thr, uint8_t* __restrict keep,
                                  int64_t len) {
    for (int64_t j = 0; j < len; ++j) keep[j] = static_cast<uint8_t>(draws[j] < thr);
}

LFM_MULTIVERSION void sparsify_accumulate(float* __restrict x, const uint8_t* __restrict keep, double f,
                                          double we, double* __restrict S, int64_t len) {
    if (keep) {
        if (S) {
            // keep is 0/1: multiplying by it (instead of selecting) keeps the loop branch-free
            for (int64_t j = 0; j < len; ++j) {
                const double dd = static_cast<double>(x[j]) * f * static_cast<double>(keep[j]);
                x[j] = static_cast<float>(dd);
                S[j] += we * dd;
            }
        } else {
            for (int64_t j = 0; j < len; ++j)
                x[j] = static_cast<float>(static_cast<double>(x[j]) * f * static_cast<double>(keep[j]));
        }
    } else if (S) {
        for (int64_t j = 0; j < len; ++j) {
            double dd = static_cast<double>(x[j]) * f;
            x[j] = static_cast<float>(dd);
            S[j] += we * dd;
        }
    } else if (f != 1.0) {
        for (int64_t j = 0; j < len; ++j) x[j] = static_cast<float>(static_cast<double>(x[j]) * f);
    }
}

LFM_MULTIVERSION void consensus_add(const float* __restrict x, float w, double wd, bool unw,
                                    const double* __restrict S, float* __restrict mixed, double* __restrict div,
                                    int64_t len) {
    // sign(t) = sign(w) * sign(x); with unw the sign of x alone counts. Computed in
    // float64 throughout so the loop has one element width and vectorizes.
    const double wdbl = w, ws = unw ? 1.0 : wdbl;
    for (int64_t j = 0; j < len; ++j) {
        const double xd = x[j];
        const double sg = ws * xd;
        // agree: sg > 0 where S >= 0, sg < 0 where S < 0 (zeros never agree)
        // S is never -0.0 (it starts at +0.0), so copysign gives +1 exactly where S >= 0
        const double sS = sg * std::copysign(1.0, S[j]);
        const double m = static_cast<double>(sS > 0.0);
        mixed[j] += static_cast<float>(m * (wdbl * xd));
        div[j] += m * wd;
    }
}

LFM_MULTIVERSION void divide_guarded(float* __restrict mixed, const double* __restrict div, int64_t len) {
    for (int64_t j = 0; j < len; ++j) {
        const double d = std::fabs(div[j]) < 1e-8 ? 1.0 : div[j];
        mixed[j] = static_cast<float>(static_cast<double>(mixed[j]) / d);
    }
}

LFM_MULTIVERSION void axpy(const float* __restrict x, float w, float* __restrict mixed, int64_t len) {
    for (int64_t j = 0; j < len; ++j) mixed[j] += w * x[j];
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
