// Multi-LoRA batched ops on CUDA (docs/spec/lora.md), behind the same C ABI as the CPU kernel.
//
// All slices go in one launch (their descriptors travel by value in the kernel parameters).
// The segment form needs no conversion pass: each token finds its segment by binary search
// over seg_start (O(log S) reads of a tiny, L1-resident array).
//
//   shrink  grid (T, n_slices), 256 threads: warp w computes rows j = w, w+8, ... < r_s of
//           u[t] with coalesced lane-strided loads over H_in and a warp-shuffle reduction.
//   expand  grid (T * ceil(max H_out / 256), n_slices): thread = one output column; the
//           scaled u row sits in shared memory; each thread reads its B row's r_s entries.
//   apply   decode sizes: grid (T * column blocks, n_slices); every block recomputes the
//           r_s x H_in shrink of its token into shared memory (A comes from L2 after the
//           first block) and writes its columns: u never reaches global memory. Large T:
//           shrink + expand through a stream-ordered fp32 workspace (cudaMallocAsync),
//           which avoids recomputing the shrink once per column block.
// Rows/columns j >= r_s of A/B are never read. Out-of-range slots count as "no adapter" and
// ranks are clamped to [0, R_max], so even an unchecked call never reads out of bounds.
#include <cuda_runtime.h>

#include <algorithm>
#include <vector>

#include "core/dtype.h"
#include "core/status.h"
#include "kernels/lora/lora.h"

