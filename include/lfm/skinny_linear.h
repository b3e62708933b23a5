/*
 * Skinny-M linear (docs/spec/skinny_linear.md): the base matmul of a small decode batch.
 * Included by lfm/lfm.h; do not include directly.
 *
 *   y[m, n] = round_y( sum_k x[m, k] * W[n, k]  (+ bias[n]) ),   m < M, n < N
 *
 * x [M, K], W [N, K] (the nn.Linear weight layout), bias [N] or NULL, y [M, N].
 * 0 <= M <= LFM_SKINNY_LINEAR_MAX_M. x, W, bias, y: f32/f16/bf16, each its own dtype;
 * products and sums are fp32, bias is added in fp32, y is rounded once to its dtype.
 * The summation order is the kernel's (fp32 lanes, not torch's): every output is within
 * the fp32 bound of docs/spec/skinny_linear.md of the exact result.
 * W and bias must be contiguous; x and y need unit stride along their last dimension
 * (any row stride). CPU only. W is read once per call (M rows of x stay in cache), which
 * is what makes M = 8 cost about as much as M = 1 on a memory-bound CPU.
 *
 * Errors: M > LFM_SKINNY_LINEAR_MAX_M, a non-contiguous W or bias, strided columns, a CUDA
 * view -> LFM_STATUS_INVALID_ARGUMENT; shapes -> LFM_STATUS_SHAPE_MISMATCH; dtypes ->
 * LFM_STATUS_UNSUPPORTED_DTYPE.
 */
#ifndef LFM_SKINNY_LINEAR_H
#define LFM_SKINNY_LINEAR_H

#ifdef __cplusplus
extern "C" {
#endif

#define LFM_SKINNY_LINEAR_MAX_M 16

typedef struct lfm_skinny_linear_options {
    size_t struct_size;   /* = sizeof(lfm_skinny_linear_options), set by init */
    int32_t n_threads;    /* CPU workers for this call; 0 = library default */
} lfm_skinny_linear_options;

LFM_API void lfm_skinny_linear_options_init(lfm_skinny_linear_options* opts);

/* y = x @ W^T (+ bias), written in full (opts may be NULL: defaults). */
LFM_API lfm_status lfm_skinny_linear(const lfm_tensor* x, const lfm_tensor* weight, const lfm_tensor* bias,
                                     const lfm_tensor* y, const lfm_skinny_linear_options* opts);

#ifdef __cplusplus
}
#endif

#endif /* LFM_SKINNY_LINEAR_H */
