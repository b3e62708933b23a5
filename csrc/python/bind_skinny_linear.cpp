// pybind11 skin of lfm_skinny_linear.
#include "python/tensor_arg.h"

namespace lfm::py {

void bind_skinny_linear(pyb::module_& m) {
    m.attr("SKINNY_LINEAR_MAX_M") = LFM_SKINNY_LINEAR_MAX_M;
    m.def(
        "skinny_linear",
        [](pyb::handle x, pyb::handle w, pyb::object bias, pyb::handle y, int n_threads) {
            lfm_tensor xv = to_view(x), wv = to_view(w), yv = to_view(y), bv{};
            const bool has_bias = !bias.is_none();
            if (has_bias) bv = to_view(bias);
            lfm_skinny_linear_options o;
            lfm_skinny_linear_options_init(&o);
            o.n_threads = n_threads;
            lfm_status st;
            {
                pyb::gil_scoped_release release;
                st = lfm_skinny_linear(&xv, &wv, has_bias ? &bv : nullptr, &yv, &o);
            }
            check(st);
        },
        pyb::arg("x"), pyb::arg("weight"), pyb::arg("bias"), pyb::arg("y"), pyb::arg("n_threads"));
}

}  // namespace lfm::py
