// Fused sparsify-and-merge on the CPU (spec/merge.md).
//
// Deltas are formed on the fly, block by block (kBlock elements, converted to fp32 in
// per-worker scratch), so no K x n float copy ever exists. Passes over the data:
//   - magnitude / magnitude_outliers: a 16-bit high histogram pass and a 16-bit low
//     histogram pass over |delta| bit patterns (radix select; non-negative floats order
//     like their bits), plus a short pass that finds the flat index of the cut-off tie
//     when only part of the equal values is kept (lower index first, as the spec says);
//   - DELLA: a mask pass that ranks each row (the rank needs an order within the row)
//     and stores one keep bit per model and element (ceil(K/8) bytes per element);
//   - rescale "l1": a norm pass giving ||delta||_1 and ||delta'||_1;
//   - the merge pass: keep rule, weighting, sign consensus, normalisation, output.
// Determinism: every reduction is made per fixed block (or row) and combined in block
// order, and random draws depend only on (seed, stream, element), so the result is
// bit-identical for any number of threads.
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cmath>
#include <cstring>
#include <limits>
#include <memory>

#include "core/dtype.h"
#include "core/philox.h"
#include "core/status.h"
#include "core/tensor.h"
#include "core/thread_pool.h"
#include "kernels/merge/merge.h"
#include "kernels/merge/merge_cpu_loops.h"

namespace lfm::merge {
namespace {

constexpr int64_t kBlock = 4096;          // elements per task; a multiple of 4 (Philox blocks)
constexpr int kMaxHistWorkers = 16;       // caps per-worker histogram memory
constexpr int64_t kNoLimit = std::numeric_limits<int64_t>::max();

// Keep rule of the magnitude-type sparsifiers, on v = |delta| bits:
// keep iff lo_v <= v <= hi_v, with the element index e restricted at the two ends.
struct Cut {
    bool all = true;
    bool none = false;
    uint32_t lo_v = 0, hi_v = 0xffffffffu;
    int64_t lo_emin = 0, lo_emax = kNoLimit, hi_emin = 0, hi_emax = kNoLimit;
};

// A radix-select query: the element at ascending position `pos` of model `model`.
struct Query {
    int model;
    int64_t pos;
    uint32_t hb = 0;      // high 16 bits of the answer
    int64_t below_hb = 0; // elements with high bits < hb
    uint32_t value = 0;   // answer: |delta| bits
    int64_t c_lt = 0, c_eq = 0;
};

// Where a cut needs the flat index of the ordinal-th tie of `value` in model `model`.
struct TieRequest {
    int model;
    uint32_t value;
    int64_t ordinal;
    int64_t* target;
};

struct Scratch {
    std::vector<float> b, x, t, mixed, o, s32, a32, sgn, bits;
    std::vector<double> div;  // divisors in float64 (K > 8 only)
    std::vector<uint8_t> keep, keepk;
    std::vector<uint32_t> draws;
};

// LFM_PROFILE=1 prints the time of each pass to stderr (for tuning; off by default).
struct PhaseTimer {
    bool on = std::getenv("LFM_PROFILE") != nullptr;
    std::chrono::steady_clock::time_point t = std::chrono::steady_clock::now();
    void mark(const char* what) {
        if (!on) return;
        auto now = std::chrono::steady_clock::now();
        std::fprintf(stderr, "[lfm merge] %-12s %8.2f ms\n", what,
                     std::chrono::duration<double, std::milli>(now - t).count());
        t = now;
    }
};

class CpuMerge {
public:
    explicit CpuMerge(const MergeArgs& a) : a_(a), K_(a.K), n_(a.n) {
        nblocks_ = (n_ + kBlock - 1) / kBlock;
        cuts_.resize(K_);
        factor_.assign(K_, 1.0);
        thr_.assign(K_, 0x100000000ull);
    }

