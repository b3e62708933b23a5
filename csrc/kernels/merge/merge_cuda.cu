// CUDA fused sparsify-and-merge (docs/spec/merge.md), bit-compatible with merge_cpu.cpp.
//
// Same definition as the CPU kernel, so masks are bit-identical:
//   delta_i = fp32(x_i) - fp32(b) (one IEEE rounding), v = bits(|delta_i|) as uint32;
//   magnitude / breadcrumbs cuts found by radix select over v: three histogram passes
//   (digits of 11, 10 and 10 bits; per-block shared-memory histograms flushed to global
//   64-bit counters, exact integers, so deterministic), then, when only part of the equal
//   values at a cut is kept, a tie pass: per-chunk counts of v == cut (host prefix sum)
//   and a block scan inside the one chunk that holds the wanted tie -> its flat index;
//   DARE: keep iff philox(seed, stream, e) < floor(d * 2^32), one Philox block per quad
//   of elements; DELLA: per row, keys (v << jbits | column) sorted by CUB's segmented
//   radix sort (rows processed in chunks), rank r -> threshold table computed on the
//   host in double exactly like the CPU, keep bytes [K, n];
//   rescale "l1": per 4096-element chunk float64 block reductions (fixed tree), chunk
//   partials summed on the host in chunk order;
//   the merge pass: one kernel reading base + K models per quad of elements, writing
//   `out` in its dtype. Every floating-point step is an explicit rounding intrinsic
//   (__fadd_rn, __fmul_rn, __dmul_rn, __dadd_rn, __ddiv_rn ...; the file is also built
//   with --fmad=false), so nothing is contracted into an FMA, and the steps are the CPU
//   kernel's (built with -ffp-contract=off, docs/spec/merge.md "Arithmetic"): outputs
//   equal the CPU kernel's bit for bit, except that the L1 factor's float64 sums may
//   differ in summation order (last bit of the factor).
// Scratch comes from cudaMallocAsync on the caller's stream; every CUDA error becomes
// lfm::fail(LFM_STATUS_DEVICE_ERROR, ...); NaN/Inf inputs -> LFM_STATUS_NONFINITE with
// the tensor and element named, like the CPU kernel.
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include <cub/block/block_reduce.cuh>
#include <cub/block/block_scan.cuh>
#include <cub/device/device_segmented_radix_sort.cuh>

#include "core/dtype.h"
#include "core/philox.h"
#include "core/status.h"
#include "core/tensor.h"
#include "kernels/merge/merge.h"
#include "kernels/merge/merge_plan.h"

