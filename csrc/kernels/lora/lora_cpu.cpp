// Multi-LoRA batched ops on the CPU (docs/spec/lora.md).
//
// Plan: tokens are counting-sorted by slot (stable; slot -1 dropped), so each adapter's
// tokens form one group and its A/B rows are streamed from memory once per step and
// reused from cache for every token of the group (segment form: segments become token
// runs first, then the same grouping, so two requests sharing an adapter share its reads).
// Groups are cut into token tiles; work items are (slice, tile, chunk):
//   shrink: chunk = a range of H_in. Each item streams the group's r_s rows of A over its
//           range once and dots every row with all tile tokens (x tile held in L1 as fp32).
//           When there are few items (decode with one shared adapter) H_in is split into
//           several chunks whose partial sums are reduced afterwards in chunk order; the
//           split depends on the shapes and the slot map only, never on the thread count,
//           so results are bit-identical for any number of threads.
//   expand: chunk = a range of H_out columns. The item transposes B[s, cols, :r_s] into an
//           fp32 [r_s, cols] tile once and updates every tile token with r_s broadcast FMAs
//           per 8 columns; delta is accumulated apart from y, then y = round(y + delta) once.
// Only the first r_s rows of A and columns of B are read: compute and bytes follow each
// adapter's real rank. Fused apply keeps u in a small fp32 buffer (T x R per slice) that
// stays in cache between the two phases.
#include <algorithm>
#include <cstring>

#include "core/cpu_features.h"
#include "core/dtype.h"
#include "core/status.h"
#include "core/tensor.h"
#include "core/thread_pool.h"
#include "kernels/lora/lora.h"

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define LFM_LORA_X86 1
#endif

namespace lfm::lora {
namespace {

constexpr int kTileS = 8;          // tokens per shrink item (x tile: 8 x kSub fp32 = 64 KiB)
constexpr int kTileE = 128;        // tokens per expand item (they share one transposed B tile)
// x tile budget of a shrink item (fp32 elements, 256 KiB: stays in L2). The H_in sub-block is
// as long as the budget allows for the tile's tokens, so A rows are streamed sequentially
// (a short sub-block would hop between the r rows and defeat the hardware prefetcher).
constexpr int64_t kXTile = 64 << 10;
constexpr int64_t kMinK = 512;     // smallest H_in chunk when splitting for parallelism
constexpr int64_t kNChunk = 256;   // H_out columns per expand item
// The shrink splits H_in (partial sums reduced afterwards) only below this many items: a
// split cuts every A row into pieces, which costs streaming speed (a mixed decode step's
// 16 one-adapter tiles stream whole rows instead).
constexpr int64_t kShrinkTargetItems = 16;
// Waking a worker costs microseconds (more on a loaded machine): small steps run on fewer
// threads, one per this many bytes streamed. Results do not depend on it.
constexpr int64_t kBytesPerWorker = 256 << 10;
enum ScratchBuf { kXs, kARow, kSAcc, kBt, kBRow, kEAcc, kYBuf, kC, kScratchBufs };

int size_workers(int64_t items, int64_t bytes, int n_threads) {
    const int cap = n_threads > 0 ? n_threads : get_num_threads();
    const int64_t by_size = std::max<int64_t>(1, bytes / kBytesPerWorker);
    return plan_workers(items, static_cast<int>(std::min<int64_t>(cap, by_size)));
}

// ---- inner loops (portable + AVX2/FMA picked at run time) ---------------------------------

// out[i] += dot(a[0..n), xs[i][0..n)) for i < nt
void dot_tile_portable(const float* a, const float* const* xs, int nt, int64_t n, float* out) {
    for (int i = 0; i < nt; ++i) {
        float s0 = 0.f, s1 = 0.f, s2 = 0.f, s3 = 0.f;
        const float* x = xs[i];
        int64_t k = 0;
        for (; k + 4 <= n; k += 4) {
            s0 += a[k] * x[k];
            s1 += a[k + 1] * x[k + 1];
            s2 += a[k + 2] * x[k + 2];
            s3 += a[k + 3] * x[k + 3];
        }
        for (; k < n; ++k) s0 += a[k] * x[k];
        out[i] += (s0 + s1) + (s2 + s3);
    }
}

// acc[o] = sum_j c[j] * bt[j * ldb + o] for o < n
void axpy_rows_portable(const float* c, const float* bt, int64_t ldb, int r, int64_t n, float* acc) {
    for (int64_t o = 0; o < n; ++o) acc[o] = 0.f;
    for (int j = 0; j < r; ++j) {
        const float cj = c[j];
        const float* b = bt + j * ldb;
        for (int64_t o = 0; o < n; ++o) acc[o] += cj * b[o];
    }
}

// out[q * ldo + o] = dot(c[q * ldc .. + rp), bf[o * ld .. + rp)) for o < n, q < nq
// (rp a multiple of 8, c zero-padded)
void gemv_rows_portable(const float* bf, int64_t ld, int64_t n, int rp, const float* c, int64_t ldc, int nq,
                        float* out, int64_t ldo) {
    for (int q = 0; q < nq; ++q)
        for (int64_t o = 0; o < n; ++o) {
            const float* b = bf + o * ld;
            float s = 0.f;
            for (int j = 0; j < rp; ++j) s += c[q * ldc + j] * b[j];
            out[q * ldo + o] = s;
        }
}

#ifdef LFM_LORA_X86
__attribute__((target("avx2,fma"))) inline float hsum256(__m256 v) {
    __m128 lo = _mm256_castps256_ps128(v), hi = _mm256_extractf128_ps(v, 1);
    lo = _mm_add_ps(lo, hi);
    lo = _mm_add_ps(lo, _mm_movehl_ps(lo, lo));
    lo = _mm_add_ss(lo, _mm_movehdup_ps(lo));
    return _mm_cvtss_f32(lo);
}

// Load 8 elements of a row in its storage dtype as fp32 (conversion stays in registers, so
// A is streamed straight from memory into the FMAs, with no fp32 copy of the row).
struct LdF32 {
    static constexpr int kBytes = 4;
    __attribute__((target("avx2,fma"))) static __m256 ld(const void* p, int64_t k) {
        return _mm256_loadu_ps(static_cast<const float*>(p) + k);
    }
    static float one(const void* p, int64_t k) { return static_cast<const float*>(p)[k]; }
};
struct LdBF16 {
    static constexpr int kBytes = 2;
    __attribute__((target("avx2,fma"))) static __m256 ld(const void* p, int64_t k) {
        const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(p) + k));
        return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
    }
    static float one(const void* p, int64_t k) { return bf16_to_f32(static_cast<const uint16_t*>(p)[k]); }
};
struct LdF16 {
    static constexpr int kBytes = 2;
    __attribute__((target("avx2,fma,f16c"))) static __m256 ld(const void* p, int64_t k) {
        return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(p) + k)));
    }
    static float one(const void* p, int64_t k) { return f16_to_f32(static_cast<const uint16_t*>(p)[k]); }
};

