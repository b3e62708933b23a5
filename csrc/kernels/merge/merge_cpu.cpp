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

    bool keep(uint32_t v, int64_t e) const {
        if (v < lo_v || v > hi_v) return false;
        bool ok = true;
        if (v == lo_v) ok = e >= lo_emin && e <= lo_emax;
        if (v == hi_v) ok = ok && e >= hi_emin && e <= hi_emax;
        return ok;
    }
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

struct Scratch {
    std::vector<float> b, x, mixed, o;
    std::vector<double> s, div;  // elected-sign sums and divisors, float64 like the reference
    std::vector<uint8_t> keep;
    std::vector<uint32_t> draws;
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
        if (a_.sparsifier == Sparsifier::Magnitude || a_.sparsifier == Sparsifier::MagnitudeOutliers) select();
        if (a_.sparsifier == Sparsifier::Random)
            for (int i = 0; i < K_; ++i) thr_[i] = keep_threshold(a_.d[i]);
        if (a_.sparsifier == Sparsifier::Della) della_masks();
        if (a_.sparsifier != Sparsifier::None) {
            if (a_.rescale == LFM_RESCALE_L1) l1_factors();
            if (a_.rescale == LFM_RESCALE_INVERSE_DENSITY)
                for (int i = 0; i < K_; ++i) factor_[i] = a_.d[i] > 0.0 ? 1.0 / a_.d[i] : 1.0;
        }
        merge_pass();
    }

private:
    // ---- loading -------------------------------------------------------------------
    Scratch& scratch(int slot) {
        auto& s = scratch_[static_cast<size_t>(slot)];
        if (!s) {
            s = std::make_unique<Scratch>();
            s->b.resize(kBlock);
            s->x.resize(static_cast<size_t>(K_) * kBlock);
            s->s.resize(kBlock);
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
        for (auto& q : queries) {
            Cut& c = cuts_[q.model];
            const bool upper = q.pos < 0;
            const int64_t pos = upper ? -q.pos - 1 : q.pos;
            const int64_t ordinal = pos - q.c_lt;  // 0-based among the ties of q.value
            if (a_.sparsifier == Sparsifier::Magnitude) {
                // keep the k = n - pos largest; ties keep lower indices: n_keep_ties of them
                const int64_t c_gt = n_ - q.c_lt - q.c_eq;
                const int64_t keep_ties = (n_ - pos) - c_gt;  // 1..c_eq
                c.lo_v = q.value;
                c.lo_emin = 0;
                c.lo_emax = keep_ties >= q.c_eq ? kNoLimit : nth_tie(q.model, q.value, keep_ties - 1);
            } else if (!upper) {
                // drop the `ordinal` lowest-index ties of the lower cut value
                c.lo_v = q.value;
                c.lo_emin = ordinal == 0 ? 0 : nth_tie(q.model, q.value, ordinal);
                c.lo_emax = kNoLimit;
            } else {
                // keep ties of the upper cut value up to `ordinal` (lower indices first)
                c.hi_v = q.value;
                c.hi_emin = 0;
                c.hi_emax = ordinal >= q.c_eq - 1 ? kNoLimit : nth_tie(q.model, q.value, ordinal);
            }
        }
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

    // Flat index of the `ordinal`-th (0-based) element of model i whose |delta| bits == v.
    int64_t nth_tie(int model, uint32_t v, int64_t ordinal) {
        std::vector<int64_t> counts(static_cast<size_t>(nblocks_), 0);
        auto count_block = [&](Scratch& s, int64_t blk) {
            const int64_t len = block_len(blk);
            const float* x = s.x.data() + static_cast<int64_t>(model) * kBlock;
            int64_t c = 0;
            for (int64_t j = 0; j < len; ++j) c += (f32_bits(x[j]) & 0x7fffffffu) == v;
            return c;
        };
        parallel_for(nblocks_, a_.n_threads, [&](int64_t blk, int slot) {
            Scratch& s = scratch(slot);
            load(s, blk * kBlock, block_len(blk), model);
            counts[static_cast<size_t>(blk)] = count_block(s, blk);
        });
        int64_t cum = 0;
        for (int64_t blk = 0; blk < nblocks_; ++blk) {
            if (cum + counts[blk] > ordinal) {
                Scratch& s = scratch(0);
                const int64_t len = block_len(blk);
                load(s, blk * kBlock, len, model);
                const float* x = s.x.data() + static_cast<int64_t>(model) * kBlock;
                for (int64_t j = 0; j < len; ++j)
                    if ((f32_bits(x[j]) & 0x7fffffffu) == v && cum++ == ordinal) return blk * kBlock + j;
            }
            cum += counts[blk];
        }
        fail(LFM_STATUS_INTERNAL, "radix select lost a tie (model ", model, ")");
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
                loops::cut_interior(x, c.lo_v, c.hi_v, k, len);
                // the two cut values need the index rule (rare: only exact ties with a cut)
                for (int64_t j = 0; j < len; ++j) {
                    const uint32_t v = f32_bits(x[j]) & 0x7fffffffu;
                    if (v == c.lo_v || v == c.hi_v) k[j] = static_cast<uint8_t>(c.keep(v, start + j));
                }
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
        std::vector<float> wf(K_);
        double wsum = 0.0;
        for (int i = 0; i < K_; ++i) {
            wf[i] = static_cast<float>(a_.w[i]);
            wsum += a_.w[i];
        }
        const float inv_plain_div = static_cast<float>(1.0 / (std::fabs(wsum) < 1e-8 ? 1.0 : wsum));
        const float lam = static_cast<float>(a_.lambda);
        const bool sparse = a_.sparsifier != Sparsifier::None;
        parallel_for(nblocks_, a_.n_threads, [&](int64_t blk, int slot) {
            Scratch& s = scratch(slot);
            const int64_t start = blk * kBlock, len = block_len(blk);
            load(s, start, len);
            double* S = s.s.data();
            float* mixed = s.mixed.data();
            if (a_.consensus) std::fill(S, S + len, 0.0);
            // dp_i = kept ? factor_i * delta_i : 0, stored in place of delta_i. The elected
            // sign comes from a float64 sum (as exact as the reference's), so an element whose
            // sum is near zero does not flip sign with float32 rounding.
            for (int i = 0; i < K_; ++i) {
                float* x = s.x.data() + static_cast<int64_t>(i) * kBlock;
                if (sparse) keep_flags(i, start, len, x, s);
                loops::sparsify_accumulate(x, sparse ? s.keep.data() : nullptr, factor_[i],
                                           a_.consensus_unweighted ? 1.0 : a_.w[i], a_.consensus ? S : nullptr, len);
            }
            std::fill(mixed, mixed + len, 0.0f);
            if (a_.consensus) {
                double* div = s.div.data();
                std::fill(div, div + len, 0.0);
                for (int i = 0; i < K_; ++i)
                    loops::consensus_add(s.x.data() + static_cast<int64_t>(i) * kBlock, wf[i],
                                         a_.disjoint_count ? 1.0 : a_.w[i], a_.consensus_unweighted, S, mixed, div,
                                         len);
                // |divisor| < 1e-8 -> 1 (spec: == 0; agreeing negative weights can cancel to
                // ~1e-17, see reference/merge.py), summed in float64 like the reference.
                if (a_.normalize) loops::divide_guarded(mixed, div, len);
            } else {
                for (int i = 0; i < K_; ++i) loops::axpy(s.x.data() + static_cast<int64_t>(i) * kBlock, wf[i], mixed, len);
                if (a_.normalize) loops::scale(mixed, inv_plain_div, len);
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
