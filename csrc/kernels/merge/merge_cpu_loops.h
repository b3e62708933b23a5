// Inner loops of the CPU merge kernel, over one block of `len` elements.
// They are compiled once per SIMD level from one source (merge_cpu_loops_impl.inc):
// baseline x86-64, x86-64-v3 (AVX2/FMA/F16C) and x86-64-v4 (AVX-512) on x86; on aarch64 a scalar baseline and
// the NEON-vectorised default build. Written branch-free so they vectorize, and
// reached through a table picked at run time: the host's best level, or the one that
// LFM_SIMD forces (core/cpu_features.h). Every build uses -ffp-contract=off, so all
// tables round every operation alike and give the same bits (docs/spec/merge.md).
#pragma once
#include <cstdint>

#include "kernels/merge/della_rank.h"
#include "lfm/lfm.h"

namespace lfm::merge {

// One block of the merge pass, straight from the input bytes (merge_direct): every model,
// the base and the output share one dtype (bf16 or f32), K <= 8, and the election, when
// there is one, is the weighted one with the agreement-pattern table.
// delta_bracket_many's limits: queries per sweep (two per model for K <= 8) and elements
constexpr int kMaxBracketQueries = 16;
constexpr int64_t kMaxBracketLen = 4096;

// What a bracket scan over [lo, hi] counts on v = |delta| bits: v < lo, v == lo and
// v == hi (lo < hi only; with lo == hi the value is counted once, in at_lo). Only the
// values strictly between lo and hi are collected as candidates: the two ends are the
// heavily tied values of bf16 deltas, and counting them instead of collecting them keeps
// a bracket whose ends are two such values as cheap as a one-value one.
struct BracketCounts {
    int64_t below = 0, at_lo = 0, at_hi = 0;
};

struct DirectBlock {
    int K = 0;
    lfm_dtype dtype = LFM_DTYPE_F32;  // of the base, every model and the output
    const void* base = nullptr;       // at the block's first element; nullptr: no base (linear)
    const void* x[8] = {};            // model i at the block's first element
    // Keep rule of model i: keep[i] (one byte per element) when not null, else the
    // magnitude cut on v = |delta| bits: lo_v <= v <= hi_v, where v == lo_v also needs the
    // block-local index in [lo_j0, lo_j1] and v == hi_v needs it in [hi_j0, hi_j1].
    const uint8_t* keep[8] = {};
    uint32_t lo_v[8] = {}, hi_v[8] = {};
    int32_t lo_j0[8] = {}, lo_j1[8] = {}, hi_j0[8] = {}, hi_j1[8] = {};
    // How much of the keep rule this block needs (merge_cpu.cpp decides per block; the
    // result is the same either way, the simpler rules only skip work):
    //   kKeepBytes: keep[i]; kKeepCut: the full cut above; kKeepRange: lo_v <= v <= hi_v
    //   alone (no boundary value has its index range inside this block); kKeepAll: every
    //   element of every model is kept (no sparsifier).
    enum KeepRule : int { kKeepBytes, kKeepCut, kKeepRange, kKeepAll };
    KeepRule keep_rule = kKeepCut;
    bool consensus = false;  // TIES election (weighted, table) or the plain weighted sum
    const float* coef = nullptr;   // [K] fp32(w_i * f_i)
    const double* w = nullptr;     // [K] election weights (consensus)
    const double* f = nullptr;     // [K] rescale factors (consensus)
    const float* table = nullptr;  // [2^K] fp32(1 / divisor) per agreement pattern (consensus)
    float inv_plain_div = 1.0f;    // no consensus: mixed *= this when normalize
    bool normalize = false;
    float lam = 1.0f;
    void* out = nullptr;  // at the block's first element
};

struct LoopTable {
    const char* level;  // "baseline", "avx2", "avx512" or "neon"
    // x -= b; returns nonzero when any x or b is NaN/Inf (or the difference overflows).
    uint32_t (*sub_check)(float* x, const float* b, int64_t len);
    // nonzero when any x is NaN/Inf
    uint32_t (*check_finite)(const float* x, int64_t len);
    // Magnitude cut on v = |x[j]| bits at flat index e = start + j: keep iff lo_v <= v <= hi_v,
    // where v == lo_v also needs e in [lo_emin, lo_emax] and v == hi_v needs e in [hi_emin, hi_emax].
    void (*cut_keep)(const float* x, int64_t start, uint32_t lo_v, int64_t lo_emin, int64_t lo_emax, uint32_t hi_v, int64_t hi_emin, int64_t hi_emax, uint8_t* keep, int64_t len);
    // For v = |x[j]| bits: sets *n (BracketCounts) and writes the j with lo < v < hi to
    // pos (in order), returning how many.
    int64_t (*bracket)(const float* x, uint32_t lo, uint32_t hi, uint32_t* pos, BracketCounts* n, int64_t len);
    // bracket() on delta = fp32(x) - b computed on the fly from bfloat16 or float32 x (float16
    // returns -1: the caller materialises its float32 deltas); vals (len elements, scratch)
    // ends with the |delta| bits of candidate pos[c] at c. *bad is set when a delta is NaN/Inf.
    int64_t (*delta_bracket)(const void* x, lfm_dtype dt, const float* b, uint32_t lo, uint32_t hi, uint32_t* pos,
                             uint32_t* vals, BracketCounts* n, uint32_t* bad, int64_t len);
    // delta_bracket for nq queries over one block in one sweep, the base read from its bytes
    // (bf16 or f32, the dtype of the base and of every x[q]): query q brackets delta =
    // fp32(x[q]) - fp32(base) with [lo[q], hi[q]], setting n[q] and writing count[q]
    // candidates to pos[q] / vals[q] (len elements of scratch each). *bad is set when the
    // base or a delta is NaN/Inf. Returns false, doing nothing, for another dtype, more than
    // kMaxBracketQueries queries or more than kMaxBracketLen elements.
    bool (*delta_bracket_many)(int nq, const void* const* x, const void* base, lfm_dtype dt, const uint32_t* lo,
                               const uint32_t* hi, uint32_t* const* pos, uint32_t* const* vals, int64_t* count,
                               BracketCounts* n, uint32_t* bad, int64_t len);
    // number of j with |x[j]| bits == v
    int64_t (*count_equal_abs)(const float* x, uint32_t v, int64_t len);
    // keep[j] = draws[j] < thr (thr <= 2^32 - 1 here)
    void (*draws_below)(const uint32_t* draws, uint32_t thr, uint8_t* keep, int64_t len);
    // t = keep ? c * x : 0 (keep == nullptr: keep all); t may alias x.
    void (*weigh)(const float* x, const uint8_t* keep, float c, float* t, int64_t len);
    // mixed += keep ? c * x : 0
    void (*weigh_add)(const float* x, const uint8_t* keep, float c, float* mixed, int64_t len);
    // S += keep ? w * (double(x) * f) : 0   (the election sum in float64, as the reference)
    void (*elect_add64)(const float* x, const uint8_t* keep, double w, double f, double* S, int64_t len);
    // sgn = S >= 0 ? +1 : -1
    void (*sign_of)(const double* S, float* sgn, int64_t len);
    // agree = e * sgn > 0: mixed += agree ? t : 0; bits += agree ? bit : 0. `bits` holds the
    // agreement pattern as a float (sums of distinct powers of two <= 128 are exact), so the
    // loop has one element width and vectorizes.
    void (*agree_add_bits)(const float* e, const float* t, const float* sgn, float bit, float* mixed, float* bits, int64_t len);
    // agree = e * sgn > 0: mixed += agree ? t : 0; div += agree ? wd : 0
    void (*agree_add_div)(const float* e, const float* t, const float* sgn, double wd, float* mixed, double* div, int64_t len);
    // mixed *= table[bits]
    void (*scale_by_table)(float* mixed, const float* bits, const float* table, int64_t len);
    // *tot = sum |x|, *kept = sum over keep of |x|, in float64 with 8 interleaved partial
    // sums combined in a fixed order (vectorizes; the result depends only on the block).
    void (*l1_sums)(const float* x, const uint8_t* keep, int64_t len, double* tot, double* kept);
    // The L1 norm pass for one model over one block in one sweep from the input bytes (bf16 or
    // f32, base and x alike). The keep flags: read_mask (DELLA's stored masks): keep = m[j] &
    // bit; else (DARE) keep = draws[j] < thr (draws == nullptr: every element kept) and
    // m[j] |= keep ? bit : 0. *tot / *kept = what l1_sums gives for delta = fp32(x) -
    // fp32(base) and those flags (same lanes, same order: the same bits); *bad is set when
    // the base or a delta is NaN/Inf. Returns false, doing nothing, for another dtype or
    // where the level has no such sweep (the caller then takes the separate loops); a call
    // with len 0 touches only *tot, *kept and *bad, so it asks that question.
    bool (*l1_block)(const void* x, const void* base, lfm_dtype dt, const uint32_t* draws, uint32_t thr, uint8_t* m,
                     uint8_t bit, bool read_mask, double* tot, double* kept, uint32_t* bad, int64_t len);
    // m[j * stride] |= keep[j] ? bit : 0
    void (*or_bit)(const uint8_t* keep, uint8_t bit, uint8_t* m, int64_t stride, int64_t len);
    // mixed /= (|div| < 1e-8 ? 1 : div)
    void (*divide_guarded)(float* mixed, const double* div, int64_t len);
    // o = b + lam * mixed   (b == nullptr: o = mixed)
    void (*finish)(const float* b, float lam, const float* mixed, float* o, int64_t len);
    // mixed *= s
    void (*scale)(float* mixed, float s, int64_t len);
    // The TIES-family merge pass of one block in one register-level sweep (K <= 8, weighted
    // election): t_i = keep_i ? coef_i * x_i : 0 (float32); S = sum keep_i * w_i * (x_i * f_i)
    // in float64, the same operations as the reference, so the elected sign is exact;
    // mixed = sum of the t_i agreeing with sign(S) (S >= 0: +); out = b + lam * mixed * table[bits]
    // with bits the agreement pattern.
    void (*fused_ties)(int K, const float* const* x, const uint8_t* const* keep, const float* coef, const double* w, const double* f, const float* b, float lam, const float* table, float* out, int64_t len);
    // The whole merge pass of one block in one sweep from the input bytes, with the same
    // operations and roundings as load + sub_check + keep + fused_ties / weigh_add + scale
    // + finish + store (so the same bits): returns the number of non-finite values written
    // (an overflow of the output dtype), or -1 when an input is NaN/Inf or a delta
    // overflows (the output block is then unspecified).
    int64_t (*merge_direct)(const DirectBlock& d, int64_t len);
    // DELLA, one row: v[j] = bits(|delta_j|) (< 2^31), draws[j] its Philox words, thr[r] the
    // keep threshold of rank r (nondecreasing). Writes keep[j] = draws[j] < thr[rank(j)] (0/1,
    // rank by (v, column)) and returns true; false (keep unspecified) when the row is better
    // sorted whole: fewer than 256 columns, or one nonzero value (della_rank.h).
    bool (*della_keep_row)(const uint32_t* v, const uint32_t* draws, const uint64_t* thr, int64_t cols,
                           uint8_t* keep, DellaRowScratch& s);
    // Philox4x32-10 words for blocks q0 .. q0 + nblocks - 1 (4 words each) into out
    // (integer arithmetic: the same words at every level).
    void (*philox_blocks)(uint64_t seed, uint32_t stream, uint64_t q0, int64_t nblocks, uint32_t* out);
};

// The loops of the active SIMD level (lfm::simd_level()).
const LoopTable& merge_loops();

}  // namespace lfm::merge