namespace lfm::lora {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kFusedMaxBlocks = 8192;

struct DevSlice {
    const void* A;
    const void* B;
    const int32_t* ranks;
    const float* scales;
    int64_t R, H_out, off;
    int a_dt, b_dt;
    int vec_a, vec_b;  // rows start on 16-byte boundaries: 8-element vector loads are legal
};

struct DevArgs {
    DevSlice s[LFM_LORA_MAX_SLICES];
    int n_slices;
    int64_t T, H_in, n_slots;
    const void* x;
    int x_dt;
    int64_t x_ld;
    float* u;  // [n_slices, T, u_R]
    int64_t u_R;
    void* y;
    int y_dt;
    int64_t y_ld;
    int segments;
    const int32_t* token_slot;
    const int32_t* seg_start;
    const int32_t* seg_slot;
    int64_t S;
    int64_t col_blocks;  // column blocks per token (expand, apply)
    int vec_x;           // x rows 16-byte aligned and H_in % 8 == 0
};

__device__ __forceinline__ float ld(const void* p, int dt, int64_t i) {
    switch (dt) {
        case LFM_DTYPE_F16: return lfm::f16_to_f32(static_cast<const uint16_t*>(p)[i]);
        case LFM_DTYPE_BF16: return lfm::bf16_to_f32(static_cast<const uint16_t*>(p)[i]);
        default: return static_cast<const float*>(p)[i];
    }
}

__device__ __forceinline__ void st(void* p, int dt, int64_t i, float v) {
    switch (dt) {
        case LFM_DTYPE_F16: static_cast<uint16_t*>(p)[i] = lfm::f32_to_f16(v); break;
        case LFM_DTYPE_BF16: static_cast<uint16_t*>(p)[i] = lfm::f32_to_bf16(v); break;
        default: static_cast<float*>(p)[i] = v;
    }
}

// Eight consecutive elements p[i..i+8) as fp32, with 16-byte loads (i % 8 == 0 and p aligned:
// checked on the host before vec_* flags are set). Little-endian: element i is the low half.
__device__ __forceinline__ void ld8(const void* p, int dt, int64_t i, float* v) {
    if (dt == LFM_DTYPE_F32) {
        const float4* q = reinterpret_cast<const float4*>(static_cast<const float*>(p) + i);
        const float4 a = q[0], b = q[1];
        v[0] = a.x; v[1] = a.y; v[2] = a.z; v[3] = a.w;
        v[4] = b.x; v[5] = b.y; v[6] = b.z; v[7] = b.w;
    } else {
        const uint4 w = *reinterpret_cast<const uint4*>(static_cast<const uint16_t*>(p) + i);
        const uint32_t ws[4] = {w.x, w.y, w.z, w.w};
#pragma unroll
        for (int q = 0; q < 4; ++q) {
            const uint16_t lo = static_cast<uint16_t>(ws[q] & 0xffffu), hi = static_cast<uint16_t>(ws[q] >> 16);
            v[2 * q] = dt == LFM_DTYPE_BF16 ? lfm::bf16_to_f32(lo) : lfm::f16_to_f32(lo);
            v[2 * q + 1] = dt == LFM_DTYPE_BF16 ? lfm::bf16_to_f32(hi) : lfm::f16_to_f32(hi);
        }
    }
}

// Slot of token t (-1 = none / out of range).
__device__ __forceinline__ int64_t slot_of(const DevArgs& a, int64_t t) {
    int64_t s;
    if (!a.segments) {
        s = a.token_slot[t];
    } else {
        // last segment i with seg_start[i] <= t (empty segments are skipped by the search)
        int64_t lo = 0, hi = a.S - 1;
        if (a.S <= 0) return -1;
        while (lo < hi) {
            const int64_t mid = (lo + hi + 1) / 2;
            if (a.seg_start[mid] <= t) lo = mid;
            else hi = mid - 1;
        }
        if (a.seg_start[lo] > t || a.seg_start[lo + 1] <= t) return -1;
        s = a.seg_slot[lo];
    }
    return (s >= 0 && s < a.n_slots) ? s : -1;
}

__device__ __forceinline__ int rank_of(const DevSlice& sl, int64_t s) {
    if (s < 0) return 0;
    const int32_t r = sl.ranks[s];
    return r < 0 ? 0 : static_cast<int>(r > sl.R ? sl.R : r);
}

// u_s[j] = x[t] . A[s, j, :] for j < r (all warps of the block cooperate).
__device__ void shrink_row(const DevArgs& a, const DevSlice& sl, int64_t t, int64_t s, int r, float* u_s) {
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int64_t xrow = t * a.x_ld;
    for (int j = warp; j < r; j += kWarps) {
        const int64_t arow = (s * sl.R + j) * a.H_in;
        float acc = 0.f;
        if (a.vec_x && sl.vec_a) {  // 16-byte loads: each lane takes 8 elements per step
            float av[8], xv[8];
            for (int64_t k = lane * 8; k < a.H_in; k += 32 * 8) {
                ld8(sl.A, sl.a_dt, arow + k, av);
                ld8(a.x, a.x_dt, xrow + k, xv);
#pragma unroll
                for (int e = 0; e < 8; ++e) acc += av[e] * xv[e];
            }
        } else {
            for (int64_t k = lane; k < a.H_in; k += 32) acc += ld(sl.A, sl.a_dt, arow + k) * ld(a.x, a.x_dt, xrow + k);
        }
        for (int o = 16; o > 0; o >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, o);
        if (lane == 0) u_s[j] = acc;
    }
}

// y[t, off + o] += sum_j c[j] * B[s, o, j] for this block's columns.
__device__ void expand_cols(const DevArgs& a, const DevSlice& sl, int64_t t, int64_t s, int r, const float* c,
                            int64_t o) {
    if (o >= sl.H_out) return;
    const int64_t brow = (s * sl.H_out + o) * sl.R;
    float acc = 0.f;
    int j = 0;
    if (sl.vec_b) {
        float bv[8];
        for (; j + 8 <= r; j += 8) {
            ld8(sl.B, sl.b_dt, brow + j, bv);
#pragma unroll
            for (int e = 0; e < 8; ++e) acc += c[j + e] * bv[e];
        }
    }
    for (; j < r; ++j) acc += c[j] * ld(sl.B, sl.b_dt, brow + j);
    const int64_t yi = t * a.y_ld + sl.off + o;
    st(a.y, a.y_dt, yi, ld(a.y, a.y_dt, yi) + acc);
}

__global__ void shrink_kernel(DevArgs a) {
    extern __shared__ float sm[];
    const int64_t t = blockIdx.x;
    const DevSlice& sl = a.s[blockIdx.y];
    const int64_t s = slot_of(a, t);
    const int r = rank_of(sl, s);
    float* out = a.u + (blockIdx.y * a.T + t) * a.u_R;
    shrink_row(a, sl, t, s, r, sm);
    __syncthreads();
    for (int64_t j = threadIdx.x; j < a.u_R; j += blockDim.x) out[j] = j < r ? sm[j] : 0.f;
}

// Column-block grids are flat, token-major: blockIdx.x = t * col_blocks + cb, so the blocks of
// one token run next to each other and share its A/B rows in L2 (and T is not bound by the
// 65535 limit of grid.y).
__global__ void expand_kernel(DevArgs a) {
    extern __shared__ float sm[];
    const int64_t t = blockIdx.x / a.col_blocks, cb = blockIdx.x % a.col_blocks;
    const DevSlice& sl = a.s[blockIdx.y];
    const int64_t s = slot_of(a, t);
    const int r = rank_of(sl, s);
    if (r == 0 || cb * blockDim.x >= sl.H_out) return;
    const float scale = sl.scales[s];
    const float* ut = a.u + (blockIdx.y * a.T + t) * a.u_R;
    for (int j = threadIdx.x; j < r; j += blockDim.x) sm[j] = scale * ut[j];
    __syncthreads();
    expand_cols(a, sl, t, s, r, sm, cb * blockDim.x + threadIdx.x);
}

__global__ void apply_kernel(DevArgs a) {
    extern __shared__ float sm[];
    const int64_t t = blockIdx.x / a.col_blocks, cb = blockIdx.x % a.col_blocks;
    const DevSlice& sl = a.s[blockIdx.y];
    const int64_t s = slot_of(a, t);
    const int r = rank_of(sl, s);
    if (r == 0 || cb * blockDim.x >= sl.H_out) return;
    shrink_row(a, sl, t, s, r, sm);
    __syncthreads();
    const float scale = sl.scales[s];
    for (int j = threadIdx.x; j < r; j += blockDim.x) sm[j] *= scale;
    __syncthreads();
    expand_cols(a, sl, t, s, r, sm, cb * blockDim.x + threadIdx.x);
}

void cuda_check(cudaError_t e, const char* what) {
    if (e != cudaSuccess) fail(LFM_STATUS_DEVICE_ERROR, what, ": ", cudaGetErrorString(e));
}

bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

template <typename T>
std::vector<T> to_host(const T* p, int64_t n, cudaStream_t st) {
    std::vector<T> h(static_cast<size_t>(std::max<int64_t>(n, 0)));
    if (n > 0) cuda_check(cudaMemcpyAsync(h.data(), p, n * sizeof(T), cudaMemcpyDeviceToHost, st), "cudaMemcpyAsync");
    return h;
}

}  // namespace

