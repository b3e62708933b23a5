#include "python/tensor_arg.h"

namespace lfm::py {

lfm_tensor to_view(const pyb::handle& h) {
    auto t = h.cast<pyb::tuple>();
    if (t.size() != 6) throw pyb::value_error("internal: a tensor view is a 6-tuple");
    lfm_tensor v{};
    v.data = reinterpret_cast<void*>(t[0].cast<uintptr_t>());
    v.dtype = static_cast<lfm_dtype>(t[1].cast<int>());
    v.device = static_cast<lfm_device_type>(t[2].cast<int>());
    v.device_id = t[3].cast<int>();
    auto shape = t[4].cast<std::vector<int64_t>>();
    auto strides = t[5].cast<std::vector<int64_t>>();
    if (shape.size() > LFM_MAX_DIMS || strides.size() != shape.size())
        throw pyb::value_error("tensors with more than 8 dimensions are not supported");
    v.ndim = static_cast<int32_t>(shape.size());
    for (size_t i = 0; i < shape.size(); ++i) {
        v.shape[i] = shape[i];
        v.strides[i] = strides[i];
    }
    return v;
}

std::vector<lfm_tensor> to_views(const pyb::sequence& seq) {
    std::vector<lfm_tensor> out;
    out.reserve(seq.size());
    for (auto h : seq) out.push_back(to_view(h));
    return out;
}

void check(lfm_status status) {
    if (status == LFM_STATUS_OK) return;
    std::string msg = lfm_last_error();
    switch (status) {
        case LFM_STATUS_UNSUPPORTED_DTYPE: throw pyb::type_error(msg);
        case LFM_STATUS_OUT_OF_RANGE: throw pyb::index_error(msg);
        case LFM_STATUS_INVALID_ARGUMENT:
        case LFM_STATUS_SHAPE_MISMATCH:
        case LFM_STATUS_NONFINITE: throw pyb::value_error(msg);
        case LFM_STATUS_OUT_OF_MEMORY: PyErr_SetString(PyExc_MemoryError, msg.c_str()); throw pyb::error_already_set();
        case LFM_STATUS_NOT_BUILT: PyErr_SetString(PyExc_NotImplementedError, msg.c_str()); throw pyb::error_already_set();
        default: throw std::runtime_error(msg);
    }
}

}  // namespace lfm::py