namespace lfm::merge {
namespace {

using ull = unsigned long long;

constexpr int kThreads = 256;
constexpr int64_t kChunk = 4096;           // elements per chunk (tie counts, L1 partials)
constexpr int kChunkThreads = 256;         // threads per chunk: 4 quads each
constexpr int kLocateThreads = 1024;       // one quad per thread covers a chunk
constexpr int kBins = 2048;                // largest radix digit: 11 bits
constexpr int kDigitBits[3] = {11, 10, 10};
constexpr int64_t kDellaChunkElems = int64_t(1) << 25;  // keys sorted at a time (256 MiB of uint64)

enum SpCode : int { kSpNone = 0, kSpCut = 1, kSpRandom = 2, kSpDella = 3 };

#define LFM_CUDA_CHECK(expr)                                                                          \
    do {                                                                                              \
        cudaError_t err_ = (expr);                                                                    \
        if (err_ != cudaSuccess)                                                                      \
            ::lfm::fail(LFM_STATUS_DEVICE_ERROR, "CUDA error in merge (", #expr, "): ",               \
                        cudaGetErrorString(err_));                                                    \
    } while (0)

// ---- per-model parameters, copied to the device --------------------------------------
struct ModelDev {
    const void* x;
    int dtype;
    float coef;                      // fp32(w * f): t = coef * delta where kept
    float ecoef;                     // election coefficient: fp32(f) when unweighted, else coef
    double wd;                       // weight as given (float64)
    double f;                        // rescale factor (float64, like the CPU kernel)
    double dw;                       // divisor share: w, or 1 for disjoint "count"
    uint32_t lo_v, hi_v;             // cut: keep lo_v <= v <= hi_v ...
    long long lo_emin, lo_emax;      // ... with the flat index limited at v == lo_v
    long long hi_emin, hi_emax;      // ... and at v == hi_v
    ull thr;                         // random: keep iff draw < thr (2^32 keeps all)
    uint32_t stream;
};

struct MergeKernelArgs {
    const void* base;
    int bdtype;
    void* out;
    int odtype;
    long long n;
    int K;
    const ModelDev* models;
    const uint8_t* dmask;            // DELLA keep bytes [K, n]
    int sparsifier;
    int consensus, normalize, unweighted, dcount, vec;
    float inv_plain_div, lam;
    const float* tab;                // K <= 8: fp32 1/divisor per agreement pattern
    ull seed;
    ull* bad;                        // smallest flat index with a non-finite value
};

// ---- loads and stores ------------------------------------------------------------------
__device__ __forceinline__ float load1(const void* p, int dt, long long e) {
    switch (dt) {
        case LFM_DTYPE_F16: return f16_to_f32(static_cast<const uint16_t*>(p)[e]);
        case LFM_DTYPE_BF16: return bf16_to_f32(static_cast<const uint16_t*>(p)[e]);
        default: return static_cast<const float*>(p)[e];
    }
}

// Elements 4q .. 4q+3 (zeros past n). vec: every pointer is 16-byte aligned.
__device__ __forceinline__ void load4(const void* p, int dt, long long q, long long n, int vec, float o[4]) {
    const long long e0 = q * 4;
    if (vec && e0 + 4 <= n) {
        if (dt == LFM_DTYPE_F32) {
            float4 v = reinterpret_cast<const float4*>(p)[q];
            o[0] = v.x; o[1] = v.y; o[2] = v.z; o[3] = v.w;
        } else {
            uint2 v = reinterpret_cast<const uint2*>(p)[q];
            uint16_t h[4] = {uint16_t(v.x & 0xffffu), uint16_t(v.x >> 16), uint16_t(v.y & 0xffffu), uint16_t(v.y >> 16)};
            for (int k = 0; k < 4; ++k) o[k] = dt == LFM_DTYPE_F16 ? f16_to_f32(h[k]) : bf16_to_f32(h[k]);
        }
        return;
    }
    for (int k = 0; k < 4; ++k) o[k] = e0 + k < n ? load1(p, dt, e0 + k) : 0.0f;
}

__device__ __forceinline__ void store4(void* p, int dt, long long q, long long n, int vec, const float o[4]) {
    const long long e0 = q * 4;
    if (dt == LFM_DTYPE_F32) {
        if (vec && e0 + 4 <= n) {
            reinterpret_cast<float4*>(p)[q] = make_float4(o[0], o[1], o[2], o[3]);
            return;
        }
        for (int k = 0; k < 4; ++k)
            if (e0 + k < n) static_cast<float*>(p)[e0 + k] = o[k];
        return;
    }
    uint16_t h[4];
    for (int k = 0; k < 4; ++k) h[k] = dt == LFM_DTYPE_F16 ? f32_to_f16(o[k]) : f32_to_bf16(o[k]);
    if (vec && e0 + 4 <= n) {
        reinterpret_cast<uint2*>(p)[q] = make_uint2(h[0] | (uint32_t(h[1]) << 16), h[2] | (uint32_t(h[3]) << 16));
        return;
    }
    for (int k = 0; k < 4; ++k)
        if (e0 + k < n) static_cast<uint16_t*>(p)[e0 + k] = h[k];
}

__device__ __forceinline__ bool nonfinite(float f) { return (f32_bits(f) & 0x7f800000u) == 0x7f800000u; }

// delta of quad q from base values b already loaded (b == nullptr: no base); records
// the first non-finite element in *bad.
__device__ __forceinline__ void delta4_pre(const float* b, const void* x, int xdt, long long q, long long n, int vec,
                                           float d[4], ull* bad) {
    load4(x, xdt, q, n, vec, d);
    bool any = false;
    long long first = 0;
    for (int k = 3; k >= 0; --k) {
        if (b) d[k] = __fsub_rn(d[k], b[k]);
        if (q * 4 + k < n && (nonfinite(d[k]) || (b && nonfinite(b[k])))) { any = true; first = q * 4 + k; }
    }
    if (any && bad) atomicMin(bad, static_cast<ull>(first));
}

// delta of quad q; records the first non-finite element in *bad.
__device__ __forceinline__ void delta4(const void* base, int bdt, const void* x, int xdt, long long q, long long n,
                                       int vec, float d[4], ull* bad) {
    float b[4] = {0.f, 0.f, 0.f, 0.f};
    load4(x, xdt, q, n, vec, d);
    if (base) load4(base, bdt, q, n, vec, b);
    bool any = false;
    long long first = 0;
    for (int k = 3; k >= 0; --k) {
        if (base) d[k] = __fsub_rn(d[k], b[k]);
        if (q * 4 + k < n && (nonfinite(d[k]) || nonfinite(b[k]))) { any = true; first = q * 4 + k; }
    }
    if (any && bad) atomicMin(bad, static_cast<ull>(first));
}

__device__ __forceinline__ uint32_t absbits(float f) { return f32_bits(f) & 0x7fffffffu; }

__device__ __forceinline__ long long grid_stride() { return static_cast<long long>(gridDim.x) * blockDim.x; }
__device__ __forceinline__ long long global_tid() {
    return static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x;
}

// ---- radix select ------------------------------------------------------------------------
struct QueryDev {
    const void* x;
    int dtype;
    uint32_t prefix;   // digits chosen so far (bits above the current digit)
};

__global__ void k_hist(const void* base, int bdt, const QueryDev* queries, int pass, long long n, int vec,
                       ull* hist, ull* bad) {
    __shared__ unsigned int sh[kBins];
    const QueryDev qd = queries[blockIdx.y];
    const int shift = pass == 0 ? 20 : (pass == 1 ? 10 : 0);
    const int bins = pass == 0 ? 2048 : 1024;
    const int hi_shift = shift + (pass == 0 ? 11 : 10);
    for (int i = threadIdx.x; i < bins; i += blockDim.x) sh[i] = 0;
    __syncthreads();
    const long long nq = (n + 3) / 4;
    for (long long q = global_tid(); q < nq; q += grid_stride()) {
        float d[4];
        delta4(base, bdt, qd.x, qd.dtype, q, n, vec, d, pass == 0 ? bad : nullptr);
        for (int k = 0; k < 4; ++k) {
            if (q * 4 + k >= n) break;
            const uint32_t v = absbits(d[k]);
            if (pass == 0 || (v >> hi_shift) == qd.prefix) atomicAdd(&sh[(v >> shift) & (bins - 1)], 1u);
        }
    }
    __syncthreads();
    ull* h = hist + static_cast<long long>(blockIdx.y) * kBins;
    for (int i = threadIdx.x; i < bins; i += blockDim.x)
        if (sh[i]) atomicAdd(h + i, static_cast<ull>(sh[i]));
}

// cnt[chunk] = number of elements of the chunk with bits(|delta|) == value
__global__ void k_tie_count(const void* base, int bdt, const void* x, int xdt, long long n, int vec, uint32_t value,
                            int* cnt) {
    __shared__ int total;
    if (threadIdx.x == 0) total = 0;
    __syncthreads();
    const long long q0 = static_cast<long long>(blockIdx.x) * (kChunk / 4);
    const long long nq = (n + 3) / 4;
    int c = 0;
    for (int t = threadIdx.x; t < kChunk / 4; t += blockDim.x) {
        const long long q = q0 + t;
        if (q >= nq) break;
        float d[4];
        delta4(base, bdt, x, xdt, q, n, vec, d, nullptr);
        for (int k = 0; k < 4; ++k) c += (q * 4 + k < n && absbits(d[k]) == value);
    }
    atomicAdd(&total, c);
    __syncthreads();
    if (threadIdx.x == 0) cnt[blockIdx.x] = total;
}

// *res = flat index of the ordinal-th (0-based) element of chunk blk with v == value.
__global__ void k_tie_locate(const void* base, int bdt, const void* x, int xdt, long long n, int vec, uint32_t value,
                             long long blk, int ordinal, long long* res) {
    using Scan = cub::BlockScan<int, kLocateThreads>;
    __shared__ typename Scan::TempStorage tmp;
    const long long q = blk * (kChunk / 4) + threadIdx.x;
    const long long nq = (n + 3) / 4;
    bool eq[4] = {false, false, false, false};
    int c = 0;
    if (q < nq) {
        float d[4];
        delta4(base, bdt, x, xdt, q, n, vec, d, nullptr);
        for (int k = 0; k < 4; ++k) {
            eq[k] = q * 4 + k < n && absbits(d[k]) == value;
            c += eq[k];
        }
    }
    int before = 0;
    Scan(tmp).ExclusiveSum(c, before);
    for (int k = 0; k < 4; ++k)
        if (eq[k]) {
            if (before == ordinal) *res = q * 4 + k;
            ++before;
        }
}

// ---- keep flags -------------------------------------------------------------------------
__device__ __forceinline__ void keep4(const MergeKernelArgs& a, const ModelDev& m, int i, long long q,
                                      const float d[4], bool kp[4]) {
    const long long e0 = q * 4;
    switch (a.sparsifier) {
        case kSpCut:
            for (int k = 0; k < 4; ++k) {
                const uint32_t v = absbits(d[k]);
                const long long e = e0 + k;
                bool ok = v >= m.lo_v && v <= m.hi_v;
                if (v == m.lo_v) ok = ok && e >= m.lo_emin && e <= m.lo_emax;
                if (v == m.hi_v) ok = ok && e >= m.hi_emin && e <= m.hi_emax;
                kp[k] = ok;
            }
            return;
        case kSpRandom: {
            if (m.thr >= 0x100000000ull) {
                for (int k = 0; k < 4; ++k) kp[k] = true;
                return;
            }
            const Philox4 r = philox_block(a.seed, m.stream, static_cast<uint64_t>(q));
            for (int k = 0; k < 4; ++k) kp[k] = static_cast<ull>(r.v[k]) < m.thr;
            return;
        }
        case kSpDella: {
            const uint8_t* mk = a.dmask + static_cast<long long>(i) * a.n;
            for (int k = 0; k < 4; ++k) kp[k] = e0 + k < a.n && mk[e0 + k] != 0;
            return;
        }
        default:
            for (int k = 0; k < 4; ++k) kp[k] = true;
    }
}

// delta and keep flags of model i over quad q (b: the base values, nullptr without base)
__device__ __forceinline__ void model4(const MergeKernelArgs& a, int i, long long q, const float* b, float d[4],
                                       bool kp[4]) {
    const ModelDev& m = a.models[i];
    delta4_pre(b, m.x, m.dtype, q, a.n, a.vec, d, a.bad);
    if (a.sparsifier == kSpNone) {
        for (int k = 0; k < 4; ++k) kp[k] = true;
        return;
    }
    keep4(a, m, i, q, d, kp);
}

// ---- L1 norms -----------------------------------------------------------------------------
__global__ void k_l1(MergeKernelArgs a, int i, double* part, long long nchunks) {
    using Reduce = cub::BlockReduce<double, kChunkThreads>;
    __shared__ typename Reduce::TempStorage tmp;
    const ModelDev& m = a.models[i];
    const long long q0 = static_cast<long long>(blockIdx.x) * (kChunk / 4);
    const long long nq = (a.n + 3) / 4;
    double t = 0.0, kept = 0.0;
    for (int s = threadIdx.x; s < kChunk / 4; s += blockDim.x) {
        const long long q = q0 + s;
        if (q >= nq) break;
        float d[4];
        bool kp[4];
        delta4(a.base, a.bdtype, m.x, m.dtype, q, a.n, a.vec, d, a.bad);
        keep4(a, m, i, q, d, kp);
        for (int k = 0; k < 4; ++k) {
            if (q * 4 + k >= a.n) break;
            const double v = fabs(static_cast<double>(d[k]));
            t += v;
            kept += kp[k] ? v : 0.0;
        }
    }
    const double T = Reduce(tmp).Sum(t);
    __syncthreads();
    const double Kp = Reduce(tmp).Sum(kept);
    if (threadIdx.x == 0) {
        part[blockIdx.x] = T;
        part[nchunks + blockIdx.x] = Kp;
    }
}

// ---- DELLA ----------------------------------------------------------------------------------
// keys[p] = v << jbits | column, for elements [e0, e0 + len) (whole rows)
__global__ void k_della_keys(const void* base, int bdt, const void* x, int xdt, long long e0, long long len,
                             long long cols, int jbits, ull* keys, ull* bad) {
    for (long long p = global_tid(); p < len; p += grid_stride()) {
        const long long e = e0 + p;
        const float b = load1(base, bdt, e);
        const float d = __fsub_rn(load1(x, xdt, e), b);
        if (nonfinite(d) || nonfinite(b)) atomicMin(bad, static_cast<ull>(e));
        keys[p] = (static_cast<ull>(absbits(d)) << jbits) | static_cast<ull>(e % cols);
    }
}

__global__ void k_della_apply(const ull* sorted, long long e0, long long len, long long cols, int jbits,
                              const long long* thr, ull seed, uint32_t stream, uint8_t* mask) {
    const ull jmask = (jbits >= 64) ? ~0ull : ((1ull << jbits) - 1ull);
    for (long long p = global_tid(); p < len; p += grid_stride()) {
        const long long row_start = e0 + (p / cols) * cols;
        const long long r = p % cols;  // rank (0-based) within the row
        const long long e = row_start + static_cast<long long>(sorted[p] & jmask);
        const Philox4 pr = philox_block(seed, stream, static_cast<uint64_t>(e) >> 2);
        const int w = static_cast<int>(e & 3);  // select, not r.v[w]: a dynamic index spills to local memory
        const uint32_t draw = w == 0 ? pr.v[0] : w == 1 ? pr.v[1] : w == 2 ? pr.v[2] : pr.v[3];
        mask[e] = static_cast<long long>(draw) < thr[r] ? 1 : 0;
    }
}

__global__ void k_row_offsets(long long rows, long long cols, int* off) {
    for (long long r = global_tid(); r <= rows; r += grid_stride()) off[r] = static_cast<int>(r * cols);
}

// ---- the merge pass -------------------------------------------------------------------------
// The CPU kernel's arithmetic, step by step (no FMA anywhere, like the CPU's
// -ffp-contract=off loops): t_i = kept ? coef_i * delta_i : 0 (fp32). Consensus: e_i = t_i
// (unweighted: kept ? ecoef_i * delta_i : 0); the elected sign is that of the float64 sum
// of kept (w_i) (delta_i * f_i), like the reference (the CPU reaches the same sign);
// mixed = sum of agreeing t_i; normalised by the pattern table (K <= 8) or a float64
// divisor. Without consensus mixed = sum t_i (fused when nothing is sparsified), then
// *= fp32(1 / sum w). out = b + lam * mixed (two roundings).
__global__ void __launch_bounds__(kThreads) k_merge(MergeKernelArgs a) {
    const long long nq = (a.n + 3) / 4;
    for (long long q = global_tid(); q < nq; q += grid_stride()) {
        float b[4] = {0.f, 0.f, 0.f, 0.f};
        if (a.base) load4(a.base, a.bdtype, q, a.n, a.vec, b);
        const float* bp = a.base ? b : nullptr;
        float mixed[4] = {0.f, 0.f, 0.f, 0.f};
        float d[4];
        bool kp[4];
        if (a.consensus) {
            double sd[4] = {0.0, 0.0, 0.0, 0.0};
            for (int i = 0; i < a.K; ++i) {
                model4(a, i, q, bp, d, kp);
                const ModelDev& m = a.models[i];
                for (int k = 0; k < 4; ++k)
                    if (kp[k]) {
                        const double dp = __dmul_rn(static_cast<double>(d[k]), m.f);
                        sd[k] = __dadd_rn(sd[k], a.unweighted ? dp : __dmul_rn(m.wd, dp));
                    }
            }
            bool pos[4];
            for (int k = 0; k < 4; ++k) pos[k] = sd[k] >= 0.0;
            // second sweep: the inputs are re-read (L2-resident) rather than held per model
            unsigned bits[4] = {0u, 0u, 0u, 0u};
            double div[4] = {0.0, 0.0, 0.0, 0.0};
            for (int i = 0; i < a.K; ++i) {
                model4(a, i, q, bp, d, kp);
                const ModelDev& m = a.models[i];
                for (int k = 0; k < 4; ++k) {
                    const float t = kp[k] ? __fmul_rn(m.coef, d[k]) : 0.0f;
                    const float ev = a.unweighted ? (kp[k] ? __fmul_rn(m.ecoef, d[k]) : 0.0f) : t;
                    const bool agree = pos[k] ? ev > 0.0f : ev < 0.0f;
                    mixed[k] = __fadd_rn(mixed[k], agree ? t : 0.0f);
                    if (a.tab)
                        bits[k] |= agree ? (1u << i) : 0u;
                    else
                        div[k] = __dadd_rn(div[k], agree ? m.dw : 0.0);
                }
            }
            if (a.tab) {
                for (int k = 0; k < 4; ++k) mixed[k] = __fmul_rn(mixed[k], a.tab[bits[k]]);
            } else if (a.normalize) {
                for (int k = 0; k < 4; ++k)
                    mixed[k] = static_cast<float>(
                        __ddiv_rn(static_cast<double>(mixed[k]), fabs(div[k]) < 1e-8 ? 1.0 : div[k]));
            }
        } else {
            for (int i = 0; i < a.K; ++i) {
                model4(a, i, q, bp, d, kp);
                const float c = a.models[i].coef;
                for (int k = 0; k < 4; ++k)
                    mixed[k] = __fadd_rn(mixed[k], kp[k] || a.sparsifier == kSpNone ? __fmul_rn(c, d[k]) : 0.0f);
            }
            if (a.normalize)
                for (int k = 0; k < 4; ++k) mixed[k] = __fmul_rn(mixed[k], a.inv_plain_div);
        }
        float o[4];
        for (int k = 0; k < 4; ++k) o[k] = a.base ? __fadd_rn(b[k], __fmul_rn(a.lam, mixed[k])) : mixed[k];
        store4(a.out, a.odtype, q, a.n, a.vec, o);
    }
}

// ---- host side ---------------------------------------------------------------------------------
class DeviceGuard {
public:
    explicit DeviceGuard(int dev) {
        LFM_CUDA_CHECK(cudaGetDevice(&prev_));
        if (prev_ != dev) LFM_CUDA_CHECK(cudaSetDevice(dev));
    }
    ~DeviceGuard() { cudaSetDevice(prev_); }

private:
    int prev_ = 0;
};

// Scratch from cudaMallocAsync, freed (stream-ordered) when the merge returns or throws.
class Scratch {
public:
    explicit Scratch(cudaStream_t s) : s_(s) {}
    ~Scratch() {
        for (void* p : ptrs_) cudaFreeAsync(p, s_);
    }
    template <typename T>
    T* alloc(size_t count) {
        void* p = nullptr;
        if (count == 0) count = 1;
        cudaError_t err = cudaMallocAsync(&p, count * sizeof(T), s_);
        if (err != cudaSuccess)
            fail(err == cudaErrorMemoryAllocation ? LFM_STATUS_OUT_OF_MEMORY : LFM_STATUS_DEVICE_ERROR,
                 "merge: cannot allocate ", count * sizeof(T), " bytes of GPU scratch: ", cudaGetErrorString(err));
        ptrs_.push_back(p);
        return static_cast<T*>(p);
    }

private:
    cudaStream_t s_;
    std::vector<void*> ptrs_;
};

struct HostQuery {
    int model;
    int64_t pos;
    bool upper;
    uint32_t prefix = 0;
    int64_t below = 0;
    uint32_t value = 0;
    int64_t c_lt = 0, c_eq = 0;
};

class CudaMerge {
public:
    CudaMerge(const MergeArgs& a, cudaStream_t s) : a_(a), s_(s), scratch_(s), K_(a.K), n_(a.n) {}

