// Task-vector codecs on the CPU: encode, decode / fused decode-and-add, and the batched
// compressed-delta matmul (delta_apply). Layouts: include/lfm/codec.h.
//
// Work is split by rows (each task owns whole rows, so no two workers write one
// element). Each row is decoded into per-worker fp32 scratch (it fits in L1/L2), then
// added to the base row and written in the output dtype: one streaming pass over the
// packed data, the base and the output. The hot loops are plain portable C++ that the
// compiler vectorises; they are compiled twice (baseline x86-64 and AVX2) and picked at
// run time. The decode clone enables AVX2 but not FMA, so b + q*s is rounded exactly
// like the torch reference (no fused multiply-add contraction).
#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstring>
#include <memory>
#include <vector>

#include "core/cpu_features.h"
#include "core/dtype.h"
#include "core/status.h"
#include "core/tensor.h"
#include "core/thread_pool.h"
#include "kernels/codec/codec.h"
#include "kernels/codec/delta_dots_avx512.h"

#define LFM_ALWAYS_INLINE inline __attribute__((always_inline))

namespace lfm::codec {
namespace {

// Signed 4-bit values of a packed byte (two's complement nibbles), in well-defined
// unsigned arithmetic (shifting a negative int8 left is undefined behaviour).
inline int nibble_lo(uint8_t v) { return static_cast<int>((v & 0xFu) ^ 8u) - 8; }
inline int nibble_hi(uint8_t v) { return static_cast<int>((v >> 4) ^ 8u) - 8; }

// Rows per parallel task: about 64K elements, at least one row.
int64_t rows_per_task(int64_t cols) { return std::max<int64_t>(1, (int64_t{1} << 16) / std::max<int64_t>(1, cols)); }

// Round half to even for |v| < 2^22 in the default rounding mode (1.5 * 2^23 trick);
// callers clamp first. Portable and vectorisable (std::rint is a libm call on baseline x86-64).
LFM_ALWAYS_INLINE float rint_small(float v) {
    const float magic = 12582912.0f;  // without -ffast-math the compiler keeps both operations
    return (v + magic) - magic;
}

// ---- unpacking one row of codes to fp32 (q values, or +-1 for sign1) -------------------
//
// Byte-indexed tables turn each packed byte into its 8 / 4 / 2 floats with one small
// memcpy (a vector move): far faster than extracting bits one by one.

struct Luts {
    float sign[256][8];
    float i2[256][4];
    float i4[256][2];
    float nf4[256][2];  // NF4 code book values of the two nibbles
    Luts() {
        for (int b = 0; b < 256; ++b) {
            for (int j = 0; j < 8; ++j) sign[b][j] = ((b >> j) & 1) ? -1.0f : 1.0f;
            for (int j = 0; j < 4; ++j) {
                const int v = (b >> (2 * j)) & 3;
                i2[b][j] = static_cast<float>(v - ((v >> 1) << 2));
            }
            for (int j = 0; j < 2; ++j) {
                const int v = (b >> (4 * j)) & 15;
                i4[b][j] = static_cast<float>(v - ((v >> 3) << 4));
                nf4[b][j] = nf4_level(v);
            }
        }
    }
};

static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__, "sign1 rows are read byte-wise: little-endian hosts only");

const Luts& luts() {
    static const Luts t;
    return t;
}

LFM_ALWAYS_INLINE void unpack_row(lfm_codec codec, const void* data_row, int64_t cols, float* q) {
    const Luts& L = luts();
    switch (codec) {
        case LFM_CODEC_SIGN1: {
            // words are little-endian uint32: byte k of word i holds elements 32i + 8k .. +7
            const uint8_t* p = static_cast<const uint8_t*>(data_row);
            const int64_t full = cols / 8;
            for (int64_t i = 0; i < full; ++i) std::memcpy(q + 8 * i, L.sign[p[i]], 8 * sizeof(float));
            for (int64_t c = full * 8; c < cols; ++c) q[c] = L.sign[p[full]][c - full * 8];
            break;
        }
        case LFM_CODEC_INT8: {
            const int8_t* p = static_cast<const int8_t*>(data_row);
            for (int64_t c = 0; c < cols; ++c) q[c] = static_cast<float>(p[c]);
            break;
        }
        case LFM_CODEC_INT4:
        case LFM_CODEC_NF4: {
            const uint8_t* p = static_cast<const uint8_t*>(data_row);
            const float(*t)[2] = codec == LFM_CODEC_NF4 ? L.nf4 : L.i4;
            const int64_t pairs = cols / 2;
            for (int64_t i = 0; i < pairs; ++i) std::memcpy(q + 2 * i, t[p[i]], 2 * sizeof(float));
            if (cols & 1) q[cols - 1] = t[p[pairs]][0];
            break;
        }
        case LFM_CODEC_INT2: {
            const uint8_t* p = static_cast<const uint8_t*>(data_row);
            const int64_t quads = cols / 4;
            for (int64_t i = 0; i < quads; ++i) std::memcpy(q + 4 * i, L.i2[p[i]], 4 * sizeof(float));
            for (int64_t c = quads * 4; c < cols; ++c) q[c] = L.i2[p[quads]][c - quads * 4];
            break;
        }
    }
}

// d[c] = q[c] * s(c): s per row (sign1) or per group (intN); then optional base add.
LFM_ALWAYS_INLINE void scale_add_row(const float* q, const float* s, int64_t cols, int64_t group, bool sign1,
                                     const float* base, float alpha, float* out) {
    const bool unit = alpha == 1.0f;
    if (sign1) {
        const float sv = s[0];
        if (base) {
            if (unit) for (int64_t c = 0; c < cols; ++c) out[c] = base[c] + q[c] * sv;
            else for (int64_t c = 0; c < cols; ++c) out[c] = base[c] + alpha * (q[c] * sv);
        } else {
            if (unit) for (int64_t c = 0; c < cols; ++c) out[c] = q[c] * sv;
            else for (int64_t c = 0; c < cols; ++c) out[c] = alpha * (q[c] * sv);
        }
        return;
    }
    for (int64_t g0 = 0, gi = 0; g0 < cols; g0 += group, ++gi) {
        const int64_t g1 = std::min(cols, g0 + group);
        const float sv = s[gi];
        if (base) {
            if (unit) for (int64_t c = g0; c < g1; ++c) out[c] = base[c] + q[c] * sv;
            else for (int64_t c = g0; c < g1; ++c) out[c] = base[c] + alpha * (q[c] * sv);
        } else {
            if (unit) for (int64_t c = g0; c < g1; ++c) out[c] = q[c] * sv;
            else for (int64_t c = g0; c < g1; ++c) out[c] = alpha * (q[c] * sv);
        }
    }
}

// sign1 with alpha == 1 fused in one pass: +-s is s with its sign bit flipped by the code
// bit (exactly the reference's where(neg, -s, s)), added to the base.
LFM_ALWAYS_INLINE void sign1_add_row(const uint32_t* w, float s, int64_t cols, const float* base, float* out) {
    const uint32_t sb = f32_bits(s);
    const int64_t full = cols / 32;
    for (int64_t i = 0; i < full; ++i) {
        const uint32_t word = w[i];
        const float* b = base + 32 * i;
        float* o = out + 32 * i;
        for (int j = 0; j < 32; ++j) {
            uint32_t u = sb ^ (((word >> j) & 1u) << 31);
            float v;
            std::memcpy(&v, &u, 4);
            o[j] = b[j] + v;
        }
    }
    for (int64_t c = full * 32; c < cols; ++c) {
        uint32_t u = sb ^ (((w[full] >> (c - 32 * full)) & 1u) << 31);
        float v;
        std::memcpy(&v, &u, 4);
        out[c] = base[c] + v;
    }
}

LFM_ALWAYS_INLINE void decode_row_body(lfm_codec codec, const void* data_row, const float* s, int64_t cols,
                                       int64_t group, const float* base, float alpha, float* q, float* out) {
    if (codec == LFM_CODEC_SIGN1 && base && alpha == 1.0f) {
        sign1_add_row(static_cast<const uint32_t*>(data_row), s[0], cols, base, out);
        return;
    }
    if (codec == LFM_CODEC_INT8 && base && alpha == 1.0f) {  // one pass, no unpacked row
        const int8_t* p = static_cast<const int8_t*>(data_row);
        for (int64_t g0 = 0, gi = 0; g0 < cols; g0 += group, ++gi) {
            const int64_t g1 = std::min(cols, g0 + group);
            const float sv = s[gi];
            for (int64_t c = g0; c < g1; ++c) out[c] = base[c] + static_cast<float>(p[c]) * sv;
        }
        return;
    }
    unpack_row(codec, data_row, cols, q);
    scale_add_row(q, s, cols, group, codec == LFM_CODEC_SIGN1, base, alpha, out);
}

void decode_row_baseline(lfm_codec codec, const void* data_row, const float* s, int64_t cols, int64_t group,
                         const float* base, float alpha, float* q, float* out) {
    decode_row_body(codec, data_row, s, cols, group, base, alpha, q, out);
}

#if defined(__x86_64__)
__attribute__((target("avx2"))) void decode_row_avx2(lfm_codec codec, const void* data_row, const float* s,
                                                     int64_t cols, int64_t group, const float* base, float alpha,
                                                     float* q, float* out) {
    decode_row_body(codec, data_row, s, cols, group, base, alpha, q, out);
}
#endif

using DecodeRowFn = void (*)(lfm_codec, const void*, const float*, int64_t, int64_t, const float*, float, float*,
                             float*);

DecodeRowFn pick_decode_row() {
#if defined(__x86_64__)
    if (cpu_has_avx2()) return decode_row_avx2;
#endif
    return decode_row_baseline;
}

// ---- dot products for delta_apply: several tokens against one decoded row ---------------

LFM_ALWAYS_INLINE float dot_body(const float* a, const float* b, int64_t n) {
    // 16 independent partial sums: lets the compiler vectorise without -ffast-math.
    float acc[16] = {0};
    int64_t i = 0;
    for (; i + 16 <= n; i += 16)
        for (int j = 0; j < 16; ++j) acc[j] += a[i + j] * b[i + j];
    float tail = 0.0f;
    for (; i < n; ++i) tail += a[i] * b[i];
    float s = 0.0f;
    for (int j = 0; j < 16; ++j) s += acc[j];
    return s + tail;
}

// sum_c x[c] * (+-1 from the sign bits): x with its sign bit flipped where the code bit
// is 1, summed in 32 lanes. No decoded row exists at all.
LFM_ALWAYS_INLINE float dot_sign1_body(const float* x, const uint32_t* w, int64_t n) {
    float acc[32] = {0};
    const int64_t full = n / 32;
    for (int64_t i = 0; i < full; ++i) {
        const uint32_t word = w[i];
        const float* xi = x + 32 * i;
        for (int j = 0; j < 32; ++j) {
            uint32_t u;
            std::memcpy(&u, xi + j, 4);
            u ^= ((word >> j) & 1u) << 31;
            float v;
            std::memcpy(&v, &u, 4);
            acc[j] += v;
        }
    }
    float tail = 0.0f;
    for (int64_t c = full * 32; c < n; ++c) tail += ((w[full] >> (c - 32 * full)) & 1u) ? -x[c] : x[c];
    float s = 0.0f;
    for (int j = 0; j < 32; ++j) s += acc[j];
    return s + tail;
}

// sum over groups of s_g * (q_g . x_g): codes unscaled, one multiply per group.
LFM_ALWAYS_INLINE float dot_groups_body(const float* x, const float* q, const float* sc, int64_t n, int64_t group) {
    float total = 0.0f;
    for (int64_t g0 = 0, gi = 0; g0 < n; g0 += group, ++gi)
        total += sc[gi] * dot_body(x + g0, q + g0, std::min(group, n - g0));
    return total;
}

// The values of a byte's two nibbles: int4 two's complement, or NF4 code book entries
// (book = luts().nf4, fetched once by the caller: no static-init guard in the hot loop).
using Book = const float (*)[2];
template <bool NF4>
LFM_ALWAYS_INLINE float nib_lo(Book book, uint8_t b) {
    if constexpr (NF4) return book[b][0];
    else return static_cast<float>(nibble_lo(b));
}
template <bool NF4>
LFM_ALWAYS_INLINE float nib_hi(Book book, uint8_t b) {
    if constexpr (NF4) return book[b][1];
    else return static_cast<float>(nibble_hi(b));
}

// int4 / nf4 codes against a token whose x is stored de-interleaved (even elements, then
// odd ones): byte i holds elements 2i (low nibble) and 2i+1 (high nibble), so both
// operands are contiguous and the byte -> float conversions vectorise like int8's.
template <bool NF4>
LFM_ALWAYS_INLINE float dot_int4_deint_body(Book book, const float* xe, const float* xo, const uint8_t* p,
                                            int64_t nb) {
    float acc[16] = {0};
    int64_t i = 0;
    for (; i + 16 <= nb; i += 16)
        for (int j = 0; j < 16; ++j)
            acc[j] += xe[i + j] * nib_lo<NF4>(book, p[i + j]) + xo[i + j] * nib_hi<NF4>(book, p[i + j]);
    float tail = 0.0f;
    for (; i < nb; ++i) tail += xe[i] * nib_lo<NF4>(book, p[i]) + xo[i] * nib_hi<NF4>(book, p[i]);
    float s = 0.0f;
    for (int j = 0; j < 16; ++j) s += acc[j];
    return s + tail;
}

// One row of de-interleaved int4 / nf4 codes against nt tokens (see row_dots_body).
template <bool NF4>
LFM_ALWAYS_INLINE void row_dots_deint(const uint8_t* p, const float* sc, int64_t n, int64_t group, const float* xs,
                                      int64_t nt, float* q, float* out, int64_t out_stride) {
    const Book book = NF4 ? luts().nf4 : nullptr;
    const int64_t half = n / 2, gb = group / 2;
    if (nt >= 3) {
        // Several tokens: unpack the row once, de-interleaved like x, then plain dots.
        float* qe = q;
        float* qo = q + half;
        for (int64_t i = 0; i < half; ++i) {
            qe[i] = nib_lo<NF4>(book, p[i]);
            qo[i] = nib_hi<NF4>(book, p[i]);
        }
        for (int64_t i = 0; i < nt; ++i) {
            const float* xe = xs + i * n;
            const float* xo = xe + half;
            float total = 0.0f;
            for (int64_t b0 = 0, gi = 0; b0 < half; b0 += gb, ++gi) {
                const int64_t len = std::min(gb, half - b0);
                total += sc[gi] * (dot_body(xe + b0, qe + b0, len) + dot_body(xo + b0, qo + b0, len));
            }
            out[i * out_stride] = total;
        }
        return;
    }
    for (int64_t i = 0; i < nt; ++i) {
        const float* xe = xs + i * n;
        const float* xo = xe + half;
        float total = 0.0f;
        for (int64_t b0 = 0, gi = 0; b0 < half; b0 += gb, ++gi)
            total += sc[gi] * dot_int4_deint_body<NF4>(book, xe + b0, xo + b0, p + b0, std::min(gb, half - b0));
        out[i * out_stride] = total;
    }
}

// Row r of one slot against nt tokens: out[i] = row . x_i. With deint (int4 / nf4, even
// group and even n) xs holds each token as [x_even (n/2) | x_odd (n/2)].
LFM_ALWAYS_INLINE void row_dots_body(lfm_codec codec, const void* data_row, const float* sc, int64_t n, int64_t group,
                                     const float* xs, int64_t nt, float* q, float* out, int64_t out_stride,
                                     bool deint) {
    if (deint) {
        const uint8_t* p = static_cast<const uint8_t*>(data_row);
        if (codec == LFM_CODEC_NF4) row_dots_deint<true>(p, sc, n, group, xs, nt, q, out, out_stride);
        else row_dots_deint<false>(p, sc, n, group, xs, nt, q, out, out_stride);
        return;
    }
    if (codec == LFM_CODEC_SIGN1) {
        const uint32_t* w = static_cast<const uint32_t*>(data_row);
        for (int64_t i = 0; i < nt; ++i) out[i * out_stride] = sc[0] * dot_sign1_body(xs + i * n, w, n);
        return;
    }
    unpack_row(codec, data_row, n, q);
    for (int64_t i = 0; i < nt; ++i) out[i * out_stride] = dot_groups_body(xs + i * n, q, sc, n, group);
}

void row_dots_baseline(lfm_codec codec, const void* data_row, const float* sc, int64_t n, int64_t group,
                       const float* xs, int64_t nt, float* q, float* out, int64_t out_stride, bool deint) {
    row_dots_body(codec, data_row, sc, n, group, xs, nt, q, out, out_stride, deint);
}
#if defined(__x86_64__)
__attribute__((target("avx2,fma"))) void row_dots_avx2(lfm_codec codec, const void* data_row, const float* sc,
                                                       int64_t n, int64_t group, const float* xs, int64_t nt,
                                                       float* q, float* out, int64_t out_stride, bool deint) {
    row_dots_body(codec, data_row, sc, n, group, xs, nt, q, out, out_stride, deint);
}
#endif

using RowDotsFn = void (*)(lfm_codec, const void*, const float*, int64_t, int64_t, const float*, int64_t, float*,
                           float*, int64_t, bool);
RowDotsFn pick_row_dots() {
#if defined(__x86_64__)
    if (cpu_has_avx2()) return row_dots_avx2;
#endif
    return row_dots_baseline;
}

// ---- encode --------------------------------------------------------------------------

// Convert one float to the scale dtype and back: the value decode will see.
float round_to(lfm_dtype dt, float v) {
    switch (dt) {
        case LFM_DTYPE_F16: return f16_to_f32(f32_to_f16(v));
        case LFM_DTYPE_BF16: return bf16_to_f32(f32_to_bf16(v));
        default: return v;
    }
}

void store_one(lfm_dtype dt, void* base, int64_t idx, float v) { store_f32(&v, dt, static_cast<char*>(base) + idx * static_cast<int64_t>(dtype_size(dt)), 1); }

struct RowError {
    int64_t row = -1;
    int kind = 0;  // 1 = non-finite, 2 = scale overflow
};

// Encode hot loops (row in fp32 scratch), compiled twice like the decoders. No FMA in
// the AVX2 clone: the quantizer's true division and the magic-number rounding stay exact.
struct RowStats {
    bool finite;
    double abs_sum;  // sign1 only
};

LFM_ALWAYS_INLINE RowStats sign1_row_body(const float* buf, int64_t cols, uint32_t* w, int64_t pc) {
    bool finite = true;
    double part[8] = {0};
    int64_t c = 0;
    for (; c + 8 <= cols; c += 8)
        for (int j = 0; j < 8; ++j) {
            finite &= std::fabs(buf[c + j]) <= FLT_MAX;
            part[j] += std::fabs(static_cast<double>(buf[c + j]));
        }
    double tail = 0.0;
    for (; c < cols; ++c) {
        finite &= std::fabs(buf[c]) <= FLT_MAX;
        tail += std::fabs(static_cast<double>(buf[c]));
    }
    for (int64_t i = 0; i < pc; ++i) {
        uint32_t word = 0;
        const int64_t c0 = 32 * i, n = std::min<int64_t>(32, cols - c0);
        if (n == 32)
            for (int j = 0; j < 32; ++j) word |= static_cast<uint32_t>(buf[c0 + j] < 0.0f) << j;
        else
            for (int64_t j = 0; j < n; ++j) word |= static_cast<uint32_t>(buf[c0 + j] < 0.0f) << j;
        w[i] = word;
    }
    double sum = ((part[0] + part[1]) + (part[2] + part[3])) + ((part[4] + part[5]) + (part[6] + part[7])) + tail;
    return {finite, sum};
}

// Quantize elements [g0, g1) with the (already rounded) scale s into qb.
LFM_ALWAYS_INLINE float group_absmax_body(const float* buf, int64_t g0, int64_t g1, bool* finite) {
    float amax = 0.0f;
    bool ok = true;
    for (int64_t c = g0; c < g1; ++c) {
        const float v = std::fabs(buf[c]);
        ok &= v <= FLT_MAX;
        amax = amax > v ? amax : v;
    }
    *finite = ok;
    return amax;
}

LFM_ALWAYS_INLINE void quantize_group_body(const float* buf, int64_t g0, int64_t g1, float s, float fmax, int8_t* qb) {
    for (int64_t c = g0; c < g1; ++c) {
        float v = buf[c] / s;  // a true division, like the reference
        v = v < -fmax - 1.0f ? -fmax - 1.0f : (v > fmax + 1.0f ? fmax + 1.0f : v);
        v = rint_small(v);
        v = v < -fmax ? -fmax : (v > fmax ? fmax : v);
        qb[c] = static_cast<int8_t>(static_cast<int>(v));
    }
}

// NF4: code k = #{j : v > midpoint j} of the sorted code book (nearest level, a value on
// a midpoint takes the lower one), v = buf / s.
LFM_ALWAYS_INLINE void quantize_nf4_group_body(const float* buf, int64_t g0, int64_t g1, float s, int8_t* qb) {
    float mid[15];
    for (int j = 0; j < 15; ++j) mid[j] = (nf4_level(j) + nf4_level(j + 1)) * 0.5f;
    for (int64_t c = g0; c < g1; ++c) {
        const float v = buf[c] / s;  // a true division, like the reference
        int k = 0;
        for (int j = 0; j < 15; ++j) k += v > mid[j] ? 1 : 0;
        qb[c] = static_cast<int8_t>(k);
    }
}

struct EncodeFns {
    RowStats (*sign1_row)(const float*, int64_t, uint32_t*, int64_t);
    float (*absmax)(const float*, int64_t, int64_t, bool*);
    void (*quantize)(const float*, int64_t, int64_t, float, float, int8_t*);
    void (*quantize_nf4)(const float*, int64_t, int64_t, float, int8_t*);
};

RowStats sign1_row_base(const float* b, int64_t c, uint32_t* w, int64_t pc) { return sign1_row_body(b, c, w, pc); }
float absmax_base(const float* b, int64_t g0, int64_t g1, bool* f) { return group_absmax_body(b, g0, g1, f); }
void quantize_base(const float* b, int64_t g0, int64_t g1, float s, float m, int8_t* q) {
    quantize_group_body(b, g0, g1, s, m, q);
}
void quantize_nf4_base(const float* b, int64_t g0, int64_t g1, float s, int8_t* q) {
    quantize_nf4_group_body(b, g0, g1, s, q);
}
#if defined(__x86_64__)
__attribute__((target("avx2"))) RowStats sign1_row_avx2(const float* b, int64_t c, uint32_t* w, int64_t pc) {
    return sign1_row_body(b, c, w, pc);
}
__attribute__((target("avx2"))) float absmax_avx2(const float* b, int64_t g0, int64_t g1, bool* f) {
    return group_absmax_body(b, g0, g1, f);
}
__attribute__((target("avx2"))) void quantize_avx2(const float* b, int64_t g0, int64_t g1, float s, float m,
                                                   int8_t* q) {
    quantize_group_body(b, g0, g1, s, m, q);
}
__attribute__((target("avx2"))) void quantize_nf4_avx2(const float* b, int64_t g0, int64_t g1, float s, int8_t* q) {
    quantize_nf4_group_body(b, g0, g1, s, q);
}
#endif

EncodeFns pick_encode() {
#if defined(__x86_64__)
    if (cpu_has_avx2()) return {sign1_row_avx2, absmax_avx2, quantize_avx2, quantize_nf4_avx2};
#endif
    return {sign1_row_base, absmax_base, quantize_base, quantize_nf4_base};
}

}  // namespace

