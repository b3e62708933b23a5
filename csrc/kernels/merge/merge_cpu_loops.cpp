// Entry points of the CPU merge inner loops: each forwards to the x86-64-v3 build when the
// effective SIMD level (LFM_SIMD, core/cpu_features.h) allows AVX2, else to the baseline
// build. Both builds compute the same bits (no contraction, no reassociation), so the
// level changes speed only; tests/test_simd_levels.py checks that.
#include "kernels/merge/merge_cpu_loops.h"

#include "core/cpu_features.h"

namespace lfm::merge::loops {
namespace {
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
inline bool use_v3() { return cpu_has_avx2(); }
#else
inline bool use_v3() { return false; }  // the v3 build is the baseline one off x86-64 GCC
#endif
}  // namespace

uint32_t sub_check(float* __restrict x, const float* __restrict b, int64_t len) {
    return use_v3() ? v3::sub_check(x, b, len) : base::sub_check(x, b, len);
}

uint32_t check_finite(const float* __restrict x, int64_t len) {
    return use_v3() ? v3::check_finite(x, len) : base::check_finite(x, len);
}

void cut_keep(const float* __restrict x, int64_t start, uint32_t lo_v, int64_t lo_emin, int64_t lo_emax, uint32_t hi_v, int64_t hi_emin, int64_t hi_emax, uint8_t* __restrict keep, int64_t len) {
    if (use_v3()) return v3::cut_keep(x, start, lo_v, lo_emin, lo_emax, hi_v, hi_emin, hi_emax, keep, len);
    base::cut_keep(x, start, lo_v, lo_emin, lo_emax, hi_v, hi_emin, hi_emax, keep, len);
}

int64_t bracket(const float* __restrict x, uint32_t lo, uint32_t hi, uint32_t* __restrict pos, int64_t* below, int64_t len) {
    return use_v3() ? v3::bracket(x, lo, hi, pos, below, len) : base::bracket(x, lo, hi, pos, below, len);
}

int64_t delta_bracket(const void* x, lfm_dtype dt, const float* __restrict b, uint32_t lo, uint32_t hi, uint32_t* __restrict pos, uint32_t* __restrict vals, int64_t* below, uint32_t* bad, int64_t len) {
    return use_v3() ? v3::delta_bracket(x, dt, b, lo, hi, pos, vals, below, bad, len) : base::delta_bracket(x, dt, b, lo, hi, pos, vals, below, bad, len);
}

int64_t count_equal_abs(const float* __restrict x, uint32_t v, int64_t len) {
    return use_v3() ? v3::count_equal_abs(x, v, len) : base::count_equal_abs(x, v, len);
}

void draws_below(const uint32_t* __restrict draws, uint32_t thr, uint8_t* __restrict keep, int64_t len) {
    if (use_v3()) return v3::draws_below(draws, thr, keep, len);
    base::draws_below(draws, thr, keep, len);
}

void weigh(const float* x, const uint8_t* __restrict keep, float c, float* t, int64_t len) {
    if (use_v3()) return v3::weigh(x, keep, c, t, len);
    base::weigh(x, keep, c, t, len);
}

void weigh_add(const float* __restrict x, const uint8_t* __restrict keep, float c, float* __restrict mixed, int64_t len) {
    if (use_v3()) return v3::weigh_add(x, keep, c, mixed, len);
    base::weigh_add(x, keep, c, mixed, len);
}

void elect_add64(const float* __restrict x, const uint8_t* __restrict keep, double w, double f, double* __restrict S, int64_t len) {
    if (use_v3()) return v3::elect_add64(x, keep, w, f, S, len);
    base::elect_add64(x, keep, w, f, S, len);
}

void sign_of(const double* __restrict S, float* __restrict sgn, int64_t len) {
    if (use_v3()) return v3::sign_of(S, sgn, len);
    base::sign_of(S, sgn, len);
}

void agree_add_bits(const float* e, const float* t, const float* __restrict sgn, float bit, float* __restrict mixed, float* __restrict bits, int64_t len) {
    if (use_v3()) return v3::agree_add_bits(e, t, sgn, bit, mixed, bits, len);
    base::agree_add_bits(e, t, sgn, bit, mixed, bits, len);
}

void agree_add_div(const float* e, const float* t, const float* __restrict sgn, double wd, float* __restrict mixed, double* __restrict div, int64_t len) {
    if (use_v3()) return v3::agree_add_div(e, t, sgn, wd, mixed, div, len);
    base::agree_add_div(e, t, sgn, wd, mixed, div, len);
}

void scale_by_table(float* __restrict mixed, const float* __restrict bits, const float* __restrict table, int64_t len) {
    if (use_v3()) return v3::scale_by_table(mixed, bits, table, len);
    base::scale_by_table(mixed, bits, table, len);
}

void l1_sums(const float* __restrict x, const uint8_t* __restrict keep, int64_t len, double* tot, double* kept) {
    if (use_v3()) return v3::l1_sums(x, keep, len, tot, kept);
    base::l1_sums(x, keep, len, tot, kept);
}

void or_bit(const uint8_t* __restrict keep, uint8_t bit, uint8_t* __restrict m, int64_t stride, int64_t len) {
    if (use_v3()) return v3::or_bit(keep, bit, m, stride, len);
    base::or_bit(keep, bit, m, stride, len);
}

void divide_guarded(float* __restrict mixed, const double* __restrict div, int64_t len) {
    if (use_v3()) return v3::divide_guarded(mixed, div, len);
    base::divide_guarded(mixed, div, len);
}

void finish(const float* __restrict b, float lam, const float* __restrict mixed, float* __restrict o, int64_t len) {
    if (use_v3()) return v3::finish(b, lam, mixed, o, len);
    base::finish(b, lam, mixed, o, len);
}

void scale(float* __restrict mixed, float s, int64_t len) {
    if (use_v3()) return v3::scale(mixed, s, len);
    base::scale(mixed, s, len);
}

void fused_ties(int K, const float* const* x, const uint8_t* const* keep, const float* coef, const double* w, const double* f, const float* b, float lam, const float* table, float* out, int64_t len) {
    if (use_v3()) return v3::fused_ties(K, x, keep, coef, w, f, b, lam, table, out, len);
    base::fused_ties(K, x, keep, coef, w, f, b, lam, table, out, len);
}

void philox_blocks(uint64_t seed, uint32_t stream, uint64_t q0, int64_t nblocks, uint32_t* __restrict out) {
    if (use_v3()) return v3::philox_blocks(seed, stream, q0, nblocks, out);
    base::philox_blocks(seed, stream, q0, nblocks, out);
}

}  // namespace lfm::merge::loops
