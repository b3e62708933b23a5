/*
 * Multi-LoRA batched ops (docs/spec/lora.md): shrink, expand and fused apply.
 * Included by lfm/lfm.h; do not include directly.
 *
 * For token t using slot s of a layer's slot table (s = -1: no adapter, y[t] untouched):
 *   shrink: u[t, :r_s]            = x[t, :] . A[s, :r_s, :]^T                 (fp32)
 *   expand: y[t, off:off+H_out]  += scale[s] * u[t, :r_s] . B[s, :, :r_s]^T
 *   apply:  both, fused.
 * Shapes (elements): x [T, H_in]; A [n_slots, R_max, H_in]; B [n_slots, H_out, R_max];
 * ranks int32 [n_slots] (0 <= r <= R_max); scales f32 [n_slots]; u f32 [n_slices, T, R_max]
 * (2-D [T, R_max] allowed when there is one slice); y [T, H_y] with off + H_out <= H_y.
 * x, A, B, y: f32/f16/bf16, each its own dtype; accumulation is fp32 and y is rounded once.
 * A, B, ranks, scales, token_slot, seg_* and u must be contiguous; x and y need unit stride
 * along their last dimension (any row stride).
 *
 * Slot map: either token_slot (int32 [T]) or the segment form seg_start (int32 [S+1],
 * non-decreasing, 0 .. T) + seg_slot (int32 [S]); pass NULL for the unused form.
 * Multi-slice: an array of n_slices lfm_lora_slice (fused qkv / gate_up in one call); all
 * slices share n_slots; their column ranges in y must not overlap.
 *
 * Errors: slot < -1 or >= n_slots -> LFM_STATUS_OUT_OF_RANGE; rank outside 0..R_max, bad
 * segments, overlapping slices, non-finite scale -> LFM_STATUS_INVALID_ARGUMENT; shapes ->
 * LFM_STATUS_SHAPE_MISMATCH; dtypes -> LFM_STATUS_UNSUPPORTED_DTYPE. Value checks read the
 * slot map, ranks and scales: free on the CPU, one device->host copy for CUDA views (set
 * options.check_values = 0 to skip it; the kernels still never read out of bounds: an
 * out-of-range slot is treated as "no adapter", ranks are clamped to 0..R_max).
 * For CUDA views, `stream` is a cudaStream_t (NULL = default stream); ignored on the CPU.
 */
#ifndef LFM_LORA_H
#define LFM_LORA_H

#ifdef __cplusplus
extern "C" {
#endif

#define LFM_LORA_MAX_SLICES 16

typedef struct lfm_lora_slice {
    const lfm_tensor* A;       /* [n_slots, R_max, H_in]; unused (may be NULL) by lfm_lora_expand */
    const lfm_tensor* B;       /* [n_slots, H_out, R_max]; unused (may be NULL) by lfm_lora_shrink */
    const lfm_tensor* ranks;   /* int32 [n_slots] */
    const lfm_tensor* scales;  /* float32 [n_slots]; unused (may be NULL) by lfm_lora_shrink */
    int64_t y_col_offset;      /* first column of this slice in y; unused by shrink */
} lfm_lora_slice;

typedef struct lfm_lora_options {
    size_t struct_size;        /* = sizeof(lfm_lora_options), set by init */
    int32_t check_values;      /* 1 (default): check slot map, ranks, scales before launch */
    int32_t n_threads;         /* CPU workers for this call; 0 = library default */
} lfm_lora_options;

LFM_API void lfm_lora_options_init(lfm_lora_options* opts);

/* u[i] = shrink of slice i (u fully written: zero beyond each token's rank and for slot -1). */
LFM_API lfm_status lfm_lora_shrink(const lfm_tensor* x, const lfm_lora_slice* slices, int32_t n_slices,
                                   const lfm_tensor* token_slot, const lfm_tensor* seg_start,
                                   const lfm_tensor* seg_slot, const lfm_tensor* u,
                                   const lfm_lora_options* opts, void* stream);

/* y[:, off_i : off_i + H_out_i] += expand of u[i], in place. */
LFM_API lfm_status lfm_lora_expand(const lfm_tensor* u, const lfm_lora_slice* slices, int32_t n_slices,
                                   const lfm_tensor* token_slot, const lfm_tensor* seg_start,
                                   const lfm_tensor* seg_slot, const lfm_tensor* y,
                                   const lfm_lora_options* opts, void* stream);

/* Fused shrink + expand of every slice; the fp32 intermediate stays on chip / in cache. */
LFM_API lfm_status lfm_lora_apply(const lfm_tensor* x, const lfm_lora_slice* slices, int32_t n_slices,
                                  const lfm_tensor* token_slot, const lfm_tensor* seg_start,
                                  const lfm_tensor* seg_slot, const lfm_tensor* y,
                                  const lfm_lora_options* opts, void* stream);

#ifdef __cplusplus
}
#endif

#endif /* LFM_LORA_H */