void encode_cpu(const CodecArgs& a) {
    const int64_t rows = a.rows, cols = a.cols;
    if (rows == 0) return;
    const int64_t rpt = rows_per_task(cols);
    const int64_t n_tasks = (rows + rpt - 1) / rpt;
    const int workers = plan_workers(n_tasks, a.n_threads);
    std::vector<std::vector<float>> scratch(static_cast<size_t>(workers), std::vector<float>(static_cast<size_t>(cols)));
    std::vector<std::vector<int8_t>> qbuf(static_cast<size_t>(workers), std::vector<int8_t>(static_cast<size_t>(cols) + 4));
    std::vector<double> row_sum(static_cast<size_t>(rows), 0.0);
    std::vector<RowError> errs(static_cast<size_t>(n_tasks));
    const size_t in_es = dtype_size(a.delta->dtype);
    const lfm_dtype sdt = a.scales->dtype;
    const bool nf4 = a.codec == LFM_CODEC_NF4;
    const int qmax = codec_qmax(a.codec);
    const int64_t pc = packed_cols(a.codec, cols);
    const float fmax = static_cast<float>(qmax);  // NF4: 1, the code book's max |level|
    const EncodeFns fns = pick_encode();

    parallel_for(n_tasks, a.n_threads, [&](int64_t task, int slot) {
        float* buf = scratch[static_cast<size_t>(slot)].data();
        int8_t* qb = qbuf[static_cast<size_t>(slot)].data();
        const int64_t r0 = task * rpt, r1 = std::min(rows, r0 + rpt);
        for (int64_t r = r0; r < r1; ++r) {
            load_f32(static_cast<const char*>(a.delta->data) + r * cols * static_cast<int64_t>(in_es),
                     a.delta->dtype, buf, cols);
            if (a.codec == LFM_CODEC_SIGN1) {
                const RowStats st = fns.sign1_row(buf, cols, static_cast<uint32_t*>(a.data->data) + r * pc, pc);
                if (!st.finite) {
                    errs[static_cast<size_t>(task)] = {r, 1};
                    return;
                }
                row_sum[static_cast<size_t>(r)] = st.abs_sum;
                continue;
            }
            for (int64_t g0 = 0, gi = 0; g0 < cols; g0 += a.group, ++gi) {
                const int64_t g1 = std::min(cols, g0 + a.group);
                bool finite = true;
                const float amax = fns.absmax(buf, g0, g1, &finite);
                if (!finite) {
                    errs[static_cast<size_t>(task)] = {r, 1};
                    return;
                }
                const float s = round_to(sdt, amax / fmax);
                if (!(std::fabs(s) <= FLT_MAX)) {
                    errs[static_cast<size_t>(task)] = {r, 2};
                    return;
                }
                store_one(sdt, a.scales->data, r * a.n_groups + gi, s);
                if (s > 0.0f && nf4)
                    fns.quantize_nf4(buf, g0, g1, s, qb);
                else if (s > 0.0f)
                    fns.quantize(buf, g0, g1, s, fmax, qb);
                else
                    std::memset(qb + g0, nf4 ? kNf4Zero : 0, static_cast<size_t>(g1 - g0));
            }
            uint8_t* dst = static_cast<uint8_t*>(a.data->data) + r * pc;
            if (a.codec == LFM_CODEC_INT8) {
                std::memcpy(dst, qb, static_cast<size_t>(cols));
            } else if (a.codec == LFM_CODEC_INT4 || nf4) {
                qb[cols] = 0;
                for (int64_t i = 0; i < pc; ++i)
                    dst[i] = static_cast<uint8_t>((qb[2 * i] & 0xF) | ((qb[2 * i + 1] & 0xF) << 4));
            } else {
                qb[cols] = qb[cols + 1] = qb[cols + 2] = 0;
                for (int64_t i = 0; i < pc; ++i)
                    dst[i] = static_cast<uint8_t>((qb[4 * i] & 3) | ((qb[4 * i + 1] & 3) << 2) |
                                                  ((qb[4 * i + 2] & 3) << 4) | ((qb[4 * i + 3] & 3) << 6));
            }
        }
    });
    for (const RowError& e : errs) {
        if (e.kind == 1) fail(LFM_STATUS_NONFINITE, "delta holds NaN or Inf in row ", e.row);
        if (e.kind == 2)
            fail(LFM_STATUS_INVALID_ARGUMENT, "a scale of row ", e.row, " overflows ", dtype_name(sdt),
                 " (|delta| too large); use float32 scales");
    }
    if (a.codec == LFM_CODEC_SIGN1) {
        auto put = [&](int64_t idx, double mean) {
            const float s = round_to(sdt, static_cast<float>(mean));
            if (!(std::fabs(s) <= FLT_MAX))
                fail(LFM_STATUS_INVALID_ARGUMENT, "sign1 scale overflows ", dtype_name(sdt), "; use float32 scales");
            store_one(sdt, a.scales->data, idx, s);
        };
        if (a.per_tensor) {
            double total = 0.0;
            for (double v : row_sum) total += v;
            put(0, (rows * cols) != 0 ? total / static_cast<double>(rows * cols) : 0.0);
        } else {
            for (int64_t r = 0; r < rows; ++r) put(r, cols ? row_sum[static_cast<size_t>(r)] / static_cast<double>(cols) : 0.0);
        }
    }
}

