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
LFM_HD int codec_bits(lfm_codec c) {
    return c == LFM_CODEC_INT8 ? 8 : (c == LFM_CODEC_INT4 || c == LFM_CODEC_NF4) ? 4 : c == LFM_CODEC_INT2 ? 2 : 1;
}
// Largest |value| of a code: INTn's qmax; NF4's code book spans [-1, 1]; sign1 +-1.
LFM_HD int codec_qmax(lfm_codec c) { return c == LFM_CODEC_INT8 ? 127 : c == LFM_CODEC_INT4 ? 7 : 1; }
// Scales per row of an INTn / NF4 row of cols elements: ceil(cols / group), without the
// overflow of (cols + group - 1) for a huge group (any group >= 1 is valid: one scale a row).
LFM_HD int64_t groups_per_row(int64_t cols, int64_t group) { return cols / group + (cols % group != 0 ? 1 : 0); }
// Units (bytes for INTn, uint32 words for SIGN1) per row of packed data.
LFM_HD int64_t packed_cols(lfm_codec c, int64_t cols) {
    switch (c) {
        case LFM_CODEC_SIGN1: return (cols + 31) / 32;
        case LFM_CODEC_INT8: return cols;
        case LFM_CODEC_INT4:
        case LFM_CODEC_NF4: return (cols + 1) / 2;
        default: return (cols + 3) / 4;
    }
}

// The NF4 code book (QLoRA, docs/spec/codec.md): the value of code k = 0..15, ascending,
// L[0] = -1, L[7] = 0, L[15] = 1. A switch, so host and device code share one table.
LFM_HD float nf4_level(int k) {
    switch (k & 15) {
        case 0: return -1.0f;
        case 1: return -0.6961928009986877f;
        case 2: return -0.5250730514526367f;
        case 3: return -0.39491748809814453f;
        case 4: return -0.28444138169288635f;
        case 5: return -0.18477343022823334f;
        case 6: return -0.09105003625154495f;
        case 7: return 0.0f;
        case 8: return 0.07958029955625534f;
        case 9: return 0.16093020141124725f;
        case 10: return 0.24611230194568634f;
        case 11: return 0.33791524171829224f;
        case 12: return 0.44070982985305786f;
        case 13: return 0.5626170039176941f;
        case 14: return 0.7229568362236023f;
        default: return 1.0f;
    }
}
constexpr int kNf4Zero = 7;  // the code of 0.0 (what an all-zero group encodes to)

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
