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

LFM_API const char* lfm_build_info(void) {
    static const std::string info = lfm::cat(
        "{\"version\": \"", LFM_VERSION_STRING, "\", \"abi\": ", LFM_ABI_VERSION,
#ifdef LFM_HAVE_CUDA
        ", \"cuda\": true",
#else
        ", \"cuda\": false",
#endif
        ", \"cuda_archs\": \"", LFM_CUDA_ARCHS, "\", \"simd\": \"", lfm::cpu_simd_level(), "\", \"simd_host\": \"", lfm::cpu_simd_host_level(),
        "\", \"simd_env\": \"", lfm::cpu_simd_env(), "\"}");
    return info.c_str();
}

LFM_API lfm_status lfm_tensor_init(lfm_tensor* t, void* data, lfm_dtype dtype, lfm_device_type device,
                                   int32_t ndim, const int64_t* shape) {
    return lfm::guard("lfm_tensor_init", [&] {
        if (!t) lfm::fail(LFM_STATUS_INVALID_ARGUMENT, "tensor is NULL");
        if (ndim < 0 || ndim > LFM_MAX_DIMS)
            lfm::fail(LFM_STATUS_INVALID_ARGUMENT, "ndim ", ndim, " outside 0..", LFM_MAX_DIMS);
        if (ndim > 0 && !shape) lfm::fail(LFM_STATUS_INVALID_ARGUMENT, "shape is NULL");
        const int dc = lfm::enum_code(dtype), vc = lfm::enum_code(device);
        if (!lfm::valid_dtype_code(dc)) lfm::fail(LFM_STATUS_UNSUPPORTED_DTYPE, "unknown dtype code ", dc);
        if (!lfm::valid_device_code(vc)) lfm::fail(LFM_STATUS_INVALID_ARGUMENT, "unknown device type ", vc);
        for (int i = 0; i < ndim; ++i)
            if (shape[i] < 0) lfm::fail(LFM_STATUS_INVALID_ARGUMENT, "negative dimension ", shape[i]);
        std::memset(t, 0, sizeof(*t));
        t->data = data;
        t->dtype = dtype;
        t->device = device;
        t->ndim = ndim;
        int64_t stride = 1;
        for (int i = ndim - 1; i >= 0; --i) {
            if (shape[i] < 0) lfm::fail(LFM_STATUS_INVALID_ARGUMENT, "negative dimension ", shape[i]);
            t->shape[i] = shape[i];
            t->strides[i] = stride;
            if (__builtin_mul_overflow(stride, shape[i], &stride))  // signed overflow would be UB
                lfm::fail(LFM_STATUS_INVALID_ARGUMENT, "shape has more elements than int64 can count");
        }
    });
}

LFM_API int lfm_get_num_threads(void) { return lfm::get_num_threads(); }

LFM_API lfm_status lfm_set_num_threads(int n) {
    return lfm::guard("lfm_set_num_threads", [&] { lfm::set_num_threads(n); });
}

}  // extern "C"