void decode_cpu(const CodecArgs& a) {
    const int64_t rows = a.rows, cols = a.cols;
    if (rows == 0 || cols == 0) return;
    const int64_t rpt = rows_per_task(cols);
    const int64_t n_tasks = (rows + rpt - 1) / rpt;
    const int workers = plan_workers(n_tasks, a.n_threads);
    const bool sign1 = a.codec == LFM_CODEC_SIGN1;
    const int64_t ns_row = sign1 ? 1 : a.n_groups;
    // Scratch per worker: q [cols], base/out row [cols], scales [ns_row].
    std::vector<std::vector<float>> scratch(static_cast<size_t>(workers),
                                            std::vector<float>(static_cast<size_t>(2 * cols + ns_row)));
    const int64_t pc = packed_cols(a.codec, cols);
    const size_t data_es = dtype_size(a.data->dtype), s_es = dtype_size(a.scales->dtype);
    const size_t out_es = dtype_size(a.out->dtype), base_es = a.base ? dtype_size(a.base->dtype) : 0;
    const DecodeRowFn decode_row = pick_decode_row();
    float per_tensor_scale = 0.0f;
    if (sign1 && a.per_tensor) load_f32(a.scales->data, a.scales->dtype, &per_tensor_scale, 1);

    parallel_for(n_tasks, a.n_threads, [&](int64_t task, int slot) {
        float* q = scratch[static_cast<size_t>(slot)].data();
        float* row = q + cols;
        float* s = row + cols;
        const int64_t r0 = task * rpt, r1 = std::min(rows, r0 + rpt);
        for (int64_t r = r0; r < r1; ++r) {
            if (sign1 && a.per_tensor) s[0] = per_tensor_scale;
            else load_f32(static_cast<const char*>(a.scales->data) + r * ns_row * static_cast<int64_t>(s_es),
                          a.scales->dtype, s, ns_row);
            const float* base = nullptr;
            if (a.base) {
                load_f32(static_cast<const char*>(a.base->data) + r * cols * static_cast<int64_t>(base_es),
                         a.base->dtype, row, cols);
                base = row;
            }
            decode_row(a.codec, static_cast<const char*>(a.data->data) + r * pc * static_cast<int64_t>(data_es), s,
                       cols, a.group, base, a.alpha, q, row);
            store_f32(row, a.out->dtype, static_cast<char*>(a.out->data) + r * cols * static_cast<int64_t>(out_es), cols);
        }
    });
}

