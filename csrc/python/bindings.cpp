// lfm_engine._C: a thin pybind11 skin over the C ABI (include/lfm/lfm.h).
// Each op family binds itself in bind_<op>.cpp; add one line below per family.
#include "python/tensor_arg.h"

namespace lfm::py {
void bind_common(pyb::module_& m);
void bind_merge(pyb::module_& m);
void bind_lora(pyb::module_& m);
void bind_codec(pyb::module_& m);
void bind_skinny_linear(pyb::module_& m);
}  // namespace lfm::py

PYBIND11_MODULE(_C, m) {
    m.doc() = "lfm_engine native core (C ABI skin)";
    lfm::py::bind_common(m);
    lfm::py::bind_merge(m);
    lfm::py::bind_lora(m);
    lfm::py::bind_codec(m);
    lfm::py::bind_skinny_linear(m);
}
