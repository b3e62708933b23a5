// Helpers over lfm_tensor views: sizes, contiguity, checks with clear messages.
#pragma once
#include <cstdint>
#include <string>

#include "core/status.h"

namespace lfm {

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