    void run() {
        if (n_ == 0) return;
        int dev = 0;
        LFM_CUDA_CHECK(cudaGetDevice(&dev));
        LFM_CUDA_CHECK(cudaDeviceGetAttribute(&sms_, cudaDevAttrMultiProcessorCount, dev));
        vec_ = aligned16(a_.out) && (!a_.base || aligned16(a_.base));
        for (const lfm_tensor* m : a_.models) vec_ = vec_ && aligned16(m);
        base_ = a_.base ? a_.base->data : nullptr;
        bdt_ = a_.base ? static_cast<int>(a_.base->dtype) : 0;
        bad_ = scratch_.alloc<ull>(1);
        LFM_CUDA_CHECK(cudaMemsetAsync(bad_, 0xff, sizeof(ull), s_));
        nchunks_ = (n_ + kChunk - 1) / kChunk;

        host_models_.resize(static_cast<size_t>(K_));
        for (int i = 0; i < K_; ++i) {
            ModelDev& m = host_models_[i];
            m.x = a_.models[i]->data;
            m.dtype = static_cast<int>(a_.models[i]->dtype);
            m.wd = a_.w[i];
            m.f = 1.0;
            m.dw = a_.disjoint_count ? 1.0 : a_.w[i];
            m.lo_v = 0;
            m.hi_v = 0xffffffffu;
            m.lo_emin = 0;
            m.lo_emax = kNoLimit;
            m.hi_emin = 0;
            m.hi_emax = kNoLimit;
            m.thr = 0x100000000ull;
            m.stream = a_.stream[i];
        }
        models_dev_ = scratch_.alloc<ModelDev>(static_cast<size_t>(K_));

        int sp = kSpNone;
        switch (a_.sparsifier) {
            case Sparsifier::Magnitude:
            case Sparsifier::MagnitudeOutliers:
                sp = kSpCut;
                select();
                break;
            case Sparsifier::Random:
                sp = kSpRandom;
                for (int i = 0; i < K_; ++i) host_models_[i].thr = keep_threshold(a_.d[i]);
                break;
            case Sparsifier::Della:
                sp = kSpDella;
                della_masks();
                break;
            case Sparsifier::None: break;
        }
        upload_models();
        MergeKernelArgs ka = kernel_args(sp);
        if (sp != kSpNone) {
            if (a_.rescale == LFM_RESCALE_L1) {
                l1_factors(ka);
                upload_models();
            } else if (a_.rescale == LFM_RESCALE_INVERSE_DENSITY) {
                for (int i = 0; i < K_; ++i) host_models_[i].f = inverse_density_factor(a_.d[i]);
                upload_models();
            }
        }
        finalize_coefficients(ka);
        k_merge<<<grid_for((n_ + 3) / 4, kThreads), kThreads, 0, s_>>>(ka);
        LFM_CUDA_CHECK(cudaGetLastError());
        check_bad();
    }

private:
    static bool aligned16(const lfm_tensor* t) { return (reinterpret_cast<uintptr_t>(t->data) & 15u) == 0; }

