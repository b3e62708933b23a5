// Helpers over lfm_tensor views: sizes, contiguity, checks with clear messages.
#pragma once
#include <cstdint>
#include <cstring>
#include <string>

#include "core/status.h"

namespace lfm {

// A C caller may store any int in an enum-typed field; loading an out-of-range value as a
// C++ enum is undefined behaviour, so codes are read as plain integers (the bytes, not an
// enum load) and validated before they are converted back to the enum type.
template <class E>
inline int enum_code(const E& e) {
    static_assert(sizeof(E) == sizeof(int), "C ABI enums are int-sized");
    int v;
    std::memcpy(&v, &e, sizeof v);
    return v;
}
inline bool valid_dtype_code(int c) { return c >= LFM_DTYPE_F32 && c <= LFM_DTYPE_U32; }
inline bool valid_device_code(int c) { return c == LFM_DEVICE_CPU || c == LFM_DEVICE_CUDA; }

size_t dtype_size(lfm_dtype dt);
const char* dtype_name(lfm_dtype dt);
bool is_float_dtype(lfm_dtype dt);  // f32, f16, bf16

int64_t numel(const lfm_tensor& t);
bool is_contiguous(const lfm_tensor& t);
std::string shape_str(const lfm_tensor& t);
bool same_shape(const lfm_tensor& a, const lfm_tensor& b);

// Checks that throw lfm::Error naming `what` (e.g. "model 2").
void check_view(const lfm_tensor* t, const char* what);  // non-null, sane ndim/shape, data set when numel>0
void check_float(const lfm_tensor& t, const std::string& what);
void check_dtype(const lfm_tensor& t, lfm_dtype dt, const std::string& what);
void check_contiguous(const lfm_tensor& t, const std::string& what);
void check_same_shape(const lfm_tensor& a, const lfm_tensor& b, const std::string& what_a,
                      const std::string& what_b);
void check_ndim(const lfm_tensor& t, int ndim, const std::string& what);
void check_device(const lfm_tensor& t, lfm_device_type dev, const std::string& what);

}  // namespace lfm