template <typename L>
__attribute__((target("avx2,fma,f16c"))) void dot_tile_avx2(const void* a, const float* const* xs, int nt,
                                                           int64_t n, float* out) {
    const int64_t n8 = n & ~int64_t(7);
    int i = 0;
    // Four tokens share each load of the A row: four independent FMA chains.
    for (; i + 4 <= nt; i += 4) {
        const float *x0 = xs[i], *x1 = xs[i + 1], *x2 = xs[i + 2], *x3 = xs[i + 3];
        __m256 s0 = _mm256_setzero_ps(), s1 = s0, s2 = s0, s3 = s0;
        for (int64_t k = 0; k < n8; k += 8) {
            const __m256 va = L::ld(a, k);
            s0 = _mm256_fmadd_ps(va, _mm256_loadu_ps(x0 + k), s0);
            s1 = _mm256_fmadd_ps(va, _mm256_loadu_ps(x1 + k), s1);
            s2 = _mm256_fmadd_ps(va, _mm256_loadu_ps(x2 + k), s2);
            s3 = _mm256_fmadd_ps(va, _mm256_loadu_ps(x3 + k), s3);
        }
        float r0 = hsum256(s0), r1 = hsum256(s1), r2 = hsum256(s2), r3 = hsum256(s3);
        for (int64_t k = n8; k < n; ++k) {
            const float av = L::one(a, k);
            r0 += av * x0[k];
            r1 += av * x1[k];
            r2 += av * x2[k];
            r3 += av * x3[k];
        }
        out[i] += r0;
        out[i + 1] += r1;
        out[i + 2] += r2;
        out[i + 3] += r3;
    }
    for (; i < nt; ++i) {
        const float* x = xs[i];
        __m256 s0 = _mm256_setzero_ps(), s1 = s0;
        int64_t k = 0;
        for (; k + 16 <= n8; k += 16) {
            s0 = _mm256_fmadd_ps(L::ld(a, k), _mm256_loadu_ps(x + k), s0);
            s1 = _mm256_fmadd_ps(L::ld(a, k + 8), _mm256_loadu_ps(x + k + 8), s1);
        }
        for (; k < n8; k += 8) s0 = _mm256_fmadd_ps(L::ld(a, k), _mm256_loadu_ps(x + k), s0);
        float r = hsum256(_mm256_add_ps(s0, s1));
        for (k = n8; k < n; ++k) r += L::one(a, k) * x[k];
        out[i] += r;
    }
}

// Two A rows x four tokens per pass: eight FMA chains for six loads (the one-row kernel
// needs five loads per four FMAs), for groups with many tokens (prefill, shared adapters).
// Leftover tokens (nt % 4) go through the one-row kernel, row by row.
template <typename L>
__attribute__((target("avx2,fma,f16c"))) void dot2_tile_avx2(const void* a0, const void* a1,
                                                            const float* const* xs, int nt, int64_t n,
                                                            float* out0, float* out1) {
    const int64_t n8 = n & ~int64_t(7);
    int i = 0;
    for (; i + 4 <= nt; i += 4) {
        const float *x0 = xs[i], *x1 = xs[i + 1], *x2 = xs[i + 2], *x3 = xs[i + 3];
        __m256 p0 = _mm256_setzero_ps(), p1 = p0, p2 = p0, p3 = p0, q0 = p0, q1 = p0, q2 = p0, q3 = p0;
        for (int64_t k = 0; k < n8; k += 8) {
            const __m256 va = L::ld(a0, k), vb = L::ld(a1, k);
            __m256 xv = _mm256_loadu_ps(x0 + k);
            p0 = _mm256_fmadd_ps(va, xv, p0);
            q0 = _mm256_fmadd_ps(vb, xv, q0);
            xv = _mm256_loadu_ps(x1 + k);
            p1 = _mm256_fmadd_ps(va, xv, p1);
            q1 = _mm256_fmadd_ps(vb, xv, q1);
            xv = _mm256_loadu_ps(x2 + k);
            p2 = _mm256_fmadd_ps(va, xv, p2);
            q2 = _mm256_fmadd_ps(vb, xv, q2);
            xv = _mm256_loadu_ps(x3 + k);
            p3 = _mm256_fmadd_ps(va, xv, p3);
            q3 = _mm256_fmadd_ps(vb, xv, q3);
        }
        float r[8] = {hsum256(p0), hsum256(p1), hsum256(p2), hsum256(p3),
                      hsum256(q0), hsum256(q1), hsum256(q2), hsum256(q3)};
        for (int64_t k = n8; k < n; ++k) {
            const float av = L::one(a0, k), bv = L::one(a1, k);
            r[0] += av * x0[k]; r[1] += av * x1[k]; r[2] += av * x2[k]; r[3] += av * x3[k];
            r[4] += bv * x0[k]; r[5] += bv * x1[k]; r[6] += bv * x2[k]; r[7] += bv * x3[k];
        }
        for (int q = 0; q < 4; ++q) {
            out0[i + q] += r[q];
            out1[i + q] += r[4 + q];
        }
    }
    if (i < nt) {
        dot_tile_avx2<L>(a0, xs + i, nt - i, n, out0 + i);
        dot_tile_avx2<L>(a1, xs + i, nt - i, n, out1 + i);
    }
}

