// AVX-512 row-block dot products of delta_apply (codec_cpu.cpp): one slot, a block of
// output rows, nt tokens. Decoded weights never exist, not even per row:
//   sign1: dot(row, x) = scale_r · (Σ_c x[c] − 2 Σ_{c: bit set} x[c]); the second sum is one
//          masked add per 16 columns straight from the sign bits (k-mask loaded from
//          memory), Σx once per token. Four rows per pass share each x load and give eight
//          independent add chains; their four sums are reduced together.
//   int4 / nf4:  x de-interleaved (even columns, then odd ones); 16 bytes -> 32 codes per step:
//          sign-extend bytes to int32, the low nibble by shift-left 28 / arithmetic
//          shift-right 28, the high one by arithmetic shift-right 4, to float, FMA with x;
//          one FMA per group applies the group's scale to the group's vector sum. (A
//          vpermps table lookup of the nibbles, 128 codes per 64-byte load, was tried: faster
//          with the codes in cache, slower streaming from memory on Zen 4; not kept.)
// Summation order differs from the scalar/AVX2 row dots (fp32 sums in 16 lanes): results
// agree within float rounding, not bit for bit.
#pragma once
#include <cstdint>

namespace lfm::codec {

// Usable for these sizes on this CPU (AVX-512 level active and the shapes' alignment)?
bool delta_dots_avx512_ok(bool sign1, int64_t in, int64_t group, bool deint);

// acc[i * nr + j] = dot(row r0 + j, token i), j < nr, scaled by the row's scale(s).
//   words: sign bits of row r0 ([nr, in/32] uint32, row stride wpr words);
//   row_scale: [nr] fp32 (a per-tensor scale repeated).
void sign1_block_avx512(const uint32_t* words, int64_t wpr, int64_t nr, const float* row_scale, const float* xs,
                        const float* xsum, int64_t nt, int64_t in, float* acc);
//   packed: int4 bytes of row r0 ([nr, in/2], row stride bpr bytes); scales [nr, in/group] fp32;
//   xs: each token de-interleaved ([x_even | x_odd], in floats per token);
//   nf4: the nibbles are NF4 codes (values from the code book by vpermps), else int4.
void int4_block_avx512(const uint8_t* packed, int64_t bpr, int64_t nr, const float* scales, int64_t group,
                       const float* xs, int64_t nt, int64_t in, float* acc, bool nf4);

}  // namespace lfm::codec