    unsigned grid_for(int64_t work, int threads) const {
        int64_t g = (work + threads - 1) / threads;
        g = std::min<int64_t>(g, static_cast<int64_t>(sms_) * 8);
        return static_cast<unsigned>(std::max<int64_t>(g, 1));
    }

    void upload_models() {
        LFM_CUDA_CHECK(cudaMemcpyAsync(models_dev_, host_models_.data(), sizeof(ModelDev) * K_,
                                       cudaMemcpyHostToDevice, s_));
    }

    MergeKernelArgs kernel_args(int sp) {
        MergeKernelArgs ka{};
        ka.base = base_;
        ka.bdtype = bdt_;
        ka.out = a_.out->data;
        ka.odtype = static_cast<int>(a_.out->dtype);
        ka.n = n_;
        ka.K = K_;
        ka.models = models_dev_;
        ka.dmask = dmask_;
        ka.sparsifier = sp;
        ka.consensus = a_.consensus;
        ka.normalize = a_.normalize;
        ka.unweighted = a_.consensus_unweighted;
        ka.dcount = a_.disjoint_count;
        ka.vec = vec_;
        ka.inv_plain_div = 1.0f;  // set with the other coefficients (finalize_coefficients)
        ka.tab = nullptr;
        ka.lam = static_cast<float>(a_.lambda);
        ka.seed = a_.seed;
        ka.bad = bad_;
        return ka;
    }

