// C ABI of the fused merge: validation (once, here) then dispatch by device.
#include <cstring>

#include "core/status.h"
#include "kernels/merge/merge.h"
#include "kernels/merge/merge_methods_table.h"

extern "C" {

LFM_API void lfm_merge_options_init(lfm_merge_options* opts) {
    if (!opts) return;
    std::memset(opts, 0, sizeof(*opts));
    opts->struct_size = sizeof(lfm_merge_options);
    opts->method = LFM_MERGE_TIES;
    opts->normalize = -1;
    opts->rescale = -1;
    opts->lambda = lfm::merge::kDefaultLambda;
}

LFM_API lfm_status lfm_merge(const lfm_tensor* base, const lfm_tensor* models, const lfm_tensor* out,
                             const lfm_merge_options* opts, void* stream) {
    return lfm::guard("lfm_merge", [&] {
        lfm::merge::MergeArgs a = lfm::merge::resolve_merge_args(base, models, out, opts);
        if (out->device == LFM_DEVICE_CUDA) {
            if (a.n_nonfinite_out) *a.n_nonfinite_out = -1;  // not counted on the GPU (merge.h)
            lfm::merge::merge_cuda(a, stream);
        }
        else
            lfm::merge::merge_cpu(a);
    });
}

}  // extern "C"
