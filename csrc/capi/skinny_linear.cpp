// C ABI of the skinny-M linear: validation (once, in skinny_linear_args.cpp) then the CPU kernel.
#include <cstring>

#include "core/status.h"
#include "kernels/skinny_linear/skinny_linear.h"

extern "C" {

LFM_API void lfm_skinny_linear_options_init(lfm_skinny_linear_options* opts) {
    if (!opts) return;
    std::memset(opts, 0, sizeof(*opts));
    opts->struct_size = sizeof(lfm_skinny_linear_options);
}

LFM_API lfm_status lfm_skinny_linear(const lfm_tensor* x, const lfm_tensor* weight, const lfm_tensor* bias,
                                     const lfm_tensor* y, const lfm_skinny_linear_options* opts) {
    return lfm::guard("lfm_skinny_linear", [&] {
        lfm::skinny::skinny_linear_cpu(lfm::skinny::resolve_args(x, weight, bias, y, opts));
    });
}

}  // extern "C"