    void sync() { LFM_CUDA_CHECK(cudaStreamSynchronize(s_)); }

    // The merge pass's coefficients from the final factors (merge_plan.h, as the CPU
    // kernel): fp32 coef/ecoef per model, and for consensus with K <= 8 the fp32 1/divisor
    // of every agreement pattern.
    void finalize_coefficients(MergeKernelArgs& ka) {
        std::vector<double> factor(static_cast<size_t>(K_));
        for (int i = 0; i < K_; ++i) factor[i] = host_models_[i].f;
        const Coefficients cf = merge_coefficients(a_, factor);
        for (int i = 0; i < K_; ++i) {
            ModelDev& m = host_models_[i];
            m.coef = cf.coef[i];
            m.ecoef = cf.ecoef[i];
            m.dw = cf.dshare[i];
        }
        upload_models();
        ka.inv_plain_div = cf.inv_plain_div;
        if (cf.table) {
            tab_host_ = cf.inv_div;
            float* tab = scratch_.alloc<float>(tab_host_.size());
            LFM_CUDA_CHECK(cudaMemcpyAsync(tab, tab_host_.data(), sizeof(float) * tab_host_.size(),
                                           cudaMemcpyHostToDevice, s_));
            ka.tab = tab;
        }
    }

    // Name the first non-finite element like the CPU kernel does.
    void check_bad() {
        ull e = 0;
        LFM_CUDA_CHECK(cudaMemcpyAsync(&e, bad_, sizeof(ull), cudaMemcpyDeviceToHost, s_));
        sync();
        if (e == ~0ull) return;
        auto value_at = [&](const lfm_tensor* t) {
            uint32_t raw = 0;
            const size_t sz = dtype_size(t->dtype);
            LFM_CUDA_CHECK(cudaMemcpy(&raw, static_cast<const char*>(t->data) + e * sz, sz, cudaMemcpyDeviceToHost));
            if (t->dtype == LFM_DTYPE_F16) return f16_to_f32(static_cast<uint16_t>(raw));
            if (t->dtype == LFM_DTYPE_BF16) return bf16_to_f32(static_cast<uint16_t>(raw));
            return bits_f32(raw);
        };
        if (a_.base) {
            float v = value_at(a_.base);
            if (!std::isfinite(v))
                fail(LFM_STATUS_NONFINITE, "non-finite value (", v, ") in base at element ", e, " of tensor '",
                     a_.name, "'");
        }
        for (int i = 0; i < K_; ++i) {
            float v = value_at(a_.models[i]);
            if (!std::isfinite(v))
                fail(LFM_STATUS_NONFINITE, "non-finite value (", v, ") in ", a_.model_label(i), " at element ", e,
                     " of tensor '", a_.name, "'");
        }
        fail(LFM_STATUS_NONFINITE, "task vector overflows float32 at element ", e, " of tensor '", a_.name, "'");
    }

