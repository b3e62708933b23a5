// CUDA fused decode-and-add for sign1 / int8 / int4 / int2 / nf4 (layouts: include/lfm/codec.h).
//
// out[r, c] = base[r, c] + alpha * q[r, c] * s(r, c)   (fp32 math, one rounding to out's dtype)
// One thread handles kVec consecutive elements of one row (a packed byte / word run), so
// every load of the packed codes is a full byte or word and the base/out accesses of a
// warp are contiguous. Rows are covered by a 2-D grid: blockIdx.y = row (strided when
// rows exceed the grid limit), blockIdx.x * blockDim.x + threadIdx.x = element chunk.
#include <cuda_runtime.h>

#include <cstdint>

#include "core/dtype.h"
#include "core/status.h"
#include "kernels/codec/codec.h"

namespace lfm::codec {
namespace {

constexpr int kThreads = 256;
constexpr int kVec = 8;  // elements per thread

__device__ __forceinline__ float load_any(const void* p, lfm_dtype dt, int64_t i) {
    switch (dt) {
        case LFM_DTYPE_F32: return static_cast<const float*>(p)[i];
        case LFM_DTYPE_F16: return f16_to_f32(static_cast<const uint16_t*>(p)[i]);
        default: return bf16_to_f32(static_cast<const uint16_t*>(p)[i]);
    }
}

__device__ __forceinline__ void store_any(void* p, lfm_dtype dt, int64_t i, float v) {
    switch (dt) {
        case LFM_DTYPE_F32: static_cast<float*>(p)[i] = v; break;
        case LFM_DTYPE_F16: static_cast<uint16_t*>(p)[i] = f32_to_f16(v); break;
        default: static_cast<uint16_t*>(p)[i] = f32_to_bf16(v); break;
    }
}

template <int CODEC>
__device__ __forceinline__ float code_at(const void* data_row, int64_t c) {
    if constexpr (CODEC == LFM_CODEC_SIGN1) {
        const uint32_t w = static_cast<const uint32_t*>(data_row)[c >> 5];
        return ((w >> (c & 31)) & 1u) ? -1.0f : 1.0f;
    } else if constexpr (CODEC == LFM_CODEC_INT8) {
        return static_cast<float>(static_cast<const int8_t*>(data_row)[c]);
    } else if constexpr (CODEC == LFM_CODEC_INT4) {
        const int b = static_cast<const uint8_t*>(data_row)[c >> 1];
        const int v = (b >> ((c & 1) * 4)) & 15;
        return static_cast<float>(v - ((v >> 3) << 4));
    } else if constexpr (CODEC == LFM_CODEC_NF4) {
        const int b = static_cast<const uint8_t*>(data_row)[c >> 1];
        return nf4_level((b >> ((c & 1) * 4)) & 15);
    } else {
        const int b = static_cast<const uint8_t*>(data_row)[c >> 2];
        const int v = (b >> ((c & 3) * 2)) & 3;
        return static_cast<float>(v - ((v >> 1) << 2));
    }
}

template <int CODEC>
__global__ void decode_add_kernel(const void* __restrict__ data, const void* __restrict__ scales, lfm_dtype sdt,
                                  const void* base, lfm_dtype bdt, void* out, lfm_dtype odt, int64_t rows,
                                  int64_t cols, int64_t pc, size_t data_es, int64_t group, int64_t n_groups,
                                  int per_tensor, float alpha) {
    const int64_t c0 = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) * kVec;
    if (c0 >= cols) return;
    for (int64_t r = blockIdx.y; r < rows; r += gridDim.y) {
        const void* drow = static_cast<const char*>(data) + r * pc * static_cast<int64_t>(data_es);
        const int64_t c1 = c0 + kVec < cols ? c0 + kVec : cols;
        float s_row = 0.0f;
        if constexpr (CODEC == LFM_CODEC_SIGN1) s_row = load_any(scales, sdt, per_tensor ? 0 : r);
        for (int64_t c = c0; c < c1; ++c) {
            const float s = CODEC == LFM_CODEC_SIGN1 ? s_row : load_any(scales, sdt, r * n_groups + c / group);
            float d = code_at<CODEC>(drow, c) * s;
            if (alpha != 1.0f) d = alpha * d;
            const int64_t i = r * cols + c;
            // __fadd_rn: no contraction with the multiply, so the result matches the reference.
            const float v = base ? __fadd_rn(load_any(base, bdt, i), d) : d;
            store_any(out, odt, i, v);
        }
    }
}

void check_cuda(cudaError_t e, const char* what) {
    if (e != cudaSuccess) fail(LFM_STATUS_DEVICE_ERROR, what, ": ", cudaGetErrorString(e));
}

}  // namespace

void decode_cuda(const CodecArgs& a, void* stream) {
    if (a.rows == 0 || a.cols == 0) return;
    if (a.base && a.base->device != LFM_DEVICE_CUDA)
        fail(LFM_STATUS_INVALID_ARGUMENT, "base must be on the GPU with out");
    const int64_t chunks = (a.cols + kVec - 1) / kVec;
    const int64_t gx = (chunks + kThreads - 1) / kThreads;
    if (gx > 0x7fffffff) fail(LFM_STATUS_INVALID_ARGUMENT, "rows too long for the CUDA decode kernel");
    const unsigned gy = static_cast<unsigned>(a.rows < 65535 ? a.rows : 65535);
    dim3 grid(static_cast<unsigned>(gx), gy);
    cudaStream_t st = static_cast<cudaStream_t>(stream);
    const int64_t pc = packed_cols(a.codec, a.cols);
    const size_t des = a.codec == LFM_CODEC_SIGN1 ? 4 : 1;
    const void* base = a.base ? a.base->data : nullptr;
    const lfm_dtype bdt = a.base ? a.base->dtype : LFM_DTYPE_F32;
#define LFM_LAUNCH(C)                                                                                          \
    decode_add_kernel<C><<<grid, kThreads, 0, st>>>(a.data->data, a.scales->data, a.scales->dtype, base, bdt,     \
                                                    a.out->data, a.out->dtype, a.rows, a.cols, pc, des, a.group, \
                                                    a.n_groups, a.per_tensor ? 1 : 0, a.alpha)
    switch (a.codec) {
        case LFM_CODEC_SIGN1: LFM_LAUNCH(LFM_CODEC_SIGN1); break;
        case LFM_CODEC_INT8: LFM_LAUNCH(LFM_CODEC_INT8); break;
        case LFM_CODEC_INT4: LFM_LAUNCH(LFM_CODEC_INT4); break;
        case LFM_CODEC_INT2: LFM_LAUNCH(LFM_CODEC_INT2); break;
        case LFM_CODEC_NF4: LFM_LAUNCH(LFM_CODEC_NF4); break;
    }
#undef LFM_LAUNCH
    check_cuda(cudaGetLastError(), "codec decode kernel launch");
}

}  // namespace lfm::codec