    void run() {
        if (n_ == 0) return;
        PhaseTimer timer;
        if (a_.sparsifier == Sparsifier::Magnitude || a_.sparsifier == Sparsifier::MagnitudeOutliers) {
            select();
            timer.mark("select");
        }
        if (a_.sparsifier == Sparsifier::Random)
            for (int i = 0; i < K_; ++i) thr_[i] = keep_threshold(a_.d[i]);
        if (a_.sparsifier == Sparsifier::Della) {
            della_masks();
            timer.mark("della_masks");
        }
        if (a_.sparsifier != Sparsifier::None) {
            if (a_.rescale == LFM_RESCALE_L1) {
                l1_factors();
                timer.mark("l1_norms");
            }
            if (a_.rescale == LFM_RESCALE_INVERSE_DENSITY)
                for (int i = 0; i < K_; ++i) factor_[i] = a_.d[i] > 0.0 ? 1.0 / a_.d[i] : 1.0;
        }
        merge_pass();
        timer.mark("merge_pass");
    }

private:
    // ---- loading -------------------------------------------------------------------
    Scratch& scratch(int slot) {
        auto& s = scratch_[static_cast<size_t>(slot)];
        if (!s) {
            s = std::make_unique<Scratch>();
            s->b.resize(kBlock);
            s->x.resize(static_cast<size_t>(K_) * kBlock);
            s->t.resize(static_cast<size_t>(K_) * kBlock);
            s->keepk.resize(static_cast<size_t>(K_) * kBlock);
            s->s32.resize(kBlock);
            s->a32.resize(kBlock);
            s->sgn.resize(kBlock);
            s->bits.resize(kBlock);
            s->mixed.resize(kBlock);
            s->div.resize(kBlock);
            s->o.resize(kBlock);
            s->keep.resize(kBlock);
            s->draws.resize(kBlock + 8);
        }
        return *s;
    }

    static const char* ptr(const lfm_tensor* t, int64_t start) {
        return static_cast<const char*>(t->data) + start * static_cast<int64_t>(dtype_size(t->dtype));
    }

    [[noreturn]] void nonfinite(int64_t start, int64_t len, const Scratch& s) const {
        // Attribute the first bad element to the base or a model.
        std::vector<float> tmp(static_cast<size_t>(len));
        if (a_.base) {
            load_f32(ptr(a_.base, start), a_.base->dtype, tmp.data(), len);
            for (int64_t j = 0; j < len; ++j)
                if (!std::isfinite(tmp[j]))
                    fail(LFM_STATUS_NONFINITE, "non-finite value (", tmp[j], ") in base at element ", start + j,
                         " of tensor '", a_.name, "'");
        }
        for (int i = 0; i < K_; ++i) {
            load_f32(ptr(a_.models[i], start), a_.models[i]->dtype, tmp.data(), len);
            for (int64_t j = 0; j < len; ++j)
                if (!std::isfinite(tmp[j]))
                    fail(LFM_STATUS_NONFINITE, "non-finite value (", tmp[j], ") in model ", i, " at element ",
                         start + j, " of tensor '", a_.name, "'");
        }
        (void)s;
        fail(LFM_STATUS_NONFINITE, "task vector overflows float32 at block starting ", start, " of tensor '",
             a_.name, "'");
    }

    // Load x_i (minus the base, unless linear) for block [start, start+len) into s.x;
    // only model `only` when only >= 0.
    void load(Scratch& s, int64_t start, int64_t len, int only = -1) const {
        float* b = s.b.data();
        if (a_.base) load_f32(ptr(a_.base, start), a_.base->dtype, b, len);
        uint32_t bad = 0;
        for (int i = 0; i < K_; ++i) {
            if (only >= 0 && i != only) continue;
            float* x = s.x.data() + static_cast<int64_t>(i) * kBlock;
            load_f32(ptr(a_.models[i], start), a_.models[i]->dtype, x, len);
            bad |= a_.base ? loops::sub_check(x, b, len) : loops::check_finite(x, len);
        }
        if (bad) nonfinite(start, len, s);
    }

    int64_t block_len(int64_t blk) const { return std::min(kBlock, n_ - blk * kBlock); }

