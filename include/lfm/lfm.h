/*
 * lfm_engine C ABI.
 *
 * Everything an embedding runtime needs: status codes, dtypes, a DLPack-like tensor
 * view, error reporting, version/build information, and the ops (one header each,
 * included at the end). Rules:
 *  - No exception or abort crosses this boundary: every entry point returns an
 *    lfm_status, and lfm_last_error() (thread-local) says what went wrong and where.
 *  - Option structs start with their own size (struct_size) so the ABI can grow:
 *    initialise them with the matching lfm_*_options_init() before setting fields.
 *  - Dtype is a run-time field of lfm_tensor, never part of a symbol name.
 */
#ifndef LFM_LFM_H
#define LFM_LFM_H

#include <stddef.h>
#include <stdint.h>

#if defined(_WIN32)
#  if defined(LFM_BUILDING_LIBRARY)
#    define LFM_API __declspec(dllexport)
#  else
#    define LFM_API __declspec(dllimport)
#  endif
#else
#  define LFM_API __attribute__((visibility("default")))
#endif

#ifdef __cplusplus
extern "C" {
#endif

#define LFM_ABI_VERSION 1
#define LFM_MAX_DIMS 8

/* Every enum of the ABI is int32-sized. In C++ it gets that fixed underlying type, so
 * any int32 a caller stores (a corrupt or out-of-range code) is a valid value to read,
 * and the library rejects it by its number instead of reading an invalid enum value
 * (undefined behaviour in C++). The layout is the same in C and C++. */
#ifdef __cplusplus
#  define LFM_ENUM(name) enum name : int32_t
#else
#  define LFM_ENUM(name) enum name
#endif

typedef LFM_ENUM(lfm_status) {
    LFM_STATUS_OK = 0,
    LFM_STATUS_INVALID_ARGUMENT = 1, /* a parameter is out of its domain */
    LFM_STATUS_UNSUPPORTED_DTYPE = 2,
    LFM_STATUS_SHAPE_MISMATCH = 3,
    LFM_STATUS_OUT_OF_RANGE = 4,     /* an index (slot, offset) outside its table */
    LFM_STATUS_NONFINITE = 5,        /* NaN or Inf in an input where it is refused */
    LFM_STATUS_OUT_OF_MEMORY = 6,
    LFM_STATUS_DEVICE_ERROR = 7,     /* a CUDA call failed */
    LFM_STATUS_NOT_BUILT = 8,        /* the backend was not compiled into this library */
    LFM_STATUS_INTERNAL = 9
} lfm_status;

typedef LFM_ENUM(lfm_dtype) {
    LFM_DTYPE_F32 = 0,
    LFM_DTYPE_F16 = 1,
    LFM_DTYPE_BF16 = 2,
    LFM_DTYPE_I32 = 3,
    LFM_DTYPE_I64 = 4,
    LFM_DTYPE_U8 = 5,
    LFM_DTYPE_I8 = 6,
    LFM_DTYPE_U32 = 7
} lfm_dtype;

typedef LFM_ENUM(lfm_device_type) {
    LFM_DEVICE_CPU = 0,
    LFM_DEVICE_CUDA = 1
} lfm_device_type;

/* A strided view of memory the caller owns (DLPack-like). strides are in elements;
 * a tensor is contiguous when strides are the row-major ones (size-1 dims ignored). */
typedef struct lfm_tensor {
    void* data;
    lfm_dtype dtype;
    lfm_device_type device;
    int32_t device_id;
    int32_t ndim;
    int64_t shape[LFM_MAX_DIMS];
    int64_t strides[LFM_MAX_DIMS];
} lfm_tensor;

/* Message of the last failed call on this thread ("" after success). */
LFM_API const char* lfm_last_error(void);
LFM_API const char* lfm_status_string(lfm_status status);
LFM_API const char* lfm_version(void);
LFM_API int lfm_abi_version(void);
/* JSON object: version, abi, cuda (bool), cuda_archs, simd (the active SIMD level),
   simd_host (the best level this CPU runs). The string is valid until the next call
   from the same thread. */
LFM_API const char* lfm_build_info(void);

/* Fill a contiguous view (strides computed row-major). ndim <= LFM_MAX_DIMS. */
LFM_API lfm_status lfm_tensor_init(lfm_tensor* t, void* data, lfm_dtype dtype, lfm_device_type device,
                                   int32_t ndim, const int64_t* shape);

/* Worker threads of the CPU kernels. Default: LFM_NUM_THREADS or all cores. */
LFM_API int lfm_get_num_threads(void);
LFM_API lfm_status lfm_set_num_threads(int n);

/* SIMD level of the CPU kernels: "baseline", "avx2", "avx512" or "neon"; NULL or ""
   returns to LFM_SIMD / the host's best. Every level gives the same bits (docs/spec).
   A level this CPU cannot run is LFM_STATUS_INVALID_ARGUMENT. The environment
   variable LFM_SIMD sets the same at start; an unusable LFM_SIMD makes every other
   entry point fail with LFM_STATUS_INVALID_ARGUMENT until this call replaces it. */
LFM_API lfm_status lfm_set_simd(const char* level);

#ifdef __cplusplus
}
#endif

#include "lfm/merge.h"
#include "lfm/lora.h"
#include "lfm/codec.h"
#include "lfm/skinny_linear.h"

#endif /* LFM_LFM_H */
