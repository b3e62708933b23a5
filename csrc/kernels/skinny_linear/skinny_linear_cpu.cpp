// Skinny-M linear on the CPU: the driver (x to fp32, tasks over N, bias, rounding) and the
// baseline row kernel. See skinny_linear.h for the plan.
#include <algorithm>
#include <cstring>
#include <vector>

#include "core/cpu_features.h"
#include "core/dtype.h"
#include "core/tensor.h"
#include "core/thread_pool.h"
#include "kernels/skinny_linear/skinny_linear.h"

namespace lfm::skinny {
namespace {

constexpr int64_t kLanes = 8;      // baseline partial sums per dot (the compiler's SSE/NEON width x 2)
constexpr int64_t kMaxRows = 128;  // output rows per task: the fp32 tile is at most 16 x 128 floats

using RowsFn = void (*)(const float*, int64_t, int64_t, int64_t, const void*, lfm_dtype, int64_t, int64_t, float*, int64_t);

RowsFn pick_rows(lfm_dtype w_dt) {
    if (avx512_ok(w_dt)) return rows_avx512;
    if (avx2_ok(w_dt)) return rows_avx2;
    return rows_baseline;
}

// The first 64-byte-aligned element of v (v holds 64 bytes of slack for it).
template <class T>
T* aligned64(std::vector<T>& v) {
    return v.data() + ((64 - reinterpret_cast<uintptr_t>(v.data()) % 64) % 64) / sizeof(T);
}

// Rows per task: about four tasks per worker so dynamic scheduling evens out a busy core,
// a multiple of 8 (every kernel's row pass divides it), at most kMaxRows.
int64_t rows_per_task(int64_t N, int workers) {
    int64_t nb = (N + 4 * workers - 1) / (4 * workers);
    nb = (nb + 7) / 8 * 8;
    return std::clamp<int64_t>(nb, 8, kMaxRows);
}

}  // namespace

void rows_baseline(const float* xs, int64_t ldx, int64_t M, int64_t K, const void* w, lfm_dtype w_dt, int64_t n0, int64_t n1,
                   float* out, int64_t ldo) {
    std::vector<float> wrow(static_cast<size_t>(K));
    const size_t es = dtype_size(w_dt);
    for (int64_t n = n0; n < n1; ++n) {
        load_f32(static_cast<const char*>(w) + static_cast<size_t>(n * K) * es, w_dt, wrow.data(), K);
        for (int64_t m = 0; m < M; ++m) {
            const float* x = xs + m * ldx;
            float lane[kLanes] = {};
            int64_t k = 0;
            for (; k + kLanes <= K; k += kLanes)
                for (int64_t l = 0; l < kLanes; ++l) lane[l] += wrow[static_cast<size_t>(k + l)] * x[k + l];
            for (int64_t l = 0; k + l < K; ++l) lane[l] += wrow[static_cast<size_t>(k + l)] * x[k + l];
            out[(n - n0) * ldo + m] += ((lane[0] + lane[4]) + (lane[1] + lane[5])) +
                                      ((lane[2] + lane[6]) + (lane[3] + lane[7]));
        }
    }
}

void skinny_linear_cpu(const Args& a) {
    const int64_t M = a.M, N = a.N, K = a.K;
    if (M == 0 || N == 0) return;
    // x is copied once into a block that stays hot in cache for every row pass (so y may
    // alias x: x is never read after the first store). bf16 x and W with vdpbf16ps: x stays
    // bf16 (row stride padded like xs below, zero past K); otherwise fp32.
    const bool dot = avx512_bf16_dot_ok(a.x_dt, a.w_dt);
    std::vector<uint16_t> x16buf;
    uint16_t* xs16 = nullptr;
    const int64_t ldx16 = (K + 31) / 32 * 32 + 32;
    if (dot) {
        x16buf.assign(static_cast<size_t>(M * ldx16 + 32), 0);
        xs16 = aligned64(x16buf);
        for (int64_t m = 0; m < M; ++m)
            std::memcpy(xs16 + m * ldx16, static_cast<const uint16_t*>(a.x) + m * a.x_ld, static_cast<size_t>(K) * 2);
    }
    // Rows of xs are 64 bytes longer than K rounded up to 16 floats: with a power-of-two row
    // length (K = 1024: 4 KiB) the M rows would all fall into the same L1 set and evict each
    // other (measured: M = 16 at K = 1024 ran 7x slower than M = 8).
    const int64_t ldx = (K + 15) / 16 * 16 + 16;
    // 64-byte aligned, so no 16-float load of x straddles two cache lines
    std::vector<float> xbuf(dot ? 0 : static_cast<size_t>(M * ldx + 16));
    float* xs = dot ? nullptr : aligned64(xbuf);
    const size_t xes = dtype_size(a.x_dt);
    for (int64_t m = 0; m < M && !dot; ++m)
        load_f32(static_cast<const char*>(a.x) + static_cast<size_t>(m * a.x_ld) * xes, a.x_dt, xs + m * ldx, K);
    std::vector<float> bias;
    if (a.bias) {
        bias.resize(static_cast<size_t>(N));
        load_f32(a.bias, a.b_dt, bias.data(), N);
    }
    const RowsFn rows = pick_rows(a.w_dt);
    const int workers = plan_workers(N, a.n_threads);
    const int64_t nb = rows_per_task(N, workers);
    const int64_t n_tasks = (N + nb - 1) / nb;
    const size_t yes = dtype_size(a.y_dt);
    parallel_for(n_tasks, a.n_threads, [&](int64_t t, int) {
        const int64_t n0 = t * nb, n1 = std::min(N, n0 + nb), cnt = n1 - n0;
        float tile[kMaxM * kMaxRows];  // [row][m], M floats per output row
        float row[kMaxRows];
        std::fill(tile, tile + M * cnt, 0.0f);
        if (K > 0 && dot)
            rows_avx512_bf16_dot(xs16, ldx16, M, K, a.w, n0, n1, tile);
        else if (K > 0)
            rows(xs, ldx, M, K, a.w, a.w_dt, n0, n1, tile, M);
        for (int64_t m = 0; m < M; ++m) {
            for (int64_t j = 0; j < cnt; ++j) row[j] = tile[j * M + m];
            if (a.bias)
                for (int64_t j = 0; j < cnt; ++j) row[j] += bias[static_cast<size_t>(n0 + j)];
            store_f32(row, a.y_dt, static_cast<char*>(a.y) + static_cast<size_t>(m * a.y_ld + n0) * yes, cnt);
        }
    });
}

}  // namespace lfm::skinny