void delta_apply_cpu(const DeltaApplyArgs& a) {
    const int64_t T = a.T, in = a.in, out = a.out;
    const int64_t S = static_cast<int64_t>(a.data.size());
    if (T == 0 || out == 0 || S == 0) return;
    // Group tokens by slot (counting sort, stable in token order).
    std::vector<int64_t> count(static_cast<size_t>(S + 1), 0), order(static_cast<size_t>(T));
    auto slot_of = [&](int64_t t) -> int64_t {
        return a.token_slot->dtype == LFM_DTYPE_I32 ? static_cast<const int32_t*>(a.token_slot->data)[t]
                                                    : static_cast<const int64_t*>(a.token_slot->data)[t];
    };
    for (int64_t t = 0; t < T; ++t) {
        const int64_t s = slot_of(t);
        if (s >= 0) ++count[static_cast<size_t>(s + 1)];
    }
    for (int64_t s = 0; s < S; ++s) count[static_cast<size_t>(s + 1)] += count[static_cast<size_t>(s)];
    std::vector<int64_t> fill(count.begin(), count.end() - 1);
    for (int64_t t = 0; t < T; ++t) {
        const int64_t s = slot_of(t);
        if (s >= 0) order[static_cast<size_t>(fill[static_cast<size_t>(s)]++)] = t;
    }
    const int64_t n_active = count[static_cast<size_t>(S)];
    if (n_active == 0 || in == 0) return;
    // Gather the active tokens' x rows as fp32, grouped by slot: [n_active, in].
    std::vector<float> xs(static_cast<size_t>(n_active * in));
    const size_t x_es = dtype_size(a.x->dtype), y_es = dtype_size(a.y->dtype);
    for (int64_t i = 0; i < n_active; ++i)
        load_f32(static_cast<const char*>(a.x->data) + order[static_cast<size_t>(i)] * in * static_cast<int64_t>(x_es),
                 a.x->dtype, xs.data() + i * in, in);
    // int4 / nf4 with even sizes: store each token de-interleaved (see dot_int4_deint_body).
    const bool deint = (a.codec == LFM_CODEC_INT4 || a.codec == LFM_CODEC_NF4) && a.group % 2 == 0 && in % 2 == 0;
    if (deint) {
        std::vector<float> tmp(static_cast<size_t>(in));
        for (int64_t i = 0; i < n_active; ++i) {
            float* row = xs.data() + i * in;
            std::memcpy(tmp.data(), row, static_cast<size_t>(in) * sizeof(float));
            for (int64_t c = 0; c < in / 2; ++c) {
                row[c] = tmp[static_cast<size_t>(2 * c)];
                row[in / 2 + c] = tmp[static_cast<size_t>(2 * c + 1)];
            }
        }
    }
    // Tasks: (slot, block of output rows). Each task decodes its rows once into scratch and
    // dots them with every token of its slot: decoded weights never leave L1/L2.
    const int64_t rb = 32;
    const int64_t blocks = (out + rb - 1) / rb;
    std::vector<int64_t> task_slot;
    for (int64_t s = 0; s < S; ++s)
        if (count[static_cast<size_t>(s + 1)] > count[static_cast<size_t>(s)]) task_slot.push_back(s);
    // Items are (slot, row block) in slot-major order, so a run of items (parallel_for_runs)
    // streams a contiguous stretch of one slot's codes.
    const int64_t n_items = static_cast<int64_t>(task_slot.size()) * blocks;
    const int workers = plan_workers(n_items, a.n_threads);
    const bool sign1 = a.codec == LFM_CODEC_SIGN1;
    const int64_t ns_row = sign1 ? 1 : a.n_groups;
    const int64_t pc = packed_cols(a.codec, in);
    const size_t data_es = a.codec == LFM_CODEC_SIGN1 ? 4 : 1, s_es = dtype_size(a.scale_dtype);
    const int64_t max_tok = [&] {
        int64_t m = 0;
        for (int64_t s = 0; s < S; ++s) m = std::max(m, count[static_cast<size_t>(s + 1)] - count[static_cast<size_t>(s)]);
        return m;
    }();
    // AVX-512 row blocks (delta_dots_avx512.h) for sign1 / de-interleaved int4 when the
    // sizes align; sign1 needs each token's sum of x once.
    const bool wide = (sign1 || deint) && delta_dots_avx512_ok(sign1, in, a.group, deint);
    std::vector<float> xsum(static_cast<size_t>(sign1 && wide ? n_active : 0));
    for (size_t i = 0; i < xsum.size(); ++i) {
        const float* xr = xs.data() + static_cast<int64_t>(i) * in;
        float s = 0.0f;
        for (int64_t c = 0; c < in; ++c) s += xr[c];
        xsum[i] = s;
    }
    std::vector<std::vector<float>> scratch(
        static_cast<size_t>(workers),
        std::vector<float>(static_cast<size_t>(2 * in + ns_row + rb * max_tok + rb + rb * ns_row)));
    const RowDotsFn row_dots = pick_row_dots();

    parallel_for_runs(n_items, a.n_threads, [&](int64_t item, int wslot) {
        const int64_t s = task_slot[static_cast<size_t>(item / blocks)];
        const int64_t r0 = (item % blocks) * rb, r1 = std::min(out, r0 + rb), nr = r1 - r0;
        const int64_t t0 = count[static_cast<size_t>(s)], nt = count[static_cast<size_t>(s + 1)] - t0;
        float* q = scratch[static_cast<size_t>(wslot)].data();
        float* sc = q + 2 * in;
        float* acc = sc + ns_row;  // [nt, nr]
        float* yrow = acc + rb * max_tok;
        const char* data = static_cast<const char*>(a.data[static_cast<size_t>(s)]);
        const char* scales = static_cast<const char*>(a.scales[static_cast<size_t>(s)]);
        if (wide) {
            float* bsc = yrow + rb;  // [nr, ns_row] fp32 scales of the block
            if (sign1 && a.per_tensor) {
                load_f32(scales, a.scale_dtype, bsc, 1);
                for (int64_t j = 1; j < nr; ++j) bsc[j] = bsc[0];
            } else {
                load_f32(scales + r0 * ns_row * static_cast<int64_t>(s_es), a.scale_dtype, bsc, nr * ns_row);
            }
            if (sign1)
                sign1_block_avx512(reinterpret_cast<const uint32_t*>(data) + r0 * pc, pc, nr, bsc,
                                   xs.data() + t0 * in, xsum.data() + t0, nt, in, acc);
            else
                int4_block_avx512(reinterpret_cast<const uint8_t*>(data) + r0 * pc, pc, nr, bsc, a.group,
                                  xs.data() + t0 * in, nt, in, acc, a.codec == LFM_CODEC_NF4);
        }
        for (int64_t r = wide ? r1 : r0; r < r1; ++r) {
            load_f32(scales + (sign1 && a.per_tensor ? 0 : r * ns_row) * static_cast<int64_t>(s_es), a.scale_dtype, sc,
                     ns_row);
            row_dots(a.codec, data + r * pc * static_cast<int64_t>(data_es), sc, in, a.group, xs.data() + t0 * in, nt,
                     q, acc + (r - r0), nr, deint);
        }
        // y[t, r0:r1] += alpha * acc (fp32, one rounding to y's dtype).
        for (int64_t i = 0; i < nt; ++i) {
            const int64_t t = order[static_cast<size_t>(t0 + i)];
            char* yp = static_cast<char*>(a.y->data) + (t * out + r0) * static_cast<int64_t>(y_es);
            load_f32(yp, a.y->dtype, yrow, nr);
            for (int64_t j = 0; j < nr; ++j) yrow[j] += a.alpha * acc[i * nr + j];
            store_f32(yrow, a.y->dtype, yp, nr);
        }
    });
}

}  // namespace lfm::codec