    // ---- radix select (magnitude, magnitude_outliers) -------------------------------
    void select() {
        std::vector<Query> queries;
        for (int i = 0; i < K_; ++i) {
            Cut& c = cuts_[i];
            const double d = a_.d[i];
            const int64_t n = n_;
            if (a_.sparsifier == Sparsifier::Magnitude) {
                if (d >= 1.0) continue;
                if (d <= 0.0) { c.all = false; c.none = true; continue; }
                int64_t k = std::max<int64_t>(1, static_cast<int64_t>(std::floor(d * static_cast<double>(n))));
                if (k >= n) continue;
                c.all = false;
                queries.push_back(Query{i, n - k});
            } else {
                int64_t target = static_cast<int64_t>(std::floor(d * static_cast<double>(n)));
                int64_t n_top = static_cast<int64_t>(std::floor(a_.gamma[i] * static_cast<double>(n)));
                int64_t n_bot = std::max<int64_t>(0, n - target - n_top);
                if (target <= 0) { c.all = false; c.none = true; continue; }
                if (n_bot == 0 && target >= n) continue;
                c.all = false;
                if (n_bot > 0) queries.push_back(Query{i, n_bot});
                // the upper cut is marked by a negative position: -(pos) - 1
                if (n_bot + target - 1 < n - 1) queries.push_back(Query{i, -(n_bot + target - 1) - 1});
            }
        }
        if (queries.empty()) return;
        run_queries(queries);
        // Turn each answer into a cut; a cut that keeps only part of the equal values
        // needs the flat index of one tie, found for all cuts together in one pass.
        std::vector<TieRequest> ties;
        for (auto& q : queries) {
            Cut& c = cuts_[q.model];
            const bool upper = q.pos < 0;
            const int64_t pos = upper ? -q.pos - 1 : q.pos;
            const int64_t ordinal = pos - q.c_lt;  // 0-based among the ties of q.value
            if (a_.sparsifier == Sparsifier::Magnitude) {
                // keep the k = n - pos largest; ties keep lower indices: keep_ties of them
                const int64_t c_gt = n_ - q.c_lt - q.c_eq;
                const int64_t keep_ties = (n_ - pos) - c_gt;  // 1..c_eq
                c.lo_v = q.value;
                c.lo_emin = 0;
                c.lo_emax = kNoLimit;
                if (keep_ties < q.c_eq) ties.push_back(TieRequest{q.model, q.value, keep_ties - 1, &c.lo_emax});
            } else if (!upper) {
                // drop the `ordinal` lowest-index ties of the lower cut value
                c.lo_v = q.value;
                c.lo_emin = 0;
                c.lo_emax = kNoLimit;
                if (ordinal > 0) ties.push_back(TieRequest{q.model, q.value, ordinal, &c.lo_emin});
            } else {
                // keep ties of the upper cut value up to `ordinal` (lower indices first)
                c.hi_v = q.value;
                c.hi_emin = 0;
                c.hi_emax = kNoLimit;
                if (ordinal < q.c_eq - 1) ties.push_back(TieRequest{q.model, q.value, ordinal, &c.hi_emax});
            }
        }
        if (!ties.empty()) find_ties(ties);
    }

    void run_queries(std::vector<Query>& queries) {
        const int nq = static_cast<int>(queries.size());
        const int workers = plan_workers(nblocks_, std::min(kMaxHistWorkers, a_.n_threads > 0 ? a_.n_threads : get_num_threads()));
        // per worker: one 65536-bin histogram per query
        std::vector<std::vector<uint32_t>> hist(static_cast<size_t>(workers));
        auto hist_pass = [&](bool low) {
            for (auto& h : hist) h.assign(static_cast<size_t>(nq) * 65536, 0);
            parallel_for(nblocks_, workers, [&](int64_t blk, int slot) {
                Scratch& s = scratch(slot);
                const int64_t len = block_len(blk);
                load(s, blk * kBlock, len);
                uint32_t* h = hist[static_cast<size_t>(slot)].data();
                for (int qi = 0; qi < nq; ++qi) {
                    const Query& q = queries[qi];
                    const float* x = s.x.data() + static_cast<int64_t>(q.model) * kBlock;
                    uint32_t* hq = h + static_cast<int64_t>(qi) * 65536;
                    if (!low) {
                        for (int64_t j = 0; j < len; ++j) ++hq[(f32_bits(x[j]) & 0x7fffffffu) >> 16];
                    } else {
                        for (int64_t j = 0; j < len; ++j) {
                            uint32_t v = f32_bits(x[j]) & 0x7fffffffu;
                            if ((v >> 16) == q.hb) ++hq[v & 0xffffu];
                        }
                    }
                }
            });
            std::vector<uint64_t> total(static_cast<size_t>(nq) * 65536, 0);
            for (auto& h : hist)
                for (size_t k = 0; k < h.size(); ++k) total[k] += h[k];
            for (int qi = 0; qi < nq; ++qi) {
                Query& q = queries[qi];
                const int64_t pos = q.pos < 0 ? -q.pos - 1 : q.pos;
                const uint64_t* t = total.data() + static_cast<int64_t>(qi) * 65536;
                int64_t cum = low ? q.below_hb : 0;
                for (uint32_t bin = 0; bin < 65536; ++bin) {
                    int64_t c = static_cast<int64_t>(t[bin]);
                    if (cum + c > pos) {
                        if (!low) {
                            q.hb = bin;
                            q.below_hb = cum;
                        } else {
                            q.value = (q.hb << 16) | bin;
                            q.c_lt = cum;
                            q.c_eq = c;
                        }
                        break;
                    }
                    cum += c;
                }
            }
        };
        hist_pass(false);
        hist_pass(true);
    }

