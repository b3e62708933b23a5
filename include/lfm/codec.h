/*
 * Task-vector codecs (docs/spec/codec.md): encode, decode, fused decode-and-add, and the
 * batched compressed-delta matmul used to serve many fine-tunes of one base.
 * Included by lfm/lfm.h; do not include directly.
 *
 * Matrix view: a delta of shape S is [rows, cols] with rows = S[0], cols = prod(S[1:])
 * (1-D: rows = 1). Layouts (element (r, c), "little-end first"):
 *   SIGN1  data uint32 [rows, ceil(cols/32)]: bit c%32 of word c/32 is 1 iff delta < 0;
 *          scales [rows] (or [1] with per_tensor) = mean |delta| of the row (tensor);
 *          decode: (bit ? -s : +s).
 *   INT8   data int8  [rows, cols];
 *   INT4   data uint8 [rows, ceil(cols/2)], low nibble = even c, 4-bit two's complement;
 *   INT2   data uint8 [rows, ceil(cols/4)], bits 2*(c%4), 2-bit two's complement;
 *          scales [rows, ceil(cols/g)] = round_to_scale_dtype(absmax(group) / qmax),
 *          qmax = 127 / 7 / 1; q = clamp(rint_half_even(delta / s), -qmax, qmax), 0 if s == 0;
 *          decode: q * s.
 *   NF4    data uint8 [rows, ceil(cols/2)], low nibble = even c, the nibble is a code
 *          k in 0..15 of the NF4 code book L (QLoRA's 16 normal-quantile levels in
 *          [-1, 1], L[7] = 0; docs/spec/codec.md lists them); scales [rows, ceil(cols/g)]
 *          = round_to_scale_dtype(absmax(group)); k = #{j : delta / s > (L[j] + L[j+1]) / 2},
 *          7 (zero) if s == 0; decode: L[k] * s.
 * Scales may be f16 (the format's default), f32 or bf16. All arithmetic is fp32.
 */
#ifndef LFM_CODEC_H
#define LFM_CODEC_H

#ifdef __cplusplus
extern "C" {
#endif

typedef LFM_ENUM(lfm_codec) {
    LFM_CODEC_SIGN1 = 0,
    LFM_CODEC_INT8 = 1,
    LFM_CODEC_INT4 = 2,
    LFM_CODEC_INT2 = 3,
    LFM_CODEC_NF4 = 4
} lfm_codec;

typedef struct lfm_codec_options {
    size_t struct_size;   /* = sizeof(lfm_codec_options), set by init */
    lfm_codec codec;
    int64_t group_size;   /* INTn: elements per scale along cols (default 128) */
    int32_t per_tensor;   /* SIGN1: one scale for the whole tensor (default 0: per row) */
    double alpha;         /* decode: out = base + alpha * delta_hat (default 1) */
    int32_t n_threads;    /* CPU workers for this call; 0 = library default */
} lfm_codec_options;

LFM_API void lfm_codec_options_init(lfm_codec_options* opts);

/* Encode a finite float delta (f32/f16/bf16, contiguous, CPU) into data + scales
 * (caller-allocated with the layout above). NaN/Inf -> LFM_STATUS_NONFINITE; a scale
 * that overflows the scale dtype -> LFM_STATUS_INVALID_ARGUMENT. */
LFM_API lfm_status lfm_codec_encode(const lfm_tensor* delta, const lfm_tensor* data, const lfm_tensor* scales,
                                    const lfm_codec_options* opts, void* stream);

/* out = base + alpha * decode(data, scales), or out = alpha * decode(...) when base is NULL.
 * out (f32/f16/bf16, contiguous) gives the shape; base has out's shape, any float dtype,
 * and may be the same memory as out (in-place add). CPU or CUDA (stream = cudaStream_t). */
LFM_API lfm_status lfm_codec_decode(const lfm_tensor* data, const lfm_tensor* scales, const lfm_tensor* base,
                                    const lfm_tensor* out, const lfm_codec_options* opts, void* stream);

/* Batched compressed-delta matmul, without materialising any decoded matrix:
 *   y[t, :] += alpha * x[t, :] @ decode(data[s], scales[s])^T,  s = token_slot[t]
 * x [T, in] f32/f16/bf16; y [T, out] f32/f16/bf16 (read-modify-write);
 * data/scales: n_slots views, each the layout above for an [out, in] delta (all slots
 * one codec); token_slot [T] int32 or int64, -1 = no delta for that token,
 * otherwise in [0, n_slots) (else LFM_STATUS_OUT_OF_RANGE). CPU. */
LFM_API lfm_status lfm_delta_apply(const lfm_tensor* x, const lfm_tensor* data, const lfm_tensor* scales,
                                   int32_t n_slots, const lfm_tensor* token_slot, const lfm_tensor* y,
                                   const lfm_codec_options* opts, void* stream);

#ifdef __cplusplus
}
#endif

#endif /* LFM_CODEC_H */