// Four A rows x NT (1..3) tokens per pass, for the few-token groups of a mixed decode
// batch (one or two tokens per adapter), where the one-row kernel waits on memory: an A row
// of 1024 fp32 is exactly one 4 KiB page, and the hardware prefetchers stop at page
// boundaries. Four rows in flight give four streams, and the next four rows (`pf`, the
// same offsets one group further) are prefetched while these are summed.
// out[q * NT + i] = dot(a[q][0..n), xs[i][0..n)).
template <typename L, int NT>
__attribute__((target("avx2,fma,f16c"))) void dot4_few_avx2(const char* a, int64_t row_bytes, const char* pf,
                                                            const float* const* xs, int64_t n, float* out) {
    __m256 s[4][NT];
    for (int q = 0; q < 4; ++q)
        for (int i = 0; i < NT; ++i) s[q][i] = _mm256_setzero_ps();
    const int64_t n8 = n & ~int64_t(7);
    constexpr int64_t kLine = 64 / L::kBytes;  // elements per cache line
    for (int64_t k = 0; k < n8; k += 8) {
        if (k % kLine == 0)
            for (int q = 0; q < 4; ++q) _mm_prefetch(pf + q * row_bytes + k * L::kBytes, _MM_HINT_T0);
        __m256 xv[NT];
        for (int i = 0; i < NT; ++i) xv[i] = _mm256_loadu_ps(xs[i] + k);
        for (int q = 0; q < 4; ++q) {
            const __m256 va = L::ld(a + q * row_bytes, k);
            for (int i = 0; i < NT; ++i) s[q][i] = _mm256_fmadd_ps(va, xv[i], s[q][i]);
        }
    }
    for (int q = 0; q < 4; ++q)
        for (int i = 0; i < NT; ++i) {
            float r = hsum256(s[q][i]);
            for (int64_t k = n8; k < n; ++k) r += L::one(a + q * row_bytes, k) * xs[i][k];
            out[q * NT + i] = r;
        }
}

template <typename L>
void dot4_few(const char* a, int64_t row_bytes, const char* pf, const float* const* xs, int nt, int64_t n,
              float* out) {
    if (nt == 1) dot4_few_avx2<L, 1>(a, row_bytes, pf, xs, n, out);
    else if (nt == 2) dot4_few_avx2<L, 2>(a, row_bytes, pf, xs, n, out);
    else dot4_few_avx2<L, 3>(a, row_bytes, pf, xs, n, out);
}

// Four tokens share each load of the transposed B tile: acc[q * ldacc + o] =
// sum_j c[q * ldc + j] * bt[j * ldb + o], q < 4 (16 columns per pass, eight FMA chains).
__attribute__((target("avx2,fma"))) void axpy4_rows_avx2(const float* c, int64_t ldc, const float* bt, int64_t ldb,
                                                        int r, int64_t n, float* acc, int64_t ldacc) {
    int64_t o = 0;
    for (; o + 16 <= n; o += 16) {
        __m256 v00 = _mm256_setzero_ps(), v01 = v00, v10 = v00, v11 = v00, v20 = v00, v21 = v00, v30 = v00,
               v31 = v00;
        for (int j = 0; j < r; ++j) {
            const __m256 b0 = _mm256_loadu_ps(bt + j * ldb + o), b1 = _mm256_loadu_ps(bt + j * ldb + o + 8);
            __m256 cj = _mm256_broadcast_ss(c + j);
            v00 = _mm256_fmadd_ps(cj, b0, v00);
            v01 = _mm256_fmadd_ps(cj, b1, v01);
            cj = _mm256_broadcast_ss(c + ldc + j);
            v10 = _mm256_fmadd_ps(cj, b0, v10);
            v11 = _mm256_fmadd_ps(cj, b1, v11);
            cj = _mm256_broadcast_ss(c + 2 * ldc + j);
            v20 = _mm256_fmadd_ps(cj, b0, v20);
            v21 = _mm256_fmadd_ps(cj, b1, v21);
            cj = _mm256_broadcast_ss(c + 3 * ldc + j);
            v30 = _mm256_fmadd_ps(cj, b0, v30);
            v31 = _mm256_fmadd_ps(cj, b1, v31);
        }
        _mm256_storeu_ps(acc + o, v00);
        _mm256_storeu_ps(acc + o + 8, v01);
        _mm256_storeu_ps(acc + ldacc + o, v10);
        _mm256_storeu_ps(acc + ldacc + o + 8, v11);
        _mm256_storeu_ps(acc + 2 * ldacc + o, v20);
        _mm256_storeu_ps(acc + 2 * ldacc + o + 8, v21);
        _mm256_storeu_ps(acc + 3 * ldacc + o, v30);
        _mm256_storeu_ps(acc + 3 * ldacc + o + 8, v31);
    }
    for (; o < n; ++o)
        for (int q = 0; q < 4; ++q) {
            float sum = 0.f;
            for (int j = 0; j < r; ++j) sum += c[q * ldc + j] * bt[j * ldb + o];
            acc[q * ldacc + o] = sum;
        }
}