    // ---- radix select ----------------------------------------------------------------------
    void select() {
        CutPlan plan = plan_cuts(a_.sparsifier, n_, a_.d, a_.gamma);
        std::vector<HostQuery> qs;
        for (const CutQuery& cq : plan.queries) qs.push_back(HostQuery{cq.model, cq.pos, cq.upper});
        if (!qs.empty()) run_queries(qs);
        for (const HostQuery& q : qs) {
            Cut& c = plan.cuts[q.model];
            const TieNeed need = apply_cut_answer(a_.sparsifier, n_, CutQuery{q.model, q.pos, q.upper}, q.value,
                                                  q.c_lt, q.c_eq, c);
            if (need.field != TieField::None) *tie_target(c, need.field) = nth_tie(q.model, q.value, need.ordinal);
        }
        for (int i = 0; i < K_; ++i) {
            ModelDev& m = host_models_[i];
            const Cut& c = plan.cuts[i];
            if (c.none) {
                m.lo_v = 1;  // empty range
                m.hi_v = 0;
                continue;
            }
            m.lo_v = c.lo_v;
            m.hi_v = c.hi_v;
            m.lo_emin = c.lo_emin;
            m.lo_emax = c.lo_emax;
            m.hi_emin = c.hi_emin;
            m.hi_emax = c.hi_emax;
        }
    }

