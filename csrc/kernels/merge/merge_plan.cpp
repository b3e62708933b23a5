// The shared merge planner (see merge_plan.h; definitions in docs/spec/merge.md).
#include "kernels/merge/merge_plan.h"

#include <algorithm>
#include <cmath>

#include "core/philox.h"

namespace lfm::merge {

namespace {
constexpr double kL1Skip = 1e-7;       // below this an L1 norm counts as zero
constexpr double kDivisorEps = 1e-8;   // a divisor this small counts as 1

int64_t floor_mul(double x, int64_t n) { return static_cast<int64_t>(std::floor(x * static_cast<double>(n))); }
float inv_or_one(double d) { return static_cast<float>(1.0 / (std::fabs(d) < kDivisorEps ? 1.0 : d)); }
}  // namespace

CutPlan plan_cuts(Sparsifier sp, int64_t n, const std::vector<double>& d, const std::vector<double>& gamma) {
    const int K = static_cast<int>(d.size());
    CutPlan p;
    p.cuts.resize(static_cast<size_t>(K));
    for (int i = 0; i < K; ++i) {
        Cut& c = p.cuts[static_cast<size_t>(i)];
        if (sp == Sparsifier::Magnitude) {
            if (d[i] >= 1.0) continue;
            if (d[i] <= 0.0) { c.all = false; c.none = true; continue; }
            const int64_t k = std::max<int64_t>(1, floor_mul(d[i], n));
            if (k >= n) continue;
            c.all = false;
            p.queries.push_back(CutQuery{i, n - k, false});
        } else if (sp == Sparsifier::MagnitudeOutliers) {
            const int64_t target = floor_mul(d[i], n);
            const int64_t n_top = floor_mul(gamma[i], n);
            const int64_t n_bot = std::max<int64_t>(0, n - target - n_top);
            if (target <= 0) { c.all = false; c.none = true; continue; }
            if (n_bot == 0 && target >= n) continue;
            c.all = false;
            if (n_bot > 0) p.queries.push_back(CutQuery{i, n_bot, false});
            if (n_bot + target - 1 < n - 1) p.queries.push_back(CutQuery{i, n_bot + target - 1, true});
        }
    }
    return p;
}

TieNeed apply_cut_answer(Sparsifier sp, int64_t n, const CutQuery& q, uint32_t value, int64_t c_lt, int64_t c_eq,
                         Cut& c) {
    TieNeed need;
    const int64_t ordinal = q.pos - c_lt;  // 0-based among the ties of value
    if (sp == Sparsifier::Magnitude) {
        // keep the k = n - pos largest; ties keep lower indices: keep_ties (1..c_eq) of them
        const int64_t c_gt = n - c_lt - c_eq;
        const int64_t keep_ties = (n - q.pos) - c_gt;
        c.lo_v = value;
        c.lo_emin = 0;
        c.lo_emax = kNoLimit;
        if (keep_ties < c_eq) need = TieNeed{TieField::LoEmax, keep_ties - 1};
    } else if (!q.upper) {
        // drop the `ordinal` lowest-index ties of the lower cut value
        c.lo_v = value;
        c.lo_emin = 0;
        c.lo_emax = kNoLimit;
        if (ordinal > 0) need = TieNeed{TieField::LoEmin, ordinal};
    } else {
        // keep ties of the upper cut value up to `ordinal` (lower indices first)
        c.hi_v = value;
        c.hi_emin = 0;
        c.hi_emax = kNoLimit;
        if (ordinal < c_eq - 1) need = TieNeed{TieField::HiEmax, ordinal};
    }
    return need;
}

int64_t* tie_target(Cut& c, TieField f) {
    switch (f) {
        case TieField::LoEmin: return &c.lo_emin;
        case TieField::LoEmax: return &c.lo_emax;
        case TieField::HiEmax: return &c.hi_emax;
        case TieField::None: break;
    }
    return nullptr;
}

std::vector<uint64_t> della_thresholds(int64_t cols, double d, double eps) {
    std::vector<uint64_t> thr(static_cast<size_t>(std::max<int64_t>(cols, 0)));
    for (int64_t r = 0; r < cols; ++r) {
        const double rn = cols > 1 ? static_cast<double>(r) / static_cast<double>(cols - 1) : 0.0;
        thr[static_cast<size_t>(r)] = keep_threshold((d - eps) + (2.0 * eps) * rn);
    }
    return thr;
}

double l1_factor(double total, double kept) { return (total >= kL1Skip && kept >= kL1Skip) ? total / kept : 1.0; }

double inverse_density_factor(double d) { return d > 0.0 ? 1.0 / d : 1.0; }

Coefficients merge_coefficients(const MergeArgs& a, const std::vector<double>& factor) {
    const int K = a.K;
    Coefficients c;
    c.coef.resize(static_cast<size_t>(K));
    c.ecoef.resize(static_cast<size_t>(K));
    c.dshare.resize(static_cast<size_t>(K));
    double wsum = 0.0;
    for (int i = 0; i < K; ++i) {
        c.coef[i] = static_cast<float>(a.w[i] * factor[i]);
        c.ecoef[i] = static_cast<float>(a.consensus_unweighted ? factor[i] : a.w[i] * factor[i]);
        c.dshare[i] = a.disjoint_count ? 1.0 : a.w[i];
        wsum += a.w[i];
    }
    c.inv_plain_div = inv_or_one(wsum);
    c.table = a.consensus && K <= 8;
    if (c.table) {
        c.inv_div.assign(size_t(1) << K, 1.0f);
        for (uint32_t m = 0; m < (1u << K); ++m) {
            double dsum = 0.0;
            for (int i = 0; i < K; ++i)
                if (m >> i & 1u) dsum += c.dshare[i];
            c.inv_div[m] = a.normalize ? inv_or_one(dsum) : 1.0f;
        }
    }
    return c;
}

}  // namespace lfm::merge
