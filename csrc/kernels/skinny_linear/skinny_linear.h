// Skinny-M linear y = x W^T (+ b) for M <= 16 (docs/spec/skinny_linear.md): torch-free launcher.
//
// Plan: x is copied once into a block that stays in L1/L2 for the whole call (fp32 [M, K];
// bf16 x with bf16 W on AVX512_BF16 stays bf16 for vdpbf16ps); the N output rows are split
// into tasks for the thread pool; inside a task a pass reads R rows of W once and does
// R x M fused multiply-adds per 16 weights (AVX-512) / 8 weights (AVX2), keeping the R x M
// partial sums in registers. W is streamed from memory exactly once per call, whatever M
// is, so M rows cost the read of W plus M/16 FMAs per weight (measured on a shared Zen 4
// core, fp32, M = 8: 1.7-2.1x the M = 1 call, torch 1.9-2.8x; bench/RESULTS.md).
#pragma once
#include <cstdint>

#include "lfm/lfm.h"

namespace lfm::skinny {

constexpr int64_t kMaxM = LFM_SKINNY_LINEAR_MAX_M;

struct Args {
    int64_t M = 0, N = 0, K = 0;
    const void* x = nullptr;
    lfm_dtype x_dt = LFM_DTYPE_F32;
    int64_t x_ld = 0;
    const void* w = nullptr;  // [N, K] contiguous
    lfm_dtype w_dt = LFM_DTYPE_F32;
    const void* bias = nullptr;  // [N] or null
    lfm_dtype b_dt = LFM_DTYPE_F32;
    void* y = nullptr;
    lfm_dtype y_dt = LFM_DTYPE_F32;
    int64_t y_ld = 0;
    int n_threads = 0;
};

Args resolve_args(const lfm_tensor* x, const lfm_tensor* w, const lfm_tensor* bias, const lfm_tensor* y,
                  const lfm_skinny_linear_options* opts);

void skinny_linear_cpu(const Args& a);

// Row kernels, one per SIMD level: out[(n - n0) * ldo + m] += sum_k xs[m * ldx + k] * W[n, k] for
// m < M, n0 <= n < n1 (fp32, the level's summation order); the driver zeroes out first.
// xs: fp32 [M, K], row stride ldx. The AVX-512 kernel needs ldo == M.
void rows_baseline(const float* xs, int64_t ldx, int64_t M, int64_t K, const void* w, lfm_dtype w_dt, int64_t n0, int64_t n1,
                   float* out, int64_t ldo);
// Usable on this CPU at the active SIMD level for this weight dtype?
bool avx2_ok(lfm_dtype w_dt);
void rows_avx2(const float* xs, int64_t ldx, int64_t M, int64_t K, const void* w, lfm_dtype w_dt, int64_t n0, int64_t n1,
               float* out, int64_t ldo);
bool avx512_ok(lfm_dtype w_dt);
void rows_avx512(const float* xs, int64_t ldx, int64_t M, int64_t K, const void* w, lfm_dtype w_dt, int64_t n0, int64_t n1,
                 float* out, int64_t ldo);

// bf16 x and bf16 W on a CPU with AVX512_BF16 (vdpbf16ps) at the AVX-512 level: x stays bf16
// in xs16 [M, ldx16] (ldx16 >= K rounded up to 32, zero past K); out as rows_*, ldo == M.
bool avx512_bf16_dot_ok(lfm_dtype x_dt, lfm_dtype w_dt);
void rows_avx512_bf16_dot(const uint16_t* xs16, int64_t ldx16, int64_t M, int64_t K, const void* w, int64_t n0,
                          int64_t n1, float* out);

}  // namespace lfm::skinny
