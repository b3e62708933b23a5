// Inner loops of the CPU merge kernel, over one block of `len` elements.
// Each is compiled for baseline x86-64 and for x86-64-v3 (AVX2/FMA), picked at run
// time (GCC function multi-versioning), and written branch-free so it vectorizes.
#pragma once
#include <cstdint>

namespace lfm::merge::loops {

// x -= b; returns nonzero when any x or b is NaN/Inf (or the difference overflows).
uint32_t sub_check(float* __restrict x, const float* __restrict b, int64_t len);
// nonzero when any x is NaN/Inf
uint32_t check_finite(const float* __restrict x, int64_t len);

// keep[j] = lo_v < v < hi_v for v = |x[j]| bits (the interior of a magnitude cut).
void cut_interior(const float* __restrict x, uint32_t lo_v, uint32_t hi_v, uint8_t* __restrict keep, int64_t len);
// keep[j] = draws[j] < thr (thr <= 2^32 - 1 here)
void draws_below(const uint32_t* __restrict draws, uint32_t thr, uint8_t* __restrict keep, int64_t len);

// dp = keep ? x * f : 0 in float64, stored back as float into x; S += we * dp when S != nullptr.
// keep == nullptr means keep all.
void sparsify_accumulate(float* __restrict x, const uint8_t* __restrict keep, double f, double we,
                         double* __restrict S, int64_t len);
// TIES disjoint merge of one model: t = w * x; agrees = sign(unw ? x : t) == sign(S) (S >= 0 -> +);
// mixed += agrees ? t : 0; div += agrees ? wd : 0.
void consensus_add(const float* __restrict x, float w, double wd, bool unw, const double* __restrict S,
                   float* __restrict mixed, double* __restrict div, int64_t len);
// mixed /= (|div| < 1e-8 ? 1 : div)
void divide_guarded(float* __restrict mixed, const double* __restrict div, int64_t len);
// mixed += w * x
void axpy(const float* __restrict x, float w, float* __restrict mixed, int64_t len);
// o = b + lam * mixed   (b == nullptr: o = mixed)
void finish(const float* __restrict b, float lam, const float* __restrict mixed, float* __restrict o, int64_t len);
// mixed *= s
void scale(float* __restrict mixed, float s, int64_t len);

// Philox4x32-10 words for blocks q0 .. q0 + nblocks - 1 (4 words each) into out.
void philox_blocks(uint64_t seed, uint32_t stream, uint64_t q0, int64_t nblocks, uint32_t* __restrict out);

}  // namespace lfm::merge::loops
