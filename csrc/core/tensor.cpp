#include "core/tensor.h"

namespace lfm {

size_t dtype_size(lfm_dtype dt) {
    switch (dt) {
        case LFM_DTYPE_F32: case LFM_DTYPE_I32: case LFM_DTYPE_U32: return 4;
        case LFM_DTYPE_F16: case LFM_DTYPE_BF16: return 2;
        case LFM_DTYPE_I64: return 8;
        case LFM_DTYPE_U8: case LFM_DTYPE_I8: return 1;
    }
    fail(LFM_STATUS_UNSUPPORTED_DTYPE, "unknown dtype code ", static_cast<int>(dt));
}

const char* dtype_name(lfm_dtype dt) {
    switch (dt) {
        case LFM_DTYPE_F32: return "float32";
        case LFM_DTYPE_F16: return "float16";
        case LFM_DTYPE_BF16: return "bfloat16";
        case LFM_DTYPE_I32: return "int32";
        case LFM_DTYPE_I64: return "int64";
        case LFM_DTYPE_U8: return "uint8";
        case LFM_DTYPE_I8: return "int8";
        case LFM_DTYPE_U32: return "uint32";
    }
    return "unknown";
}

bool is_float_dtype(lfm_dtype dt) {
    return dt == LFM_DTYPE_F32 || dt == LFM_DTYPE_F16 || dt == LFM_DTYPE_BF16;
}

int64_t numel(const lfm_tensor& t) {
    int64_t n = 1;
    for (int i = 0; i < t.ndim; ++i) n *= t.shape[i];
    return n;
}

bool is_contiguous(const lfm_tensor& t) {
    int64_t expect = 1;
    for (int i = t.ndim - 1; i >= 0; --i) {
        if (t.shape[i] != 1 && t.strides[i] != expect) return false;
        expect *= t.shape[i];
    }
    return true;
}

std::string shape_str(const lfm_tensor& t) {
    std::string s = "[";
    for (int i = 0; i < t.ndim; ++i) {
        if (i) s += ", ";
        s += std::to_string(t.shape[i]);
    }
    return s + "]";
}

bool same_shape(const lfm_tensor& a, const lfm_tensor& b) {
    if (a.ndim != b.ndim) return false;
    for (int i = 0; i < a.ndim; ++i)
        if (a.shape[i] != b.shape[i]) return false;
    return true;
}

void check_view(const lfm_tensor* t, const char* what) {
    if (!t) fail(LFM_STATUS_INVALID_ARGUMENT, what, " is NULL");
    if (t->ndim < 0 || t->ndim > LFM_MAX_DIMS)
        fail(LFM_STATUS_INVALID_ARGUMENT, what, " has ndim ", t->ndim, " (must be 0..", LFM_MAX_DIMS, ")");
    for (int i = 0; i < t->ndim; ++i)
        if (t->shape[i] < 0) fail(LFM_STATUS_INVALID_ARGUMENT, what, " has a negative dimension ", shape_str(*t));
    const size_t esize = dtype_size(t->dtype);  // throws on an unknown dtype code
    // The byte size of the non-zero dimensions must fit in int64, so no size or offset
    // computed from the shape (numel, row-major strides, byte counts) can overflow.
    int64_t bytes = static_cast<int64_t>(esize);
    for (int i = 0; i < t->ndim; ++i)
        if (t->shape[i] > 0 && __builtin_mul_overflow(bytes, t->shape[i], &bytes))
            fail(LFM_STATUS_INVALID_ARGUMENT, what, " has shape ", shape_str(*t), ", too large to address");
    if (t->device != LFM_DEVICE_CPU && t->device != LFM_DEVICE_CUDA)
        fail(LFM_STATUS_INVALID_ARGUMENT, what, " has an unknown device type ", static_cast<int>(t->device));
    if (numel(*t) > 0 && t->data == nullptr) fail(LFM_STATUS_INVALID_ARGUMENT, what, " has no data pointer");
}

void check_float(const lfm_tensor& t, const std::string& what) {
    if (!is_float_dtype(t.dtype))
        fail(LFM_STATUS_UNSUPPORTED_DTYPE, what, " has dtype ", dtype_name(t.dtype),
             "; supported: float32, float16, bfloat16");
}

void check_dtype(const lfm_tensor& t, lfm_dtype dt, const std::string& what) {
    if (t.dtype != dt)
        fail(LFM_STATUS_UNSUPPORTED_DTYPE, what, " has dtype ", dtype_name(t.dtype), ", expected ", dtype_name(dt));
}

void check_contiguous(const lfm_tensor& t, const std::string& what) {
    if (!is_contiguous(t))
        fail(LFM_STATUS_INVALID_ARGUMENT, what, " is not contiguous (shape ", shape_str(t),
             "); pass a contiguous copy");
}

void check_same_shape(const lfm_tensor& a, const lfm_tensor& b, const std::string& what_a,
                      const std::string& what_b) {
    if (!same_shape(a, b))
        fail(LFM_STATUS_SHAPE_MISMATCH, what_b, " has shape ", shape_str(b), " but ", what_a, " has shape ",
             shape_str(a));
}

void check_ndim(const lfm_tensor& t, int ndim, const std::string& what) {
    if (t.ndim != ndim)
        fail(LFM_STATUS_SHAPE_MISMATCH, what, " must have ", ndim, " dimensions, got shape ", shape_str(t));
}

void check_device(const lfm_tensor& t, lfm_device_type dev, const std::string& what) {
    if (t.device != dev)
        fail(LFM_STATUS_INVALID_ARGUMENT, what, " is on ", t.device == LFM_DEVICE_CPU ? "cpu" : "cuda",
             " but this call runs on ", dev == LFM_DEVICE_CPU ? "cpu" : "cuda");
}

}  // namespace lfm