__attribute__((target("avx2,fma"))) void axpy_rows_avx2(const float* c, const float* bt, int64_t ldb, int r,
                                                       int64_t n, float* acc) {
    int64_t o = 0;
    for (; o + 32 <= n; o += 32) {  // four independent chains of r FMAs
        __m256 v0 = _mm256_setzero_ps(), v1 = v0, v2 = v0, v3 = v0;
        for (int j = 0; j < r; ++j) {
            const __m256 cj = _mm256_broadcast_ss(c + j);
            const float* b = bt + j * ldb + o;
            v0 = _mm256_fmadd_ps(cj, _mm256_loadu_ps(b), v0);
            v1 = _mm256_fmadd_ps(cj, _mm256_loadu_ps(b + 8), v1);
            v2 = _mm256_fmadd_ps(cj, _mm256_loadu_ps(b + 16), v2);
            v3 = _mm256_fmadd_ps(cj, _mm256_loadu_ps(b + 24), v3);
        }
        _mm256_storeu_ps(acc + o, v0);
        _mm256_storeu_ps(acc + o + 8, v1);
        _mm256_storeu_ps(acc + o + 16, v2);
        _mm256_storeu_ps(acc + o + 24, v3);
    }
    for (; o + 8 <= n; o += 8) {
        __m256 v = _mm256_setzero_ps();
        for (int j = 0; j < r; ++j) v = _mm256_fmadd_ps(_mm256_broadcast_ss(c + j), _mm256_loadu_ps(bt + j * ldb + o), v);
        _mm256_storeu_ps(acc + o, v);
    }
    for (; o < n; ++o) {
        float s = 0.f;
        for (int j = 0; j < r; ++j) s += c[j] * bt[j * ldb + o];
        acc[o] = s;
    }
}

// Four B rows x NQ (1 or 2) tokens per step: each B row is loaded once for both tokens of
// a pair (mixed decode groups have one or two tokens per adapter), and one hadd tree gives
// four dots per token. A B tile of r = 16 fp32 spans four 4 KiB pages, where the hardware
// prefetchers stop, so the rows kPfRows ahead are prefetched.
template <int NQ>
__attribute__((target("avx2,fma"))) void gemv_rows_avx2_nq(const float* bf, int64_t ld, int64_t n, int rp,
                                                          const float* c, int64_t ldc, float* out, int64_t ldo) {
    constexpr int64_t kPfRows = 64;
    int64_t o = 0;
    for (; o + 4 <= n; o += 4) {
        for (int q = 0; q < 4; ++q) _mm_prefetch(reinterpret_cast<const char*>(bf + (o + kPfRows + q) * ld), _MM_HINT_T0);
        __m256 s[NQ][4];
        for (int t = 0; t < NQ; ++t)
            for (int q = 0; q < 4; ++q) s[t][q] = _mm256_setzero_ps();
        for (int j = 0; j < rp; j += 8) {
            __m256 cj[NQ];
            for (int t = 0; t < NQ; ++t) cj[t] = _mm256_loadu_ps(c + t * ldc + j);
            for (int q = 0; q < 4; ++q) {
                const __m256 b = _mm256_loadu_ps(bf + (o + q) * ld + j);
                for (int t = 0; t < NQ; ++t) s[t][q] = _mm256_fmadd_ps(b, cj[t], s[t][q]);
            }
        }
        for (int t = 0; t < NQ; ++t) {
            const __m256 h = _mm256_hadd_ps(_mm256_hadd_ps(s[t][0], s[t][1]), _mm256_hadd_ps(s[t][2], s[t][3]));
            _mm_storeu_ps(out + t * ldo + o, _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1)));
        }
    }
    for (; o < n; ++o)
        for (int t = 0; t < NQ; ++t) {
            __m256 v = _mm256_setzero_ps();
            for (int j = 0; j < rp; j += 8)
                v = _mm256_fmadd_ps(_mm256_loadu_ps(bf + o * ld + j), _mm256_loadu_ps(c + t * ldc + j), v);
            out[t * ldo + o] = hsum256(v);
        }
}

__attribute__((target("avx2,fma"))) void gemv_rows_avx2(const float* bf, int64_t ld, int64_t n, int rp,
                                                       const float* c, int64_t ldc, int nq, float* out,
                                                       int64_t ldo) {
    int q = 0;
    for (; q + 2 <= nq; q += 2) gemv_rows_avx2_nq<2>(bf, ld, n, rp, c + q * ldc, ldc, out + q * ldo, ldo);
    if (q < nq) gemv_rows_avx2_nq<1>(bf, ld, n, rp, c + q * ldc, ldc, out + q * ldo, ldo);
}

