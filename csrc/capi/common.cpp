// Library-wide C ABI entry points: errors, version, build info, tensor views, threads.
#include <cstring>
#include <string>

#include "core/cpu_features.h"
#include "core/status.h"
#include "core/tensor.h"
#include "core/thread_pool.h"

#ifndef LFM_VERSION_STRING
#define LFM_VERSION_STRING "0.0.0"
#endif
#ifndef LFM_CUDA_ARCHS
#define LFM_CUDA_ARCHS ""
#endif

namespace lfm {
namespace {
thread_local std::string g_last_error;
}
void set_last_error(const std::string& msg) { g_last_error = msg; }
void clear_last_error() { g_last_error.clear(); }
}  // namespace lfm

extern "C" {

LFM_API const char* lfm_last_error(void) { return lfm::g_last_error.c_str(); }

LFM_API const char* lfm_status_string(lfm_status status) {
    switch (status) {
        case LFM_STATUS_OK: return "ok";
        case LFM_STATUS_INVALID_ARGUMENT: return "invalid argument";
        case LFM_STATUS_UNSUPPORTED_DTYPE: return "unsupported dtype";
        case LFM_STATUS_SHAPE_MISMATCH: return "shape mismatch";
        case LFM_STATUS_OUT_OF_RANGE: return "index out of range";
        case LFM_STATUS_NONFINITE: return "non-finite input";
        case LFM_STATUS_OUT_OF_MEMORY: return "out of memory";
        case LFM_STATUS_DEVICE_ERROR: return "device error";
        case LFM_STATUS_NOT_BUILT: return "backend not built";
        case LFM_STATUS_INTERNAL: return "internal error";
    }
    return "unknown status";
}

LFM_API const char* lfm_version(void) { return LFM_VERSION_STRING; }

LFM_API int lfm_abi_version(void) { return LFM_ABI_VERSION; }

namespace {
const char* pool_name() noexcept {
    try {
        return lfm::thread_pool_name();
    } catch (...) {  // a bad LFM_THREAD_POOL: the kernels report it
        return "invalid LFM_THREAD_POOL";
    }
}
}  // namespace

LFM_API const char* lfm_build_info(void) {
    // rebuilt on each call: the active SIMD level can change (lfm_set_simd)
    thread_local std::string info;
    info = lfm::cat(
        "{\"version\": \"", LFM_VERSION_STRING, "\", \"abi\": ", LFM_ABI_VERSION,
#ifdef LFM_HAVE_CUDA
        ", \"cuda\": true",
#else
        ", \"cuda\": false",
#endif
        ", \"cuda_archs\": \"", LFM_CUDA_ARCHS, "\", \"simd\": \"", lfm::cpu_simd_level(), "\", \"simd_host\": \"",
        lfm::simd_level_name(lfm::host_simd_level()), "\", \"thread_pool\": \"", pool_name(), "\"}");
    return info.c_str();
}

LFM_API lfm_status lfm_tensor_init(lfm_tensor* t, void* data, lfm_dtype dtype, lfm_device_type device,
                                   int32_t ndim, const int64_t* shape) {
    return lfm::guard("lfm_tensor_init", [&] {
        if (!t) lfm::fail(LFM_STATUS_INVALID_ARGUMENT, "tensor is NULL");
        if (ndim < 0 || ndim > LFM_MAX_DIMS)
            lfm::fail(LFM_STATUS_INVALID_ARGUMENT, "ndim ", ndim, " outside 0..", LFM_MAX_DIMS);
        if (ndim > 0 && !shape) lfm::fail(LFM_STATUS_INVALID_ARGUMENT, "shape is NULL");
        // everything is checked before *t is touched: a refused call leaves it as it was
        lfm::dtype_size(dtype);  // throws on an unknown dtype code
        if (device != LFM_DEVICE_CPU && device != LFM_DEVICE_CUDA)
            lfm::fail(LFM_STATUS_INVALID_ARGUMENT, "unknown device type ", static_cast<int>(device));
        int64_t strides[LFM_MAX_DIMS];
        int64_t stride = 1;
        for (int i = ndim - 1; i >= 0; --i) {
            if (shape[i] < 0) lfm::fail(LFM_STATUS_INVALID_ARGUMENT, "negative dimension ", shape[i]);
            strides[i] = stride;
            if (shape[i] > 0 && __builtin_mul_overflow(stride, shape[i], &stride))
                lfm::fail(LFM_STATUS_INVALID_ARGUMENT, "shape too large to address (element count overflows)");
        }
        std::memset(t, 0, sizeof(*t));
        t->data = data;
        t->dtype = dtype;
        t->device = device;
        t->ndim = ndim;
        for (int i = 0; i < ndim; ++i) {
            t->shape[i] = shape[i];
            t->strides[i] = strides[i];
        }
    });
}

LFM_API lfm_status lfm_set_simd(const char* level) {
    // unchecked: this call is how a program replaces an unusable LFM_SIMD
    return lfm::guard_unchecked("lfm_set_simd", [&] { lfm::set_simd_level(level); });
}

LFM_API int lfm_get_num_threads(void) { return lfm::get_num_threads(); }

LFM_API lfm_status lfm_set_num_threads(int n) {
    return lfm::guard("lfm_set_num_threads", [&] { lfm::set_num_threads(n); });
}

}  // extern "C"
