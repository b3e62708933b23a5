// Task-vector codecs (docs/spec/codec.md, include/lfm/codec.h): torch-free launchers.
//
// CodecArgs / DeltaApplyArgs are the validated forms of the C ABI arguments, built once
// by codec_args.cpp so every backend sees the same checks. Shapes (matrix view):
// rows = shape[0], cols = prod(shape[1:]) (1-D: rows = 1, 0-D: 1 x 1).
#pragma once
#include <cstdint>
#include <vector>

#include "core/dtype.h"
#include "core/status.h"
#include "lfm/lfm.h"

namespace lfm::codec {

// Element layout helpers shared by the CPU and CUDA kernels.
LFM_HD int codec_bits(lfm_codec c) { return c == LFM_CODEC_INT8 ? 8 : c == LFM_CODEC_INT4 ? 4 : c == LFM_CODEC_INT2 ? 2 : 1; }
LFM_HD int codec_qmax(lfm_codec c) { return c == LFM_CODEC_INT8 ? 127 : c == LFM_CODEC_INT4 ? 7 : 1; }
// Units (bytes for INTn, uint32 words for SIGN1) per row of packed data.
LFM_HD int64_t packed_cols(lfm_codec c, int64_t cols) {
    switch (c) {
        case LFM_CODEC_SIGN1: return (cols + 31) / 32;
        case LFM_CODEC_INT8: return cols;
        case LFM_CODEC_INT4: return (cols + 1) / 2;
        default: return (cols + 3) / 4;
    }
}

struct CodecArgs {
    lfm_codec codec = LFM_CODEC_INT4;
    int64_t rows = 0, cols = 0;
    int64_t group = 128;       // INTn group size
    int64_t n_groups = 0;      // INTn: ceil(cols / group) scales per row
    bool per_tensor = false;   // SIGN1
    float alpha = 1.0f;
    int n_threads = 0;
    const lfm_tensor* delta = nullptr;  // encode input
    const lfm_tensor* data = nullptr;
    const lfm_tensor* scales = nullptr;
    const lfm_tensor* base = nullptr;   // decode: may be null
    const lfm_tensor* out = nullptr;    // decode output
};

struct DeltaApplyArgs {
    lfm_codec codec = LFM_CODEC_INT4;
    int64_t T = 0, in = 0, out = 0;
    int64_t group = 128, n_groups = 0;
    bool per_tensor = false;
    float alpha = 1.0f;
    int n_threads = 0;
    const lfm_tensor* x = nullptr;
    const lfm_tensor* y = nullptr;
    const lfm_tensor* token_slot = nullptr;
    std::vector<const void*> data, scales;  // per slot
    lfm_dtype scale_dtype = LFM_DTYPE_F16;
};

void matrix_view(const lfm_tensor& t, int64_t* rows, int64_t* cols);
CodecArgs resolve_encode_args(const lfm_tensor* delta, const lfm_tensor* data, const lfm_tensor* scales,
                              const lfm_codec_options* opts);
CodecArgs resolve_decode_args(const lfm_tensor* data, const lfm_tensor* scales, const lfm_tensor* base,
                              const lfm_tensor* out, const lfm_codec_options* opts);
DeltaApplyArgs resolve_delta_apply_args(const lfm_tensor* x, const lfm_tensor* data, const lfm_tensor* scales,
                                        int32_t n_slots, const lfm_tensor* token_slot, const lfm_tensor* y,
                                        const lfm_codec_options* opts);

void encode_cpu(const CodecArgs& a);
void decode_cpu(const CodecArgs& a);
void delta_apply_cpu(const DeltaApplyArgs& a);
#ifdef LFM_HAVE_CUDA
void decode_cuda(const CodecArgs& a, void* stream);
#else
[[noreturn]] inline void decode_cuda(const CodecArgs&, void*) { fail_no_cuda("codec decode"); }
#endif

}  // namespace lfm::codec