__attribute__((target("avx2,fma"))) void add_avx2(float* y, const float* d, int64_t n) {
    int64_t o = 0;
    for (; o + 8 <= n; o += 8) _mm256_storeu_ps(y + o, _mm256_add_ps(_mm256_loadu_ps(y + o), _mm256_loadu_ps(d + o)));
    for (; o < n; ++o) y[o] += d[o];
}
#endif

void axpy4_rows_portable(const float* c, int64_t ldc, const float* bt, int64_t ldb, int r, int64_t n, float* acc,
                         int64_t ldacc) {
    for (int q = 0; q < 4; ++q) axpy_rows_portable(c + q * ldc, bt, ldb, r, n, acc + q * ldacc);
}

void add_portable(float* y, const float* d, int64_t n) {
    for (int64_t o = 0; o < n; ++o) y[o] += d[o];
}

using DotFn = void (*)(const void*, const float* const*, int, int64_t, float*);
using Dot2Fn = void (*)(const void*, const void*, const float* const*, int, int64_t, float*, float*);
using Dot4FewFn = void (*)(const char*, int64_t, const char*, const float* const*, int, int64_t, float*);

struct Kernels {
    // dot_tile[dtype of A] when the row is read in place (AVX2); nullptr = convert the row first
    DotFn dot_direct[3] = {nullptr, nullptr, nullptr};
    Dot2Fn dot2_direct[3] = {nullptr, nullptr, nullptr};
    Dot4FewFn dot4_few_direct[3] = {nullptr, nullptr, nullptr};  // 1..3 tokens
    void (*axpy4_rows)(const float*, int64_t, const float*, int64_t, int, int64_t, float*, int64_t) =
        axpy4_rows_portable;
    void (*dot_tile)(const float*, const float* const*, int, int64_t, float*) = dot_tile_portable;
    void (*axpy_rows)(const float*, const float*, int64_t, int, int64_t, float*) = axpy_rows_portable;
    void (*add)(float*, const float*, int64_t) = add_portable;
    void (*gemv_rows)(const float*, int64_t, int64_t, int, const float*, int64_t, int, float*, int64_t) =
        gemv_rows_portable;
    Kernels() {
#ifdef LFM_LORA_X86
        if (cpu_has_avx2()) {
            dot_direct[LFM_DTYPE_F32] = dot_tile_avx2<LdF32>;
            dot_direct[LFM_DTYPE_BF16] = dot_tile_avx2<LdBF16>;
            dot2_direct[LFM_DTYPE_F32] = dot2_tile_avx2<LdF32>;
            dot2_direct[LFM_DTYPE_BF16] = dot2_tile_avx2<LdBF16>;
            dot4_few_direct[LFM_DTYPE_F32] = dot4_few<LdF32>;
            dot4_few_direct[LFM_DTYPE_BF16] = dot4_few<LdBF16>;
            if (cpu_has_f16c()) {
                dot_direct[LFM_DTYPE_F16] = dot_tile_avx2<LdF16>;
                dot2_direct[LFM_DTYPE_F16] = dot2_tile_avx2<LdF16>;
                dot4_few_direct[LFM_DTYPE_F16] = dot4_few<LdF16>;
            }
            axpy4_rows = axpy4_rows_avx2;
            axpy_rows = axpy_rows_avx2;
            add = add_avx2;
            gemv_rows = gemv_rows_avx2;
        }
#endif
    }
};

const Kernels& kernels() {
    static const Kernels k;
    return k;
}

// ---- plan ------------------------------------------------------------------------------

struct Tile {
    int32_t slot;
    int64_t begin, end;  // positions in Plan::order
};

struct Plan {
    std::vector<int32_t> order;   // active tokens sorted by slot
    std::vector<Tile> shrink_tiles, expand_tiles;
};

Plan make_plan(const LoraArgs& a) {
    const int64_t T = a.T, n_slots = a.n_slots;
    std::vector<int32_t> slot(static_cast<size_t>(T), -1);
    if (!a.segments) {
        if (T > 0) std::memcpy(slot.data(), a.token_slot, static_cast<size_t>(T) * sizeof(int32_t));
    } else {
        for (int64_t i = 0; i < a.S; ++i) {
            // clamped so that unchecked malformed segments can never index outside [0, T)
            const int64_t b = std::clamp<int64_t>(a.seg_start[i], 0, T);
            const int64_t e = std::clamp<int64_t>(a.seg_start[i + 1], 0, T);
            for (int64_t t = b; t < e; ++t) slot[static_cast<size_t>(t)] = a.seg_slot[i];
        }
    }
    std::vector<int64_t> start(static_cast<size_t>(n_slots) + 1, 0);
    for (int64_t t = 0; t < T; ++t) {
        const int32_t s = slot[static_cast<size_t>(t)];
        if (s >= 0 && s < n_slots) ++start[static_cast<size_t>(s) + 1];  // out of range = no adapter
    }
    for (int64_t s = 0; s < n_slots; ++s) start[s + 1] += start[s];
    Plan p;
    p.order.resize(static_cast<size_t>(start[n_slots]));
    std::vector<int64_t> fill(start.begin(), start.end() - 1);
    for (int64_t t = 0; t < T; ++t) {
        const int32_t s = slot[static_cast<size_t>(t)];
        if (s >= 0 && s < n_slots) p.order[static_cast<size_t>(fill[s]++)] = static_cast<int32_t>(t);
    }
    for (int64_t s = 0; s < n_slots; ++s) {
        for (int64_t b = start[s]; b < start[s + 1]; b += kTileS)
            p.shrink_tiles.push_back({static_cast<int32_t>(s), b, std::min(b + kTileS, start[s + 1])});
        for (int64_t b = start[s]; b < start[s + 1]; b += kTileE)
            p.expand_tiles.push_back({static_cast<int32_t>(s), b, std::min(b + kTileE, start[s + 1])});
    }
    return p;
}