    // For each request: the flat index of the `ordinal`-th (0-based) element of its model
    // whose |delta| bits equal its value. One counting pass for all requests, then a
    // serial scan of the one block that holds each answer.
    void find_ties(std::vector<TieRequest>& reqs) {
        const size_t nr = reqs.size();
        std::vector<int64_t> counts(static_cast<size_t>(nblocks_) * nr, 0);
        parallel_for(nblocks_, a_.n_threads, [&](int64_t blk, int slot) {
            Scratch& s = scratch(slot);
            const int64_t len = block_len(blk);
            load(s, blk * kBlock, len);
            for (size_t r = 0; r < nr; ++r) {
                const float* x = s.x.data() + static_cast<int64_t>(reqs[r].model) * kBlock;
                counts[static_cast<size_t>(blk) * nr + r] = loops::count_equal_abs(x, reqs[r].value, len);
            }
        });
        for (size_t r = 0; r < nr; ++r) {
            TieRequest& q = reqs[r];
            int64_t cum = 0;
            bool found = false;
            for (int64_t blk = 0; blk < nblocks_ && !found; ++blk) {
                const int64_t c = counts[static_cast<size_t>(blk) * nr + r];
                if (cum + c > q.ordinal) {
                    Scratch& s = scratch(0);
                    const int64_t len = block_len(blk);
                    load(s, blk * kBlock, len, q.model);
                    const float* x = s.x.data() + static_cast<int64_t>(q.model) * kBlock;
                    for (int64_t j = 0; j < len; ++j)
                        if ((f32_bits(x[j]) & 0x7fffffffu) == q.value && cum++ == q.ordinal) {
                            *q.target = blk * kBlock + j;
                            found = true;
                            break;
                        }
                }
                cum += c;
            }
            if (!found) fail(LFM_STATUS_INTERNAL, "radix select lost a tie (model ", q.model, ")");
        }
    }

    // ---- random draws --------------------------------------------------------------
    // draws[j] = Philox word for element start + j, j < len (start need not be aligned).
    void fill_draws(uint32_t stream, int64_t start, int64_t len, uint32_t* draws) const {
        const int64_t q0 = start >> 2, q1 = (start + len + 3) >> 2;
        thread_local std::vector<uint32_t> words;
        words.resize(static_cast<size_t>(q1 - q0) * 4);
        loops::philox_blocks(a_.seed, stream, static_cast<uint64_t>(q0), q1 - q0, words.data());
        std::memcpy(draws, words.data() + (start & 3), static_cast<size_t>(len) * 4);
    }

