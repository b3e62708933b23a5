// C ABI of the task-vector codecs: validation (once, in codec_args.cpp) then dispatch by device.
#include <cstring>

#include "core/status.h"
#include "kernels/codec/codec.h"

extern "C" {

LFM_API void lfm_codec_options_init(lfm_codec_options* opts) {
    if (!opts) return;
    std::memset(opts, 0, sizeof(*opts));
    opts->struct_size = sizeof(lfm_codec_options);
    opts->codec = LFM_CODEC_INT4;
    opts->group_size = 128;
    opts->alpha = 1.0;
}

LFM_API lfm_status lfm_codec_encode(const lfm_tensor* delta, const lfm_tensor* data, const lfm_tensor* scales,
                                    const lfm_codec_options* opts, void* /*stream*/) {
    return lfm::guard("lfm_codec_encode", [&] {
        lfm::codec::CodecArgs a = lfm::codec::resolve_encode_args(delta, data, scales, opts);
        lfm::codec::encode_cpu(a);
    });
}

LFM_API lfm_status lfm_codec_decode(const lfm_tensor* data, const lfm_tensor* scales, const lfm_tensor* base,
                                    const lfm_tensor* out, const lfm_codec_options* opts, void* stream) {
    return lfm::guard("lfm_codec_decode", [&] {
        lfm::codec::CodecArgs a = lfm::codec::resolve_decode_args(data, scales, base, out, opts);
        if (out->device == LFM_DEVICE_CUDA)
            lfm::codec::decode_cuda(a, stream);
        else
            lfm::codec::decode_cpu(a);
    });
}

LFM_API lfm_status lfm_delta_apply(const lfm_tensor* x, const lfm_tensor* data, const lfm_tensor* scales,
                                   int32_t n_slots, const lfm_tensor* token_slot, const lfm_tensor* y,
                                   const lfm_codec_options* opts, void* /*stream*/) {
    return lfm::guard("lfm_delta_apply", [&] {
        lfm::codec::DeltaApplyArgs a =
            lfm::codec::resolve_delta_apply_args(x, data, scales, n_slots, token_slot, y, opts);
        lfm::codec::delta_apply_cpu(a);
    });
}

}  // extern "C"
