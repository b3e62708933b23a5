// The host-side merge planner shared by the CPU and CUDA launchers (and, through _C, the
// Triton backend): which order statistics a magnitude-type cut needs, how an answer
// becomes a keep rule (ties at a cut: lower flat index first), the DELLA keep-threshold
// table, the rescale factors and the merge pass's coefficients. Definitions:
// docs/spec/merge.md ("Sparsifiers", "Rescale", "Consensus", "Arithmetic").
//
// Everything here is plain host arithmetic in double / uint64, so every backend that uses
// it gets the same cuts, thresholds and coefficients bit for bit.
#pragma once
#include <cstdint>
#include <limits>
#include <vector>

#include "kernels/merge/merge.h"

namespace lfm::merge {

constexpr int64_t kNoLimit = std::numeric_limits<int64_t>::max();

// Keep rule of the magnitude-type sparsifiers for one model, on v = bits(|delta|):
// keep iff lo_v <= v <= hi_v, with the flat index e limited where v sits on a bound
// (lo_emin <= e <= lo_emax when v == lo_v, hi_emin <= e <= hi_emax when v == hi_v).
// all: every element kept (no pass needed); none: nothing kept.
struct Cut {
    bool all = true;
    bool none = false;
    uint32_t lo_v = 0, hi_v = 0xffffffffu;
    int64_t lo_emin = 0, lo_emax = kNoLimit, hi_emin = 0, hi_emax = kNoLimit;
};

// An order statistic a cut needs: the element at ascending position `pos` (0-based) of
// model `model`'s v; `upper` marks the upper bound of a breadcrumbs cut.
struct CutQuery {
    int model;
    int64_t pos;
    bool upper;
};

struct CutPlan {
    std::vector<Cut> cuts;          // [K]; cuts that need no query are final already
    std::vector<CutQuery> queries;  // in model order, lower bound before upper
};

// Magnitude (top-k, k = max(1, floor(d n))) and magnitude_outliers (breadcrumbs: drop
// the floor(gamma n) largest, keep floor(d n) below them) for K models of n elements.
CutPlan plan_cuts(Sparsifier sp, int64_t n, const std::vector<double>& d, const std::vector<double>& gamma);

// Which index limit of a Cut a tie lookup fills.
enum class TieField { None, LoEmin, LoEmax, HiEmax };

// The answer (value, c_lt = elements below it, c_eq = elements equal to it) of query q,
// written into `cut`. When only part of the equal values is kept, the returned field
// must be set to the flat index of the `ordinal`-th (0-based, ascending index) element
// whose v equals `value` (ordinal is -1 with TieField::None).
struct TieNeed {
    TieField field = TieField::None;
    int64_t ordinal = -1;
};
TieNeed apply_cut_answer(Sparsifier sp, int64_t n, const CutQuery& q, uint32_t value, int64_t c_lt, int64_t c_eq,
                         Cut& cut);
int64_t* tie_target(Cut& cut, TieField f);

// DELLA keep thresholds of one model, one per rank r of a row of `cols`:
// floor(p_r 2^32) with p_r = (d - eps) + (2 eps) (r / (cols - 1)) (0 when cols == 1).
std::vector<uint64_t> della_thresholds(int64_t cols, double d, double eps);

// Rescale factors. L1: ||delta||_1 / ||delta'||_1 from the two float64 sums (1 when
// either is below 1e-7); inverse density: 1 / d (1 when d == 0).
double l1_factor(double total, double kept);
double inverse_density_factor(double d);

// The merge pass's constants from the weights and the final rescale factors f_i:
// coef_i = fp32(w_i f_i); ecoef_i = fp32(f_i) (unweighted election) or coef_i;
// dshare_i = 1 (disjoint count) or w_i; inv_plain_div = fp32(1 / sum w) (|sum| < 1e-8 -> 1);
// with consensus and K <= 8 (table), inv_div[m] = fp32(1 / sum_{i in m} dshare_i) per
// agreement bit pattern m (1 without normalize; |sum| < 1e-8 -> 1), sums in float64 in
// model order.
struct Coefficients {
    std::vector<float> coef, ecoef;
    std::vector<double> dshare;
    float inv_plain_div = 1.0f;
    bool table = false;
    std::vector<float> inv_div;
};
Coefficients merge_coefficients(const MergeArgs& a, const std::vector<double>& factor);

}  // namespace lfm::merge