    void run_queries(std::vector<HostQuery>& qs) {
        const int nq = static_cast<int>(qs.size());
        QueryDev* qd = scratch_.alloc<QueryDev>(static_cast<size_t>(nq));
        ull* hist = scratch_.alloc<ull>(static_cast<size_t>(nq) * kBins);
        std::vector<QueryDev> hq(static_cast<size_t>(nq));
        std::vector<ull> h(static_cast<size_t>(nq) * kBins);
        for (int pass = 0; pass < 3; ++pass) {
            for (int i = 0; i < nq; ++i)
                hq[i] = QueryDev{a_.models[qs[i].model]->data, static_cast<int>(a_.models[qs[i].model]->dtype),
                                 qs[i].prefix};
            LFM_CUDA_CHECK(cudaMemcpyAsync(qd, hq.data(), sizeof(QueryDev) * nq, cudaMemcpyHostToDevice, s_));
            LFM_CUDA_CHECK(cudaMemsetAsync(hist, 0, sizeof(ull) * nq * kBins, s_));
            dim3 grid(grid_for((n_ + 3) / 4, kThreads), static_cast<unsigned>(nq));
            k_hist<<<grid, kThreads, 0, s_>>>(base_, bdt_, qd, pass, n_, vec_, hist, bad_);
            LFM_CUDA_CHECK(cudaGetLastError());
            LFM_CUDA_CHECK(cudaMemcpyAsync(h.data(), hist, sizeof(ull) * nq * kBins, cudaMemcpyDeviceToHost, s_));
            sync();
            if (pass == 0) check_bad();
            const int bins = 1 << kDigitBits[pass];
            for (int i = 0; i < nq; ++i) {
                HostQuery& q = qs[i];
                const ull* t = h.data() + static_cast<int64_t>(i) * kBins;
                int64_t cum = q.below;
                bool found = false;
                for (int bin = 0; bin < bins; ++bin) {
                    const int64_t c = static_cast<int64_t>(t[bin]);
                    if (cum + c > q.pos) {
                        q.prefix = (q.prefix << kDigitBits[pass]) | static_cast<uint32_t>(bin);
                        q.below = cum;
                        if (pass == 2) {
                            q.value = q.prefix;
                            q.c_lt = cum;
                            q.c_eq = c;
                        }
                        found = true;
                        break;
                    }
                    cum += c;
                }
                if (!found) fail(LFM_STATUS_INTERNAL, "radix select ran past the histogram (model ", q.model, ")");
            }
        }
    }

    int64_t nth_tie(int model, uint32_t v, int64_t ordinal) {
        const lfm_tensor* x = a_.models[model];
        int* cnt = scratch_.alloc<int>(static_cast<size_t>(nchunks_));
        k_tie_count<<<static_cast<unsigned>(nchunks_), kChunkThreads, 0, s_>>>(
            base_, bdt_, x->data, static_cast<int>(x->dtype), n_, vec_, v, cnt);
        LFM_CUDA_CHECK(cudaGetLastError());
        std::vector<int> hc(static_cast<size_t>(nchunks_));
        LFM_CUDA_CHECK(cudaMemcpyAsync(hc.data(), cnt, sizeof(int) * nchunks_, cudaMemcpyDeviceToHost, s_));
        sync();
        int64_t cum = 0;
        for (int64_t blk = 0; blk < nchunks_; ++blk) {
            if (cum + hc[blk] > ordinal) {
                long long* res = scratch_.alloc<long long>(1);
                LFM_CUDA_CHECK(cudaMemsetAsync(res, 0xff, sizeof(long long), s_));
                k_tie_locate<<<1, kLocateThreads, 0, s_>>>(base_, bdt_, x->data, static_cast<int>(x->dtype), n_, vec_,
                                                           v, blk, static_cast<int>(ordinal - cum), res);
                LFM_CUDA_CHECK(cudaGetLastError());
                long long idx = -1;
                LFM_CUDA_CHECK(cudaMemcpyAsync(&idx, res, sizeof(long long), cudaMemcpyDeviceToHost, s_));
                sync();
                if (idx < 0) break;
                return idx;
            }
            cum += hc[blk];
        }
        fail(LFM_STATUS_INTERNAL, "radix select lost a tie (model ", model, ")");
    }

