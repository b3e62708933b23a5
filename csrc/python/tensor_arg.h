// Python <-> C ABI glue shared by the bind_<op>.cpp files.
// A tensor travels from Python as a tuple (data_ptr, dtype, device, device_id, shape, strides)
// built by lfm_engine/_tensor.py; statuses become Python exceptions with lfm_last_error().
#pragma once
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <string>
#include <vector>

#include "lfm/lfm.h"

namespace lfm::py {

namespace pyb = pybind11;

lfm_tensor to_view(const pyb::handle& h);
std::vector<lfm_tensor> to_views(const pyb::sequence& seq);
// Raise the Python exception that matches `status`, with lfm_last_error() as message.
void check(lfm_status status);

}  // namespace lfm::py
