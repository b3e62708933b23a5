#include "python/tensor_arg.h"

namespace lfm::py {

void bind_common(pyb::module_& m) {
    m.def("version", [] { return std::string(lfm_version()); });
    m.def("abi_version", [] { return lfm_abi_version(); });
    m.def("build_info", [] { return std::string(lfm_build_info()); });
    m.def("get_num_threads", [] { return lfm_get_num_threads(); });
    m.def("set_num_threads", [](int n) { check(lfm_set_num_threads(n)); });
    m.def("set_simd", [](const std::string& level) { check(lfm_set_simd(level.c_str())); });
}

}  // namespace lfm::py
