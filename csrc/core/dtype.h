// Scalar fp16/bf16 <-> fp32 conversions (host and device) and bulk CPU conversions
// with run-time SIMD dispatch. Rounding: round to nearest, ties to even; NaN stays NaN.
#pragma once
#include <cstdint>
#include <cstring>

#include "lfm/lfm.h"

#if defined(__CUDACC__)
#define LFM_HD __host__ __device__ __forceinline__
#else
#define LFM_HD inline
#endif

namespace lfm {

LFM_HD uint32_t f32_bits(float f) {
#if defined(__CUDA_ARCH__)
    return __float_as_uint(f);
#else
    uint32_t u;
    std::memcpy(&u, &f, 4);
    return u;
#endif
}

LFM_HD float bits_f32(uint32_t u) {
#if defined(__CUDA_ARCH__)
    return __uint_as_float(u);
#else
    float f;
    std::memcpy(&f, &u, 4);
    return f;
#endif
}

LFM_HD float bf16_to_f32(uint16_t h) { return bits_f32(static_cast<uint32_t>(h) << 16); }

LFM_HD uint16_t f32_to_bf16(float f) {
    uint32_t u = f32_bits(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40u);  // quiet NaN
    u += 0x7fffu + ((u >> 16) & 1u);
    return static_cast<uint16_t>(u >> 16);
}

LFM_HD float f16_to_f32(uint16_t h) {
    uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
    uint32_t exp = (h >> 10) & 0x1fu;
    uint32_t man = h & 0x3ffu;
    if (exp == 0) {
        if (man == 0) return bits_f32(sign);
        // subnormal: value = man * 2^-24
        float v = static_cast<float>(man) * 5.9604644775390625e-8f;
        return sign ? -v : v;
    }
    if (exp == 31) return bits_f32(sign | 0x7f800000u | (man << 13));
    return bits_f32(sign | ((exp + 112u) << 23) | (man << 13));
}

LFM_HD uint16_t f32_to_f16(float f) {
    uint32_t u = f32_bits(f);
    uint32_t sign = (u >> 16) & 0x8000u;
    uint32_t a = u & 0x7fffffffu;
    if (a > 0x7f800000u) return static_cast<uint16_t>(sign | 0x7e00u);  // NaN
    if (a >= 0x477ff000u) return static_cast<uint16_t>(sign | 0x7c00u);  // overflow -> inf (>= 65520)
    if (a < 0x38800000u) {
        // subnormal or zero in fp16: round a * 2^24 to an integer (ties to even)
        if (a < 0x33000000u) return static_cast<uint16_t>(sign);  // < 2^-25 rounds to 0
        uint32_t e = a >> 23;
        uint32_t m = (a & 0x7fffffu) | 0x800000u;
        uint32_t shift = 126u - e;  // 14..24
        uint32_t q = m >> shift;
        uint32_t rem = m & ((1u << shift) - 1u);
        uint32_t half = 1u << (shift - 1u);
        if (rem > half || (rem == half && (q & 1u))) ++q;
        return static_cast<uint16_t>(sign | q);
    }
    uint32_t r = a + 0xfffu + ((a >> 13) & 1u);  // round mantissa to 10 bits
    return static_cast<uint16_t>(sign | ((r - 0x38000000u) >> 13));
}

// Bulk conversions on the CPU (AVX2/F16C path picked at run time when available).
void load_f32(const void* src, lfm_dtype dt, float* dst, int64_t n);
void store_f32(const float* src, lfm_dtype dt, void* dst, int64_t n);

}  // namespace lfm