inline int rank_of(const Slice& sl, int32_t s) {
    const int32_t r = sl.ranks[s];
    return static_cast<int>(std::clamp<int64_t>(r, 0, sl.R));  // unchecked ranks never read past R_max
}

inline const char* at(const void* base, lfm_dtype dt, int64_t idx) {
    return static_cast<const char*>(base) + idx * static_cast<int64_t>(dtype_size(dt));
}

// ---- shrink: U[slice][t][0..r) = x[t] . A[s, j, :] (U row stride ldR, slice stride T*ldR) ----

// Per-thread scratch, kept across calls: the pool's threads are persistent, and a fresh
// (zero-filled, page-faulted) 256 KiB buffer per call and worker cost more than a decode
// step's whole LoRA term on small shapes. Grown on demand, never shrunk.
float* scratch(int which, int64_t n) {
    thread_local std::vector<float> bufs[kScratchBufs];
    auto& b = bufs[which];
    if (b.size() < static_cast<size_t>(n)) b.resize(static_cast<size_t>(n));
    return b.data();
}

void shrink_into(const LoraArgs& a, const Plan& p, float* U, int64_t ldR) {
    const int64_t T = a.T, H_in = a.H_in;
    const int n_sl = static_cast<int>(a.slices.size());
    const int64_t n_tiles = static_cast<int64_t>(p.shrink_tiles.size());
    if (n_tiles == 0 || H_in == 0) return;
    // Split H_in only when items are scarce (decided from shapes, not threads: determinism).
    const int64_t base_items = n_tiles * n_sl;
    int64_t nk = 1;
    if (base_items < kShrinkTargetItems)
        nk = std::min((kShrinkTargetItems + base_items - 1) / base_items, std::max<int64_t>(1, H_in / kMinK));
    const int64_t kc = ((H_in + nk - 1) / nk + 7) & ~int64_t(7);
    nk = (H_in + kc - 1) / kc;
    int64_t Rmax = 0;
    for (auto& s : a.slices) Rmax = std::max(Rmax, s.R);
    // Partial sums per H_in chunk when split: P[slice][chunk][t][j].
    std::vector<float> P;
    if (nk > 1) P.assign(static_cast<size_t>(n_sl * nk * T * Rmax), 0.f);
    int64_t bytes = 0;
    for (auto& sl : a.slices)
        for (const Tile& tl : p.shrink_tiles)
            bytes += (rank_of(sl, tl.slot) * static_cast<int64_t>(dtype_size(sl.a_dt)) +
                      (tl.end - tl.begin) * static_cast<int64_t>(dtype_size(a.x_dt))) * H_in;
    const int workers = size_workers(base_items * nk, bytes, a.n_threads);
    const Kernels& K = kernels();

    parallel_for(base_items * nk, workers, [&](int64_t item, int) {
        const int64_t kchunk = item % nk;
        const int64_t ti = (item / nk) % n_tiles;
        const int si = static_cast<int>(item / nk / n_tiles);
        const Tile& tile = p.shrink_tiles[static_cast<size_t>(ti)];
        const Slice& sl = a.slices[static_cast<size_t>(si)];
        const int r = rank_of(sl, tile.slot);
        if (r == 0) return;
        const int nt = static_cast<int>(tile.end - tile.begin);
        const int32_t* toks = p.order.data() + tile.begin;
        float* acc = scratch(kSAcc, kTileS * Rmax);  // acc[i * r + j]
        std::fill(acc, acc + nt * r, 0.f);
        const int64_t k0 = kchunk * kc, k1 = std::min(H_in, k0 + kc);
        float col[kTileS];
        const float* xp[kTileS];
        const int64_t ksub = (kXTile / nt) & ~int64_t(7);
        for (int64_t kb = k0; kb < k1; kb += ksub) {
            const int64_t n = std::min(ksub, k1 - kb);
            for (int i = 0; i < nt; ++i) {
                const int64_t idx = static_cast<int64_t>(toks[i]) * a.x_ld + kb;
                if (a.x_dt == LFM_DTYPE_F32) {
                    xp[i] = static_cast<const float*>(a.x) + idx;
                } else {
                    float* d = scratch(kXs, kXTile) + i * ksub;
                    load_f32(at(a.x, a.x_dt, idx), a.x_dt, d, n);
                    xp[i] = d;
                }
            }
            const DotFn direct = sl.a_dt <= LFM_DTYPE_BF16 ? K.dot_direct[sl.a_dt] : nullptr;
            const Dot2Fn direct2 = sl.a_dt <= LFM_DTYPE_BF16 ? K.dot2_direct[sl.a_dt] : nullptr;
            const int64_t row0 = static_cast<int64_t>(tile.slot) * sl.R;
            int j = 0;
            if (direct2 && nt >= 4) {  // two rows at a time (see dot2_tile_avx2)
                float col2[kTileS];
                for (; j + 2 <= r; j += 2) {
                    for (int i = 0; i < nt; ++i) col[i] = col2[i] = 0.f;
                    direct2(at(sl.A, sl.a_dt, (row0 + j) * H_in + kb), at(sl.A, sl.a_dt, (row0 + j + 1) * H_in + kb),
                            xp, nt, n, col, col2);
                    for (int i = 0; i < nt; ++i) {
                        acc[i * r + j] += col[i];
                        acc[i * r + j + 1] += col2[i];
                    }
                }
            }
            const Dot4FewFn few = sl.a_dt <= LFM_DTYPE_BF16 ? K.dot4_few_direct[sl.a_dt] : nullptr;
            if (few && nt < 4) {  // four rows at a time (see dot4_few_avx2)
                const int64_t row_bytes = H_in * static_cast<int64_t>(dtype_size(sl.a_dt));
                float o4[4 * 3];
                for (; j + 4 <= r; j += 4) {
                    const char* a0 = at(sl.A, sl.a_dt, (row0 + j) * H_in + kb);
                    // prefetch the next four rows, or the last rows of the slot again (no
                    // read past this slot's r rows)
                    const char* pf = j + 8 <= r ? a0 + 4 * row_bytes : a0;
                    few(a0, row_bytes, pf, xp, nt, n, o4);
                    for (int q = 0; q < 4; ++q)
                        for (int i = 0; i < nt; ++i) acc[i * r + j + q] += o4[q * nt + i];
                }
            }
            for (; j < r; ++j) {
                const int64_t aidx = (row0 + j) * H_in + kb;
                for (int i = 0; i < nt; ++i) col[i] = 0.f;
                if (direct) {
                    direct(at(sl.A, sl.a_dt, aidx), xp, nt, n, col);
                } else {
                    const float* arow;
                    if (sl.a_dt == LFM_DTYPE_F32) {
                        arow = static_cast<const float*>(sl.A) + aidx;
                    } else {
                        float* buf = scratch(kARow, kXTile);
                        load_f32(at(sl.A, sl.a_dt, aidx), sl.a_dt, buf, n);
                        arow = buf;
                    }
                    K.dot_tile(arow, xp, nt, n, col);
                }
                for (int i = 0; i < nt; ++i) acc[i * r + j] += col[i];
            }
        }
        for (int i = 0; i < nt; ++i) {
            float* dst = nk > 1 ? P.data() + ((si * nk + kchunk) * T + toks[i]) * Rmax
                                : U + (si * T + toks[i]) * ldR;
            std::memcpy(dst, acc + i * r, static_cast<size_t>(r) * sizeof(float));
        }
    });

    if (nk > 1) {  // reduce the chunks in chunk order (deterministic)
        for (int si = 0; si < n_sl; ++si) {
            const Slice& sl = a.slices[static_cast<size_t>(si)];
            for (const Tile& tile : p.shrink_tiles) {
                const int r = rank_of(sl, tile.slot);
                for (int64_t q = tile.begin; q < tile.end; ++q) {
                    const int64_t t = p.order[static_cast<size_t>(q)];
                    float* dst = U + (si * T + t) * ldR;
                    for (int j = 0; j < r; ++j) {
                        float v = 0.f;
                        for (int64_t c = 0; c < nk; ++c) v += P[static_cast<size_t>(((si * nk + c) * T + t) * Rmax + j)];
                        dst[j] = v;
                    }
                }
            }
        }
    }
}