    // ---- DELLA masks ---------------------------------------------------------------
    void della_masks() {
        const int64_t rows = a_.rows, cols = a_.cols;
        mbytes_ = (K_ + 7) / 8;
        mask_.assign(static_cast<size_t>(n_) * mbytes_, 0);
        // keep threshold per (model, rank): p = (d - eps) + (2 eps) * (rank - 1) / (cols - 1)
        std::vector<std::vector<uint64_t>> thr(static_cast<size_t>(K_));
        for (int i = 0; i < K_; ++i) {
            thr[i].resize(static_cast<size_t>(cols));
            for (int64_t r = 0; r < cols; ++r) {
                double rn = cols > 1 ? static_cast<double>(r) / static_cast<double>(cols - 1) : 0.0;
                thr[i][r] = keep_threshold((a_.d[i] - a_.eps[i]) + (2.0 * a_.eps[i]) * rn);
            }
        }
        parallel_for(rows, a_.n_threads, [&](int64_t row, int) {
            thread_local std::vector<float> b, x;
            thread_local std::vector<uint32_t> keys, idx, keys2, idx2, draws;
            b.resize(cols);
            x.resize(cols);
            keys.resize(cols);
            idx.resize(cols);
            keys2.resize(cols);
            idx2.resize(cols);
            draws.resize(cols);
            const int64_t start = row * cols;
            load_f32(ptr(a_.base, start), a_.base->dtype, b.data(), cols);
            for (int i = 0; i < K_; ++i) {
                load_f32(ptr(a_.models[i], start), a_.models[i]->dtype, x.data(), cols);
                if (loops::sub_check(x.data(), b.data(), cols)) nonfinite_row(start, cols);
                for (int64_t j = 0; j < cols; ++j) {
                    keys[j] = f32_bits(x[j]) & 0x7fffffffu;
                    idx[j] = static_cast<uint32_t>(j);
                }
                // rank = position in (|delta| bits, column) ascending order: a stable LSD
                // radix sort on the bits keeps equal values in column order.
                radix_sort_stable(keys, idx, keys2, idx2, cols);
                fill_draws(a_.stream[i], start, cols, draws.data());
                const uint64_t* t = thr[i].data();
                uint8_t* m = mask_.data() + start * mbytes_ + (i >> 3);
                const uint8_t bit = static_cast<uint8_t>(1u << (i & 7));
                for (int64_t r = 0; r < cols; ++r) {
                    const int64_t j = idx[r];
                    if (draws[j] < t[r]) m[j * mbytes_] |= bit;
                }
            }
        });
    }

    // Stable LSD radix sort of (keys, idx) by keys, 8-bit digits; digits on which all
    // keys agree are skipped. Result in keys/idx.
    static void radix_sort_stable(std::vector<uint32_t>& keys, std::vector<uint32_t>& idx,
                                  std::vector<uint32_t>& keys2, std::vector<uint32_t>& idx2, int64_t n) {
        uint32_t cnt[4][256];
        std::memset(cnt, 0, sizeof(cnt));
        for (int64_t j = 0; j < n; ++j) {
            const uint32_t k = keys[j];
            ++cnt[0][k & 255u];
            ++cnt[1][(k >> 8) & 255u];
            ++cnt[2][(k >> 16) & 255u];
            ++cnt[3][k >> 24];
        }
        for (int d = 0; d < 4; ++d) {
            const int sh = 8 * d;
            if (cnt[d][(keys[0] >> sh) & 255u] == static_cast<uint32_t>(n)) continue;  // all equal here
            uint32_t off[256], sum = 0;
            for (int v = 0; v < 256; ++v) {
                off[v] = sum;
                sum += cnt[d][v];
            }
            for (int64_t j = 0; j < n; ++j) {
                const uint32_t p = off[(keys[j] >> sh) & 255u]++;
                keys2[p] = keys[j];
                idx2[p] = idx[j];
            }
            keys.swap(keys2);
            idx.swap(idx2);
        }
    }

    [[noreturn]] void nonfinite_row(int64_t start, int64_t len) const {
        Scratch dummy;
        nonfinite(start, len, dummy);
    }

    // ---- keep flags of one model over one block ------------------------------------
    void keep_flags(int i, int64_t start, int64_t len, const float* x, Scratch& s) const {
        // s.keep[j] = 1 iff model i keeps element start + j (x = its delta over the block)
        uint8_t* k = s.keep.data();
        switch (a_.sparsifier) {
            case Sparsifier::None:
                std::memset(k, 1, static_cast<size_t>(len));
                return;
            case Sparsifier::Magnitude:
            case Sparsifier::MagnitudeOutliers: {
                const Cut& c = cuts_[i];
                if (c.all) { std::memset(k, 1, static_cast<size_t>(len)); return; }
                if (c.none) { std::memset(k, 0, static_cast<size_t>(len)); return; }
                loops::cut_keep(x, start, c.lo_v, c.lo_emin, c.lo_emax, c.hi_v, c.hi_emin, c.hi_emax, k, len);
                return;
            }
            case Sparsifier::Random: {
                const uint64_t t = thr_[i];
                if (t >= 0x100000000ull) { std::memset(k, 1, static_cast<size_t>(len)); return; }
                uint32_t* dr = s.draws.data();
                fill_draws(a_.stream[i], start, len, dr);
                loops::draws_below(dr, static_cast<uint32_t>(t), k, len);
                return;
            }
            case Sparsifier::Della: {
                const uint8_t* m = mask_.data() + start * mbytes_ + (i >> 3);
                const int sh = i & 7;
                for (int64_t j = 0; j < len; ++j) k[j] = (m[j * mbytes_] >> sh) & 1u;
                return;
            }
        }
    }

