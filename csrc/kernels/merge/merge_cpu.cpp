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
    std::vector<float> b, x, s, mixed, div, o;
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

    // Load x_i (minus the base, unless linear) for block [start, start+len) into s.x.
    void load(Scratch& s, int64_t start, int64_t len) const {
        float* b = s.b.data();
        if (a_.base) load_f32(ptr(a_.base, start), a_.base->dtype, b, len);
        uint32_t bad = 0;
        for (int i = 0; i < K_; ++i) {
            float* x = s.x.data() + static_cast<int64_t>(i) * kBlock;
            load_f32(ptr(a_.models[i], start), a_.models[i]->dtype, x, len);
            if (a_.base)
                for (int64_t j = 0; j < len; ++j) x[j] -= b[j];
            for (int64_t j = 0; j < len; ++j) bad |= (f32_bits(x[j]) & 0x7f800000u) == 0x7f800000u;
        }
        if (a_.base)
            for (int64_t j = 0; j < len; ++j) bad |= (f32_bits(b[j]) & 0x7f800000u) == 0x7f800000u;
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
            load(s, blk * kBlock, block_len(blk));
            counts[static_cast<size_t>(blk)] = count_block(s, blk);
        });
        int64_t cum = 0;
        for (int64_t blk = 0; blk < nblocks_; ++blk) {
            if (cum + counts[blk] > ordinal) {
                Scratch& s = scratch(0);
                const int64_t len = block_len(blk);
                load(s, blk * kBlock, len);
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
        int64_t e = start;
        const int64_t end = start + len;
        while (e < end) {
            const uint64_t q = static_cast<uint64_t>(e) >> 2;
            Philox4 r = philox_block(a_.seed, stream, q);
            for (int w = static_cast<int>(e & 3); w < 4 && e < end; ++w, ++e) draws[e - start] = r.v[w];
        }
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
        parallel_for(rows, a_.n_threads, [&](int64_t row, int slot) {
            thread_local std::vector<float> b, x;
            thread_local std::vector<uint64_t> keys;
            thread_local std::vector<uint32_t> draws;
            b.resize(cols);
            x.resize(cols);
            keys.resize(cols);
            draws.resize(cols);
            (void)slot;
            const int64_t start = row * cols;
            load_f32(ptr(a_.base, start), a_.base->dtype, b.data(), cols);
            for (int i = 0; i < K_; ++i) {
                load_f32(ptr(a_.models[i], start), a_.models[i]->dtype, x.data(), cols);
                for (int64_t j = 0; j < cols; ++j) {
                    float dlt = x[j] - b[j];
                    uint32_t v = f32_bits(dlt) & 0x7fffffffu;
                    keys[j] = (static_cast<uint64_t>(v) << 32) | static_cast<uint64_t>(j);
                }
                std::sort(keys.begin(), keys.end());
                fill_draws(a_.stream[i], start, cols, draws.data());
                const uint64_t* t = thr[i].data();
                uint8_t* m = mask_.data() + start * mbytes_ + (i >> 3);
                const uint8_t bit = static_cast<uint8_t>(1u << (i & 7));
                for (int64_t r = 0; r < cols; ++r) {
                    const int64_t j = static_cast<int64_t>(keys[r] & 0xffffffffu);
                    if (draws[j] < t[r]) m[j * mbytes_] |= bit;
                }
            }
        });
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
                for (int64_t j = 0; j < len; ++j) {
                    uint32_t v = f32_bits(x[j]) & 0x7fffffffu;
                    k[j] = (v > c.lo_v && v < c.hi_v) ? 1 : static_cast<uint8_t>(c.keep(v, start + j));
                }
                return;
            }
            case Sparsifier::Random: {
                const uint64_t t = thr_[i];
                if (t >= 0x100000000ull) { std::memset(k, 1, static_cast<size_t>(len)); return; }
                uint32_t* dr = s.draws.data();
                fill_draws(a_.stream[i], start, len, dr);
                for (int64_t j = 0; j < len; ++j) k[j] = dr[j] < t;
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
        const bool linear = a_.method == LFM_MERGE_LINEAR;
        std::vector<float> wf(K_), ff(K_);
        double wsum = 0.0;
        for (int i = 0; i < K_; ++i) {
            wf[i] = static_cast<float>(a_.w[i]);
            ff[i] = static_cast<float>(factor_[i]);
            wsum += a_.w[i];
        }
        const float plain_div = static_cast<float>(std::fabs(wsum) < 1e-8 ? 1.0 : wsum);
        const float lam = static_cast<float>(a_.lambda);
        const bool normalize = a_.normalize;
        parallel_for(nblocks_, a_.n_threads, [&](int64_t blk, int slot) {
            Scratch& s = scratch(slot);
            const int64_t start = blk * kBlock, len = block_len(blk);
            load(s, start, len);
            float* S = s.s.data();
            float* mixed = s.mixed.data();
            float* div = s.div.data();
            float* o = s.o.data();
            const float* b = s.b.data();
            std::fill(S, S + len, 0.0f);
            // dp_i = kept ? factor_i * delta_i : 0, stored in place of delta_i
            for (int i = 0; i < K_; ++i) {
                float* x = s.x.data() + static_cast<int64_t>(i) * kBlock;
                if (a_.sparsifier != Sparsifier::None) {
                    keep_flags(i, start, len, x, s);
                    const uint8_t* k = s.keep.data();
                    const float f = ff[i];
                    for (int64_t j = 0; j < len; ++j) x[j] = k[j] ? f * x[j] : 0.0f;
                }
                if (a_.consensus) {
                    const float w = a_.consensus_unweighted ? 1.0f : wf[i];
                    for (int64_t j = 0; j < len; ++j) S[j] += w * x[j];
                }
            }
            std::fill(mixed, mixed + len, 0.0f);
            if (a_.consensus) {
                std::fill(div, div + len, 0.0f);
                for (int i = 0; i < K_; ++i) {
                    const float* x = s.x.data() + static_cast<int64_t>(i) * kBlock;
                    const float w = wf[i];
                    const float wd = a_.disjoint_count ? 1.0f : w;
                    const bool unw = a_.consensus_unweighted;
                    for (int64_t j = 0; j < len; ++j) {
                        const float t = w * x[j];
                        const float sg = unw ? x[j] : t;
                        const bool m = S[j] >= 0.0f ? sg > 0.0f : sg < 0.0f;
                        mixed[j] += m ? t : 0.0f;
                        div[j] += m ? wd : 0.0f;
                    }
                }
                if (normalize)
                    for (int64_t j = 0; j < len; ++j) mixed[j] /= (div[j] == 0.0f ? 1.0f : div[j]);
            } else {
                for (int i = 0; i < K_; ++i) {
                    const float* x = s.x.data() + static_cast<int64_t>(i) * kBlock;
                    const float w = wf[i];
                    for (int64_t j = 0; j < len; ++j) mixed[j] += w * x[j];
                }
                if (normalize)
                    for (int64_t j = 0; j < len; ++j) mixed[j] /= plain_div;
            }
            if (linear) {
                std::memcpy(o, mixed, static_cast<size_t>(len) * 4);
            } else {
                for (int64_t j = 0; j < len; ++j) o[j] = b[j] + lam * mixed[j];
            }
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