// ---- expand: y[t, off + o] += scale[s] * sum_j U[slice][t][j] * B[s, o, j] -----------------

void expand_from(const LoraArgs& a, const Plan& p, const float* U, int64_t ldR) {
    const int64_t T = a.T;
    const int n_sl = static_cast<int>(a.slices.size());
    const int64_t n_tiles = static_cast<int64_t>(p.expand_tiles.size());
    if (n_tiles == 0) return;
    // An item is one kNChunk column chunk of one (slice, tile), in (slice, tile, chunk) order,
    // handed out in contiguous runs (parallel_for_runs): each worker then streams long
    // stretches of B (a decode tile's B[s] is read once, and chunks handed out in turn would
    // give alternate 16 KiB pieces of it to alternate workers). A column's result does not
    // depend on the run it is in.
    std::vector<int64_t> first_item(static_cast<size_t>(n_sl) + 1, 0);  // items per slice vary with H_out
    for (int si = 0; si < n_sl; ++si)
        first_item[si + 1] = first_item[si] + n_tiles * ((a.slices[si].H_out + kNChunk - 1) / kNChunk);
    const int64_t n_items = first_item[n_sl];
    if (n_items == 0) return;
    int64_t Rmax = 0;
    for (auto& s : a.slices) Rmax = std::max(Rmax, s.R);
    int64_t bytes = 0;
    for (auto& sl : a.slices)
        for (const Tile& tl : p.expand_tiles)
            bytes += (rank_of(sl, tl.slot) * static_cast<int64_t>(dtype_size(sl.b_dt)) +
                      2 * (tl.end - tl.begin) * static_cast<int64_t>(dtype_size(a.y_dt))) * sl.H_out;
    const int workers = size_workers(n_items, bytes, a.n_threads);
    const Kernels& K = kernels();
    const int64_t Rp = (Rmax + 7) & ~int64_t(7);

    // y[t, off + o] for the tile's tokens and the columns of one chunk
    auto chunk_body = [&](const Slice& sl, int si, const Tile& tile, int64_t chunk) {
        const int r = rank_of(sl, tile.slot);
        if (r == 0) return;
        const int64_t o0 = chunk * kNChunk, n = std::min(kNChunk, sl.H_out - o0);
        const int nt = static_cast<int>(tile.end - tile.begin);
        // B[s, o0:o0+n, :r] as fp32 rows of stride ld (rp = r rounded up to 8, zero padded).
        const int rp = (r + 7) & ~7;
        const int64_t bidx0 = (static_cast<int64_t>(tile.slot) * sl.H_out + o0) * sl.R;
        const float* bf;
        int64_t ld;
        if (r == sl.R && rp == r && sl.b_dt == LFM_DTYPE_F32) {
            bf = static_cast<const float*>(sl.B) + bidx0;  // read in place
            ld = sl.R;
        } else if (r == sl.R && rp == r) {
            float* buf = scratch(kBRow, Rp * kNChunk);
            load_f32(at(sl.B, sl.b_dt, bidx0), sl.b_dt, buf, n * r);  // one bulk conversion
            bf = buf;
            ld = r;
        } else {  // a lower rank than R_max: read only the first r entries of each row
            float* d = scratch(kBRow, Rp * kNChunk);
            for (int64_t o = 0; o < n; ++o) {
                load_f32(at(sl.B, sl.b_dt, bidx0 + o * sl.R), sl.b_dt, d + o * rp, r);
                for (int j = r; j < rp; ++j) d[o * rp + j] = 0.f;
            }
            bf = d;
            ld = rp;
        }
        const bool transposed = nt >= 4;  // a transposed tile pays off when several tokens share it
        float* bt = transposed ? scratch(kBt, Rmax * kNChunk) : nullptr;
        if (transposed)
            for (int64_t o = 0; o < n; ++o)
                for (int j = 0; j < r; ++j) bt[j * kNChunk + o] = bf[o * ld + j];
        const float scale = sl.scales[tile.slot];
        const int64_t ldc = rp;
        float* c = scratch(kC, kTileE * Rp);        // [kTileE][rp] scaled u rows
        float* acc = scratch(kEAcc, 4 * kNChunk);  // [4][kNChunk] deltas of the current token quad
        for (int i = 0; i < nt; ++i) {
            const float* ut = U + (si * T + p.order[static_cast<size_t>(tile.begin + i)]) * ldR;
            for (int j = 0; j < r; ++j) c[i * ldc + j] = scale * ut[j];
            for (int j = r; j < rp; ++j) c[i * ldc + j] = 0.f;
        }
        for (int i0 = 0; i0 < nt; i0 += 4) {
            const int nq = std::min(4, nt - i0);
            if (transposed && nq == 4) {
                K.axpy4_rows(c + i0 * ldc, ldc, bt, kNChunk, r, n, acc, kNChunk);
            } else if (transposed) {
                for (int q = 0; q < nq; ++q) K.axpy_rows(c + (i0 + q) * ldc, bt, kNChunk, r, n, acc + q * kNChunk);
            } else {
                K.gemv_rows(bf, ld, n, rp, c + i0 * ldc, ldc, nq, acc, kNChunk);
            }
            for (int q = 0; q < nq; ++q) {  // y = round(y + delta), once per element
                const int64_t t = p.order[static_cast<size_t>(tile.begin + i0 + q)];
                const float* d = acc + q * kNChunk;
                const int64_t yidx = t * a.y_ld + sl.off + o0;
                if (a.y_dt == LFM_DTYPE_F32) {
                    K.add(static_cast<float*>(a.y) + yidx, d, n);
                } else {
                    char* yp = static_cast<char*>(a.y) + yidx * static_cast<int64_t>(dtype_size(a.y_dt));
                    float* yb = scratch(kYBuf, kNChunk);
                    load_f32(yp, a.y_dt, yb, n);
                    K.add(yb, d, n);
                    store_f32(yb, a.y_dt, yp, n);
                }
            }
        }
    };

    parallel_for_runs(n_items, workers, [&](int64_t item, int) {
        int si = 0;
        while (item >= first_item[si + 1]) ++si;
        const Slice& sl = a.slices[static_cast<size_t>(si)];
        const int64_t local = item - first_item[si];
        const int64_t n_chunks = (sl.H_out + kNChunk - 1) / kNChunk;
        chunk_body(sl, si, p.expand_tiles[static_cast<size_t>(local / n_chunks)], local % n_chunks);
    });
}

}  // namespace

void lora_cpu(const LoraArgs& a) {
    const Plan p = make_plan(a);
    const int64_t T = a.T;
    const size_t n_sl = a.slices.size();
    switch (a.op) {
        case Op::Shrink:
            // u is fully defined: zero beyond each token's rank and for tokens without adapter.
            if (T > 0 && a.u_R > 0) std::memset(a.u, 0, n_sl * static_cast<size_t>(T * a.u_R) * sizeof(float));
            shrink_into(a, p, a.u, a.u_R);
            break;
        case Op::Expand:
            expand_from(a, p, a.u, a.u_R);
            break;
        case Op::Apply: {
            int64_t Rmax = 0;
            for (auto& s : a.slices) Rmax = std::max(Rmax, s.R);
            if (p.order.empty() || Rmax == 0) return;
            std::vector<float> U(n_sl * static_cast<size_t>(T * Rmax), 0.f);
            shrink_into(a, p, U.data(), Rmax);
            expand_from(a, p, U.data(), Rmax);
            break;
        }
    }
}

}  // namespace lfm::lora