    // ---- rescale: L1 norm matching -------------------------------------------------
    void l1_factors() {
        std::vector<double> tot(static_cast<size_t>(nblocks_) * K_, 0.0), kept(tot.size(), 0.0);
        parallel_for(nblocks_, a_.n_threads, [&](int64_t blk, int slot) {
            Scratch& s = scratch(slot);
            const int64_t start = blk * kBlock, len = block_len(blk);
            load(s, start, len);
            for (int i = 0; i < K_; ++i) {
                const float* x = s.x.data() + static_cast<int64_t>(i) * kBlock;
                keep_flags(i, start, len, x, s);
                double t = 0.0, k = 0.0;
                for (int64_t j = 0; j < len; ++j) {
                    double v = std::fabs(static_cast<double>(x[j]));
                    t += v;
                    k += s.keep[j] ? v : 0.0;
                }
                tot[blk * K_ + i] = t;
                kept[blk * K_ + i] = k;
            }
        });
        for (int i = 0; i < K_; ++i) {
            double t = 0.0, k = 0.0;
            for (int64_t blk = 0; blk < nblocks_; ++blk) {
                t += tot[blk * K_ + i];
                k += kept[blk * K_ + i];
            }
            factor_[i] = (t >= 1e-7 && k >= 1e-7) ? t / k : 1.0;
        }
    }

