// C ABI of the multi-LoRA ops: validation (once, in resolve_lora_args) then dispatch by device.
#include <cstring>

#include "core/status.h"
#include "kernels/lora/lora.h"

namespace {

lfm_status run(const char* where, lfm::lora::Op op, const lfm_tensor* in, const lfm_lora_slice* slices,
               int32_t n_slices, const lfm_tensor* token_slot, const lfm_tensor* seg_start,
               const lfm_tensor* seg_slot, const lfm_tensor* out, const lfm_lora_options* opts, void* stream) {
    return lfm::guard(where, [&] {
        lfm::lora::LoraArgs a =
            lfm::lora::resolve_lora_args(op, in, slices, n_slices, token_slot, seg_start, seg_slot, out, opts);
        a.name = where;
        if (a.device == LFM_DEVICE_CUDA)
            lfm::lora::lora_cuda(a, stream);
        else
            lfm::lora::lora_cpu(a);
    });
}

}  // namespace

extern "C" {

LFM_API void lfm_lora_options_init(lfm_lora_options* opts) {
    if (!opts) return;
    std::memset(opts, 0, sizeof(*opts));
    opts->struct_size = sizeof(lfm_lora_options);
    opts->check_values = 1;
}

LFM_API lfm_status lfm_lora_shrink(const lfm_tensor* x, const lfm_lora_slice* slices, int32_t n_slices,
                                   const lfm_tensor* token_slot, const lfm_tensor* seg_start,
                                   const lfm_tensor* seg_slot, const lfm_tensor* u, const lfm_lora_options* opts,
                                   void* stream) {
    return run("lfm_lora_shrink", lfm::lora::Op::Shrink, x, slices, n_slices, token_slot, seg_start, seg_slot, u,
               opts, stream);
}

LFM_API lfm_status lfm_lora_expand(const lfm_tensor* u, const lfm_lora_slice* slices, int32_t n_slices,
                                   const lfm_tensor* token_slot, const lfm_tensor* seg_start,
                                   const lfm_tensor* seg_slot, const lfm_tensor* y, const lfm_lora_options* opts,
                                   void* stream) {
    return run("lfm_lora_expand", lfm::lora::Op::Expand, u, slices, n_slices, token_slot, seg_start, seg_slot, y,
               opts, stream);
}

LFM_API lfm_status lfm_lora_apply(const lfm_tensor* x, const lfm_lora_slice* slices, int32_t n_slices,
                                  const lfm_tensor* token_slot, const lfm_tensor* seg_start,
                                  const lfm_tensor* seg_slot, const lfm_tensor* y, const lfm_lora_options* opts,
                                  void* stream) {
    return run("lfm_lora_apply", lfm::lora::Op::Apply, x, slices, n_slices, token_slot, seg_start, seg_slot, y,
               opts, stream);
}

}  // extern "C"
