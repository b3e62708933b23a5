// Philox4x32-10 counter-based generator and the stream-id rule of docs/spec/merge.md
// ("Randomness"). Header-only, usable from host and device code, so CPU, CUDA and
// the Python reference draw the same bits for (seed, stream, element).
#pragma once
#include <cstdint>

#include "core/dtype.h"  // LFM_HD

namespace lfm {

struct Philox4 {
    uint32_t v[4];
};

LFM_HD void philox_mulhilo(uint32_t a, uint32_t b, uint32_t& hi, uint32_t& lo) {
    uint64_t p = static_cast<uint64_t>(a) * b;
    hi = static_cast<uint32_t>(p >> 32);
    lo = static_cast<uint32_t>(p);
}

// Philox4x32 with 10 rounds: counter c, key (k0, k1).
LFM_HD Philox4 philox4x32_10(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3, uint32_t k0, uint32_t k1) {
    for (int r = 0; r < 10; ++r) {
        uint32_t hi0, lo0, hi1, lo1;
        philox_mulhilo(0xD2511F53u, c0, hi0, lo0);
        philox_mulhilo(0xCD9E8D57u, c2, hi1, lo1);
        uint32_t n0 = hi1 ^ c1 ^ k0, n1 = lo1, n2 = hi0 ^ c3 ^ k1, n3 = lo0;
        c0 = n0; c1 = n1; c2 = n2; c3 = n3;
        k0 += 0x9E3779B9u;
        k1 += 0xBB67AE85u;
    }
    return Philox4{{c0, c1, c2, c3}};
}

// The 4 draws of block q = floor(e / 4): element e uses word e mod 4.
LFM_HD Philox4 philox_block(uint64_t seed, uint32_t stream, uint64_t q) {
    return philox4x32_10(static_cast<uint32_t>(q), static_cast<uint32_t>(q >> 32), stream, 0u,
                         static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
}

LFM_HD uint32_t philox_draw(uint64_t seed, uint32_t stream, uint64_t e) {
    return philox_block(seed, stream, e >> 2).v[e & 3];
}

inline uint64_t fnv1a64(const char* s, uint64_t len) {
    uint64_t h = 0xcbf29ce484222325ull;
    for (uint64_t i = 0; i < len; ++i) {
        h ^= static_cast<unsigned char>(s[i]);
        h *= 0x100000001b3ull;
    }
    return h;
}

// stream id = low 32 bits of FNV-1a-64(name) XOR (model position << 24)
inline uint32_t merge_stream_id(const char* name, uint64_t len, uint32_t position) {
    return static_cast<uint32_t>(fnv1a64(name, len)) ^ (position << 24);
}

// Keep threshold for probability p: keep iff draw < floor(p * 2^32); p >= 1 keeps all.
inline uint64_t keep_threshold(double p) {
    if (!(p > 0.0)) return 0;
    if (p >= 1.0) return 0x100000000ull;
    return static_cast<uint64_t>(p * 4294967296.0);
}

}  // namespace lfm