    // ---- the merge pass ------------------------------------------------------------
    void merge_pass() {
        // t_i = w_i * factor_i * delta_i where kept, in float32 (one rounding of the
        // coefficient, one of the product). The elected sign uses a float32 sum with an
        // error bound; the few elements whose sum is too close to zero for float32 to
        // decide are recomputed in float64, so the sign always equals the reference's.
        std::vector<float> coef(K_), ecoef(K_);
        double wsum = 0.0;
        for (int i = 0; i < K_; ++i) {
            coef[i] = static_cast<float>(a_.w[i] * factor_[i]);
            ecoef[i] = static_cast<float>(a_.consensus_unweighted ? factor_[i] : a_.w[i] * factor_[i]);
            wsum += a_.w[i];
        }
        const float inv_plain_div = static_cast<float>(1.0 / (std::fabs(wsum) < 1e-8 ? 1.0 : wsum));
        const float lam = static_cast<float>(a_.lambda);
        const bool sparse = a_.sparsifier != Sparsifier::None;
        const bool unw = a_.consensus_unweighted;
        // |S32 - S| <= (K + 2) * 2^-24 * sum|e_i| (rounding of coefficients, products and
        // the sum); twice that is the margin below which float32 cannot decide the sign.
        const float tol = static_cast<float>((K_ + 2) * std::ldexp(1.0, -23));
        // Divisor of each agreement pattern (K <= 8): sum of the agreeing w_i (or their
        // count), in float64 and model order like the reference; |d| < 1e-8 -> 1.
        const bool table = a_.consensus && K_ <= 8;
        std::vector<float> inv_div;
        if (table) {
            inv_div.resize(size_t(1) << K_);
            for (uint32_t m = 0; m < (1u << K_); ++m) {
                double d = 0.0;
                for (int i = 0; i < K_; ++i)
                    if (m >> i & 1u) d += a_.disjoint_count ? 1.0 : a_.w[i];
                inv_div[m] = a_.normalize ? static_cast<float>(1.0 / (std::fabs(d) < 1e-8 ? 1.0 : d)) : 1.0f;
            }
        }
        parallel_for(nblocks_, a_.n_threads, [&](int64_t blk, int slot) {
            Scratch& s = scratch(slot);
            const int64_t start = blk * kBlock, len = block_len(blk);
            load(s, start, len);
            float* mixed = s.mixed.data();
            std::fill(mixed, mixed + len, 0.0f);
            auto X = [&](int i) { return s.x.data() + static_cast<int64_t>(i) * kBlock; };
            auto T = [&](int i) { return s.t.data() + static_cast<int64_t>(i) * kBlock; };
            auto KP = [&](int i) { return s.keepk.data() + static_cast<int64_t>(i) * kBlock; };
            if (!a_.consensus) {
                for (int i = 0; i < K_; ++i) {
                    const uint8_t* k = nullptr;
                    if (sparse) {
                        keep_flags(i, start, len, X(i), s);
                        k = s.keep.data();
                    }
                    loops::weigh_add(X(i), k, coef[i], mixed, len);
                }
                if (a_.normalize) loops::scale(mixed, inv_plain_div, len);
            } else {
                float* S = s.s32.data();
                float* A = s.a32.data();
                std::fill(S, S + len, 0.0f);
                std::fill(A, A + len, 0.0f);
                for (int i = 0; i < K_; ++i) {
                    const uint8_t* k = nullptr;
                    if (sparse) {
                        keep_flags(i, start, len, X(i), s);
                        std::memcpy(KP(i), s.keep.data(), static_cast<size_t>(len));
                        k = KP(i);
                    }
                    loops::weigh(X(i), k, coef[i], T(i), len);
                    // the election value e_i: t_i itself (weighted) or factor_i * delta'_i
                    if (unw) loops::weigh(X(i), k, ecoef[i], X(i), len);
                    loops::elect_add(unw ? X(i) : T(i), S, A, len);
                }
                float* sgn = s.sgn.data();
                if (loops::elect_sign(S, A, tol, sgn, len)) {
                    // Undecided in float32: recompute S in float64 like the reference,
                    // from delta = fp32(x) - fp32(b) reloaded for that element.
                    for (int64_t j = 0; j < len; ++j) {
                        if (sgn[j] != 0.0f) continue;
                        double sd = 0.0;
                        for (int i = 0; i < K_; ++i) {
                            if (sparse && !KP(i)[j]) continue;
                            float xi;
                            load_f32(ptr(a_.models[i], start + j), a_.models[i]->dtype, &xi, 1);
                            const double dp = static_cast<double>(xi - s.b[j]) * factor_[i];
                            sd += unw ? dp : a_.w[i] * dp;
                        }
                        sgn[j] = sd >= 0.0 ? 1.0f : -1.0f;
                    }
                }
                if (table) {
                    float* bits = s.bits.data();
                    std::fill(bits, bits + len, 0.0f);
                    for (int i = 0; i < K_; ++i)
                        loops::agree_add_bits(unw ? X(i) : T(i), T(i), sgn, static_cast<float>(1u << i), mixed,
                                              bits, len);
                    loops::scale_by_table(mixed, bits, inv_div.data(), len);
                } else {
                    double* div = s.div.data();
                    std::fill(div, div + len, 0.0);
                    for (int i = 0; i < K_; ++i)
                        loops::agree_add_div(unw ? X(i) : T(i), T(i), sgn, a_.disjoint_count ? 1.0 : a_.w[i], mixed,
                                             div, len);
                    if (a_.normalize) loops::divide_guarded(mixed, div, len);
                }
            }
            float* o = s.o.data();
            loops::finish(a_.base ? s.b.data() : nullptr, lam, mixed, o, len);
            char* dst = static_cast<char*>(a_.out->data) + start * static_cast<int64_t>(dtype_size(a_.out->dtype));
            store_f32(o, a_.out->dtype, dst, len);
        });
    }

    const MergeArgs& a_;
    const int K_;
    const int64_t n_;
    int64_t nblocks_ = 0;
    std::vector<Cut> cuts_;
    std::vector<double> factor_;
    std::vector<uint64_t> thr_;
    std::vector<uint8_t> mask_;
    int64_t mbytes_ = 0;
    std::vector<std::unique_ptr<Scratch>> scratch_ =
        std::vector<std::unique_ptr<Scratch>>(static_cast<size_t>(std::max({1, get_num_threads(), a_.n_threads})));
};

}  // namespace

void merge_cpu(const MergeArgs& a) {
    for (const lfm_tensor* m : a.models) check_device(*m, LFM_DEVICE_CPU, "model");
    CpuMerge(a).run();
}

}  // namespace lfm::merge