    // ---- DELLA masks ----------------------------------------------------------------------------
    void della_masks() {
        const int64_t rows = a_.rows, cols = a_.cols;
        if (cols <= 0) return;
        dmask_ = scratch_.alloc<uint8_t>(static_cast<size_t>(n_) * K_);
        int jbits = 0;
        while ((int64_t(1) << jbits) < cols) ++jbits;
        const int end_bit = 31 + jbits;
        if (end_bit > 64) fail(LFM_STATUS_INVALID_ARGUMENT, "della: rows of ", cols, " columns are too long");
        const int64_t chunk_rows = std::max<int64_t>(1, std::min<int64_t>(rows, kDellaChunkElems / cols));
        if (chunk_rows * cols >= (int64_t(1) << 31))
            fail(LFM_STATUS_INVALID_ARGUMENT, "della: a row of ", cols, " columns is too long for the GPU sort");
        const int64_t chunk_elems = chunk_rows * cols;
        ull* keys_in = scratch_.alloc<ull>(static_cast<size_t>(chunk_elems));
        ull* keys_out = scratch_.alloc<ull>(static_cast<size_t>(chunk_elems));
        int* offsets = scratch_.alloc<int>(static_cast<size_t>(chunk_rows + 1));
        long long* thr_dev = scratch_.alloc<long long>(static_cast<size_t>(cols));
        size_t temp_bytes = 0;
        LFM_CUDA_CHECK(cub::DeviceSegmentedRadixSort::SortKeys(
            nullptr, temp_bytes, keys_in, keys_out, static_cast<int>(chunk_elems), static_cast<int>(chunk_rows),
            offsets, offsets + 1, 0, end_bit, s_));
        void* temp = scratch_.alloc<char>(temp_bytes);
        std::vector<long long> thr(static_cast<size_t>(cols));
        for (int i = 0; i < K_; ++i) {
            // keep threshold per rank (merge_plan.h, the CPU kernel's table)
            const std::vector<uint64_t> t = della_thresholds(cols, a_.d[i], a_.eps[i]);
            for (int64_t r = 0; r < cols; ++r) thr[r] = static_cast<long long>(t[r]);
            LFM_CUDA_CHECK(cudaMemcpyAsync(thr_dev, thr.data(), sizeof(long long) * cols, cudaMemcpyHostToDevice, s_));
            const lfm_tensor* x = a_.models[i];
            uint8_t* mask = dmask_ + static_cast<int64_t>(i) * n_;
            for (int64_t r0 = 0; r0 < rows; r0 += chunk_rows) {
                const int64_t nr = std::min(chunk_rows, rows - r0);
                const int64_t len = nr * cols, e0 = r0 * cols;
                k_della_keys<<<grid_for(len, kThreads), kThreads, 0, s_>>>(
                    base_, bdt_, x->data, static_cast<int>(x->dtype), e0, len, cols, jbits, keys_in, bad_);
                k_row_offsets<<<grid_for(nr + 1, kThreads), kThreads, 0, s_>>>(nr, cols, offsets);
                LFM_CUDA_CHECK(cudaGetLastError());
                size_t tb = temp_bytes;
                LFM_CUDA_CHECK(cub::DeviceSegmentedRadixSort::SortKeys(
                    temp, tb, keys_in, keys_out, static_cast<int>(len), static_cast<int>(nr), offsets, offsets + 1, 0,
                    end_bit, s_));
                k_della_apply<<<grid_for(len, kThreads), kThreads, 0, s_>>>(keys_out, e0, len, cols, jbits, thr_dev,
                                                                            a_.seed, a_.stream[i], mask);
                LFM_CUDA_CHECK(cudaGetLastError());
            }
            sync();  // thr is rewritten for the next model
            if (i == 0) check_bad();
        }
        check_bad();
    }

    // ---- L1 factors -------------------------------------------------------------------------------
    void l1_factors(const MergeKernelArgs& ka) {
        double* part = scratch_.alloc<double>(static_cast<size_t>(2 * nchunks_));
        std::vector<double> hp(static_cast<size_t>(2 * nchunks_));
        for (int i = 0; i < K_; ++i) {
            k_l1<<<static_cast<unsigned>(nchunks_), kChunkThreads, 0, s_>>>(ka, i, part, nchunks_);
            LFM_CUDA_CHECK(cudaGetLastError());
            LFM_CUDA_CHECK(cudaMemcpyAsync(hp.data(), part, sizeof(double) * 2 * nchunks_, cudaMemcpyDeviceToHost, s_));
            sync();
            if (i == 0) check_bad();
            double t = 0.0, k = 0.0;
            for (int64_t c = 0; c < nchunks_; ++c) {
                t += hp[c];
                k += hp[nchunks_ + c];
            }
            host_models_[i].f = l1_factor(t, k);
        }
    }

    const MergeArgs& a_;
    cudaStream_t s_;
    Scratch scratch_;
    const int K_;
    const int64_t n_;
    int sms_ = 1;
    bool vec_ = false;
    const void* base_ = nullptr;
    int bdt_ = 0;
    ull* bad_ = nullptr;
    int64_t nchunks_ = 0;
    std::vector<ModelDev> host_models_;
    std::vector<float> tab_host_;
    ModelDev* models_dev_ = nullptr;
    uint8_t* dmask_ = nullptr;
};

}  // namespace

void merge_cuda(const MergeArgs& a, void* stream) {
    check_device(*a.out, LFM_DEVICE_CUDA, "out");
    for (const lfm_tensor* m : a.models) check_device(*m, LFM_DEVICE_CUDA, "model");
    if (a.base) check_device(*a.base, LFM_DEVICE_CUDA, "base");
    DeviceGuard guard(a.out->device_id);
    cudaStream_t s = static_cast<cudaStream_t>(stream);
    CudaMerge(a, s).run();
    LFM_CUDA_CHECK(cudaStreamSynchronize(s));  // scratch is freed stream-ordered; surface async faults here
}

}  // namespace lfm::merge