void lora_cuda(const LoraArgs& a, void* stream) {
    cudaStream_t st = static_cast<cudaStream_t>(stream);
    struct DeviceGuard {  // run on the tensors' device; give the caller's device back
        int prev = -1;
        explicit DeviceGuard(int dev) {
            cuda_check(cudaGetDevice(&prev), "cudaGetDevice");
            if (prev != dev) cuda_check(cudaSetDevice(dev), "cudaSetDevice");
            else prev = -1;
        }
        ~DeviceGuard() {
            if (prev >= 0) cudaSetDevice(prev);
        }
    } guard(a.device_id);

    if (a.check_values) {  // one device->host copy of the small tables, then the shared checks
        std::vector<int32_t> ts, ss, sl;
        if (!a.segments) ts = to_host(a.token_slot, a.T, st);
        else {
            ss = to_host(a.seg_start, a.S + 1, st);
            sl = to_host(a.seg_slot, a.S, st);
        }
        std::vector<std::vector<int32_t>> rk;
        std::vector<std::vector<float>> sc;
        for (auto& s : a.slices) {
            rk.push_back(to_host(s.ranks, a.n_slots, st));
            sc.push_back(s.scales ? to_host(s.scales, a.n_slots, st) : std::vector<float>());
        }
        cuda_check(cudaStreamSynchronize(st), "cudaStreamSynchronize");
        std::vector<const int32_t*> rp;
        std::vector<const float*> sp;
        for (size_t i = 0; i < rk.size(); ++i) {
            rp.push_back(rk[i].data());
            sp.push_back(a.slices[i].scales ? sc[i].data() : nullptr);
        }
        check_lora_values(a, ts.data(), ss.data(), sl.data(), rp, sp);
    }

    DevArgs d{};
    d.n_slices = static_cast<int>(a.slices.size());
    int64_t Rmax = 0, Hmax = 0;
    for (int i = 0; i < d.n_slices; ++i) {
        const Slice& s = a.slices[i];
        // Row starts are multiples of H_in (A) / R (B) elements: 8-element vectors stay
        // 16-byte aligned when that count is a multiple of 8 and the base is aligned.
        const int vec_a = s.A && a.H_in % 8 == 0 && aligned16(s.A);
        const int vec_b = s.B && s.R % 8 == 0 && aligned16(s.B);
        d.s[i] = DevSlice{s.A, s.B, s.ranks, s.scales, s.R, s.H_out, s.off, static_cast<int>(s.a_dt),
                          static_cast<int>(s.b_dt), vec_a, vec_b};
        Rmax = std::max(Rmax, s.R);
        Hmax = std::max(Hmax, s.H_out);
    }
    d.T = a.T;
    d.H_in = a.H_in;
    d.n_slots = a.n_slots;
    d.x = a.x;
    d.x_dt = static_cast<int>(a.x_dt);
    d.x_ld = a.x_ld;
    d.vec_x = a.x && a.H_in % 8 == 0 && a.x_ld % 8 == 0 && aligned16(a.x);
    d.u = a.u;
    d.u_R = a.u_R;
    d.y = a.y;
    d.y_dt = static_cast<int>(a.y_dt);
    d.y_ld = a.y_ld;
    d.segments = a.segments ? 1 : 0;
    d.token_slot = a.token_slot;
    d.seg_start = a.seg_start;
    d.seg_slot = a.seg_slot;
    d.S = a.S;
    if (a.T == 0 || Rmax == 0) {
        if (a.op == Op::Shrink && a.T > 0 && a.u_R > 0)
            cuda_check(cudaMemsetAsync(a.u, 0, d.n_slices * a.T * a.u_R * sizeof(float), st), "cudaMemsetAsync");
        return;
    }
    if (a.T > 0x7fffffff) fail(LFM_STATUS_INVALID_ARGUMENT, "T = ", a.T, " exceeds the CUDA grid limit");
    const size_t smem = static_cast<size_t>(Rmax) * sizeof(float);
    if (smem > 48 * 1024) fail(LFM_STATUS_INVALID_ARGUMENT, "R_max = ", Rmax, " exceeds the CUDA kernel limit of 12288");
    const int64_t col_blocks = std::max<int64_t>(1, (Hmax + kThreads - 1) / kThreads);
    if (a.T * col_blocks > 0x7fffffff)
        fail(LFM_STATUS_INVALID_ARGUMENT, "T x ceil(H_out / 256) = ", a.T * col_blocks, " exceeds the CUDA grid limit");
    d.col_blocks = col_blocks;
    const dim3 grid_rows(static_cast<unsigned>(a.T), static_cast<unsigned>(d.n_slices));
    const dim3 grid_cols(static_cast<unsigned>(a.T * col_blocks), static_cast<unsigned>(d.n_slices));

    switch (a.op) {
        case Op::Shrink:
            shrink_kernel<<<grid_rows, kThreads, smem, st>>>(d);
            break;
        case Op::Expand:
            if (Hmax > 0) expand_kernel<<<grid_cols, kThreads, smem, st>>>(d);
            break;
        case Op::Apply: {
            if (Hmax == 0) break;
            if (a.T * col_blocks * d.n_slices <= kFusedMaxBlocks) {
                apply_kernel<<<grid_cols, kThreads, smem, st>>>(d);
            } else {
                float* u = nullptr;
                const size_t bytes = static_cast<size_t>(d.n_slices) * a.T * Rmax * sizeof(float);
                cuda_check(cudaMallocAsync(reinterpret_cast<void**>(&u), bytes, st), "cudaMallocAsync");
                d.u = u;
                d.u_R = Rmax;
                shrink_kernel<<<grid_rows, kThreads, smem, st>>>(d);
                expand_kernel<<<grid_cols, kThreads, smem, st>>>(d);
                cuda_check(cudaFreeAsync(u, st), "cudaFreeAsync");
            }
            break;
        }
    }
    cuda_check(cudaGetLastError(), "lora kernel launch");
}

}  // namespace lfm::lora
