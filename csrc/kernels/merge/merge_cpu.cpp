// Fused sparsify-and-merge on the CPU (docs/spec/merge.md).
//
// Deltas are formed on the fly, block by block (kBlock elements, converted to fp32 in
// per-worker scratch), so no K x n float copy ever exists. Passes over the data:
//   - magnitude / magnitude_outliers: a 16-bit high histogram pass and a 16-bit low
//     histogram pass over |delta| bit patterns (radix select; non-negative floats order
//     like their bits), plus a short pass that finds the flat index of the cut-off tie
//     when only part of the equal values is kept (lower index first, as the spec says);
//   - DELLA: a mask pass that decides each row from a histogram of its values, ranking
//     exactly only the bins where the draw is close to the threshold (della_rank.h; a
//     radix sort of the row otherwise), and stores one keep bit per model and element
//     (ceil(K/8) bytes per element);
//   - rescale "l1": a norm pass giving ||delta||_1 and ||delta'||_1;
//   - the merge pass: keep rule, weighting, sign consensus, normalisation, output.
// Determinism: every reduction is made per fixed block (or row) and combined in block
// order, and random draws depend only on (seed, stream, element), so the result is
// bit-identical for any number of threads.
#include <algorithm>
#include <atomic>
#include <chrono>
#include <ctime>
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
#include "kernels/merge/merge_plan.h"

namespace lfm::merge {
namespace {

constexpr int64_t kBlock = 4096;          // elements per task; a multiple of 4 (Philox blocks)
constexpr int kMaxHistWorkers = 16;       // caps per-worker histogram memory
constexpr int64_t kSampleMinN = 1 << 18;  // below this the radix passes are cheap enough
constexpr int64_t kSampleSize = 1 << 18;  // largest sample of |delta| that brackets a quantile
constexpr int64_t kSampleMin = 1 << 14;   // smallest (n_ / 16 in between)
constexpr int64_t kSampleRun = 16;        // the sample is made of runs of contiguous elements
// A radix-select query (merge_plan.h's CutQuery) and its answer.
struct Query {
    int model;
    int64_t pos;
    bool upper;
    uint32_t hb = 0;      // high 16 bits of the answer
    int64_t below_hb = 0; // elements with high bits < hb
    uint32_t value = 0;   // answer: |delta| bits
    int64_t c_lt = 0, c_eq = 0;
    bool sampled = false;           // answered by sample_select: tie_idx holds every tie
    std::vector<int64_t> tie_idx;   // flat indices of the elements equal to value, ascending
    // sample_select answered by an end of its bracket (lo or hi, the heavily tied values
    // of bf16 deltas), whose elements are counted per block, not collected: only the count
    // of each block is kept (eq_blk), and the one tie a cut needs is found by rereading its
    // block (locate_tie), instead of tie_idx
    bool counted = false;
    std::vector<int64_t> eq_blk;
};

// Where a cut needs the flat index of the ordinal-th tie of `value` in model `model`.
struct TieRequest {
    int model;
    uint32_t value;
    int64_t ordinal;
    int64_t* target;
};

struct Scratch {
    std::vector<float> b, x, t, e, mixed, o, sgn, bits;
    std::vector<double> s64, div;  // elected-sign sums; divisors (K > 8 only), float64
    std::vector<uint8_t> keep, keepk;
    std::vector<uint32_t> draws, cand_v;
    std::vector<uint32_t> qpos, qval;  // per query of the selection scan: candidates' positions, values
};

// LFM_PROFILE=1 prints the time of each pass to stderr (for tuning; off by default).
struct PhaseTimer {
    bool on = std::getenv("LFM_PROFILE") != nullptr;
    std::clock_t t = std::clock();  // CPU time: meaningful on a busy machine with one thread
    std::chrono::steady_clock::time_point w = std::chrono::steady_clock::now();  // wall: shows serial parts
    void mark(const char* what) {
        if (!on) return;
        std::clock_t now = std::clock();
        const auto wnow = std::chrono::steady_clock::now();
        std::fprintf(stderr, "[lfm merge] %-12s %8.2f ms cpu %8.2f ms wall\n", what, 1e3 * double(now - t) / CLOCKS_PER_SEC,
                     std::chrono::duration<double, std::milli>(wnow - w).count());
        t = now;
        w = wnow;
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
        if (a_.n_nonfinite_out) *a_.n_nonfinite_out = 0;
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
                for (int i = 0; i < K_; ++i) factor_[i] = inverse_density_factor(a_.d[i]);
        }
        merge_pass();
        timer.mark("merge_pass");
        if (a_.n_nonfinite_out) *a_.n_nonfinite_out = nonfinite_out_.load();
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
            if (a_.consensus_unweighted) s->e.resize(static_cast<size_t>(K_) * kBlock);
            s->keepk.resize(static_cast<size_t>(K_) * kBlock);
            s->s64.resize(kBlock);
            s->sgn.resize(kBlock);
            s->bits.resize(kBlock);
            s->mixed.resize(kBlock);
            s->div.resize(kBlock);
            s->o.resize(kBlock);
            s->keep.resize(kBlock);
            s->draws.resize(kBlock + 8);
            s->cand_v.resize(kBlock + 8);
        }
        return *s;
    }

    static const char* ptr(const lfm_tensor* t, int64_t start) {
        return static_cast<const char*>(t->data) + start * static_cast<int64_t>(dtype_size(t->dtype));
    }

    [[noreturn]] void nonfinite(int64_t start, int64_t len) const {
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
                    fail(LFM_STATUS_NONFINITE, "non-finite value (", tmp[j], ") in ", a_.model_label(i), " at element ",
                         start + j, " of tensor '", a_.name, "'");
        }
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
            bad |= a_.base ? loops_.sub_check(x, b, len) : loops_.check_finite(x, len);
        }
        if (bad) nonfinite(start, len);
    }

    int64_t block_len(int64_t blk) const { return std::min(kBlock, n_ - blk * kBlock); }

    // ---- radix select (magnitude, magnitude_outliers) -------------------------------
    void select() {
        CutPlan plan = plan_cuts(a_.sparsifier, n_, a_.d, a_.gamma);
        cuts_ = plan.cuts;
        std::vector<Query> queries;
        for (const CutQuery& cq : plan.queries) queries.push_back(Query{cq.model, cq.pos, cq.upper, {}, {}, {}, {}, {}, {}, {}});
        if (queries.empty()) return;
        // Most queries are answered by one bracketing pass (sample_select); the rest by
        // the exact radix passes.
        std::vector<Query> rest;
        PhaseTimer st;
        if (n_ >= kSampleMinN) sample_select(queries);
        st.mark("  sample");
        for (auto& q : queries)
            if (!q.sampled) rest.push_back(q);
        if (!rest.empty()) {
            run_queries(rest);
            size_t r = 0;
            for (auto& q : queries)
                if (!q.sampled) q = rest[r++];
        }
        // Turn each answer into a cut; a cut that keeps only part of the equal values
        // needs the flat index of one tie, found for all cuts together in one pass.
        std::vector<TieRequest> ties;
        for (auto& q : queries) {
            const TieNeed need = apply_cut_answer(a_.sparsifier, n_, CutQuery{q.model, q.pos, q.upper}, q.value, q.c_lt,
                                                  q.c_eq, cuts_[q.model]);
            if (need.field != TieField::None) tie_at(q, need.ordinal, tie_target(cuts_[q.model], need.field), ties);
        }
        st.mark("  radix");
        if (!ties.empty()) find_ties(ties);
        st.mark("  ties");
    }

    // *target = flat index of the ordinal-th tie of q.value: known already for sampled
    // queries, else requested from find_ties.
    void tie_at(const Query& q, int64_t ordinal, int64_t* target, std::vector<TieRequest>& ties) {
        if (q.sampled && q.counted)
            *target = locate_tie(q.model, q.value, ordinal, q.eq_blk.data(), 1);
        else if (q.sampled)
            *target = q.tie_idx[static_cast<size_t>(ordinal)];
        else
            ties.push_back(TieRequest{q.model, q.value, ordinal, target});
    }

    // Sample-select. From evenly spread runs of each model's |delta| (deterministic), take a
    // bracket [lo, hi] of values around the sampled quantile; one pass counts the elements
    // below lo, equal to lo and equal to hi, and collects those strictly between (value,
    // flat index). An answer at an end is known from the counts; one strictly inside from
    // a selection on the few candidates, with every tie's index (collected in flat order).
    // A miss, or more than n/16 candidates, leaves the query for the radix passes. Exact
    // either way.
    void sample_select(std::vector<Query>& queries) {
        const int nq = static_cast<int>(queries.size());
        PhaseTimer tt;
        // S / kSampleRun runs of kSampleRun contiguous elements, evenly spread (S <= n_ / 16,
        // so runs never overlap): whole cache lines instead of one scattered load per sampled
        // element. S follows n_ (n_ / 16, between kSampleMin and kSampleSize): a tensor of a
        // few million elements does not need the quarter-million-element sample of a large
        // one, whose gathering and selection cost ~15 ms per tensor on one core whatever n_.
        // A smaller sample only widens the bracket (the answer is exact either way).
        const int64_t S = std::clamp<int64_t>(n_ / 16 / kSampleRun * kSampleRun, kSampleMin, kSampleSize);
        const int64_t runs = S / kSampleRun;
        const int64_t stride = n_ / runs;
        const int64_t cap = std::max<int64_t>(n_ / 16, 4096);
        std::vector<uint32_t> lo(nq), hi(nq);
        // one task per model: its sample (and its histogram), then the bracket of each of its
        // queries
        std::vector<int> models;
        for (const Query& q : queries)
            if (std::find(models.begin(), models.end(), q.model) == models.end()) models.push_back(q.model);
        parallel_for(static_cast<int64_t>(models.size()), a_.n_threads, [&](int64_t mi, int) {
            const int m = models[static_cast<size_t>(mi)];
            std::vector<uint32_t> smp(static_cast<size_t>(S));
            float xv[kSampleRun], bv[kSampleRun];
            for (int64_t r = 0; r < runs; ++r) {
                const int64_t e = r * stride;
                load_f32(ptr(a_.models[m], e), a_.models[m]->dtype, xv, kSampleRun);
                load_f32(ptr(a_.base, e), a_.base->dtype, bv, kSampleRun);
                for (int64_t k = 0; k < kSampleRun; ++k)
                    smp[static_cast<size_t>(r * kSampleRun + k)] = f32_bits(xv[k] - bv[k]) & 0x7fffffffu;
            }
            // the order statistics by a histogram of the top 16 bits, then a linear-time
            // selection inside the one bin that holds each (a fraction of the sample, where two
            // nth_element over all of it cost ~5 ms per model for S = 2^18)
            std::vector<uint32_t> hist(65536, 0), bin;
            for (const uint32_t v : smp) ++hist[v >> 16];
            auto kth = [&](int64_t r) {  // the r-th smallest sampled value (0-based)
                uint32_t h = 0;
                for (int64_t before = 0;; ++h) {
                    if (r < before + hist[h]) {
                        r -= before;
                        break;
                    }
                    before += hist[h];
                }
                bin.clear();
                for (const uint32_t v : smp)
                    if ((v >> 16) == h) bin.push_back(v);
                std::nth_element(bin.begin(), bin.begin() + r, bin.end());
                return bin[static_cast<size_t>(r)];
            };
            for (int qi = 0; qi < nq; ++qi) {
                if (queries[qi].model != m) continue;
                const int64_t pos = queries[qi].pos;
                const double qf = static_cast<double>(pos) / static_cast<double>(n_);
                const int64_t at = static_cast<int64_t>(qf * S);
                // the sampled quantile's position has standard deviation sqrt(S q (1-q)): 5 of them
                const int64_t margin = static_cast<int64_t>(5.0 * std::sqrt(S * qf * (1.0 - qf))) + 16;
                const int64_t ilo = at - margin, ihi = at + margin;
                lo[qi] = ilo <= 0 ? 0u : kth(ilo);
                hi[qi] = ihi >= S - 1 ? 0xffffffffu : kth(ihi);
            }
        });
        tt.mark("    sampling");
        std::vector<std::vector<Cand>> cands(static_cast<size_t>(nblocks_) * nq);
        std::vector<BracketCounts> counts(static_cast<size_t>(nblocks_) * nq);  // per (block, query)
        std::vector<std::atomic<int64_t>> total(static_cast<size_t>(nq));
        for (auto& t : total) t.store(0);
        // one sweep over the block for every query when the dtypes allow (delta_bracket_many)
        bool many = nq <= kMaxBracketQueries;
        for (const lfm_tensor* m : a_.models) many = many && m->dtype == a_.base->dtype;
        parallel_for_runs(nblocks_, a_.n_threads, [&](int64_t blk, int slot) {
            Scratch& s = scratch(slot);
            const int64_t start = blk * kBlock, len = block_len(blk);
            if (many && bracket_many(queries, lo, hi, cap, total, cands, counts, s, blk, start, len))
                return;
            float* b = s.b.data();
            load_f32(ptr(a_.base, start), a_.base->dtype, b, len);
            uint32_t bad = loops_.check_finite(b, len);
            uint64_t loaded = 0;  // models whose float32 deltas are in s.x (K <= 64)
            for (int qi = 0; qi < nq; ++qi) {
                if (total[qi].load(std::memory_order_relaxed) > cap) continue;  // overflowed: radix
                const int m = queries[qi].model;
                auto& out = cands[static_cast<size_t>(blk) * nq + qi];
                uint32_t* cj = s.draws.data();  // block-sized scratch for candidate positions
                float* x = s.x.data() + static_cast<int64_t>(m) * kBlock;
                uint32_t* cv = s.cand_v.data();
                // bf16/f32 bracketed straight from their bytes (once per query: re-reading a
                // block that is in cache is cheaper than materialising float32 deltas)
                BracketCounts& n = counts[static_cast<size_t>(blk) * nq + qi];
                int64_t nc = loops_.delta_bracket(ptr(a_.models[m], start), a_.models[m]->dtype, b, lo[qi], hi[qi],
                                                  cj, cv, &n, &bad, len);
                if (nc >= 0) {
                    keep_cands(out, cv, cj, nc, start);
                } else {
                    if (!(loaded >> m & 1u)) {
                        load_f32(ptr(a_.models[m], start), a_.models[m]->dtype, x, len);
                        bad |= loops_.sub_check(x, b, len);
                        loaded |= uint64_t(1) << m;
                    }
                    nc = loops_.bracket(x, lo[qi], hi[qi], cj, &n, len);
                    out.resize(static_cast<size_t>(nc));
                    for (int64_t c = 0; c < nc; ++c)
                        out[static_cast<size_t>(c)] = Cand{f32_bits(x[cj[c]]) & 0x7fffffffu, start + cj[c]};
                }
                total[qi].fetch_add(nc, std::memory_order_relaxed);
            }
            if (bad) nonfinite(start, len);
        });
        tt.mark("    scan");
        // the queries are independent: one task each
        parallel_for(nq, a_.n_threads, [&](int64_t qi, int) {
            if (total[qi].load() > cap) return;
            Query& q = queries[qi];
            const int64_t pos = q.pos;
            const int64_t nc = total[qi].load();
            int64_t nbelow = 0, nlo = 0, nhi = 0;
            for (int64_t blk = 0; blk < nblocks_; ++blk) {
                const BracketCounts& n = counts[static_cast<size_t>(blk) * nq + qi];
                nbelow += n.below;
                nlo += n.at_lo;
                nhi += n.at_hi;
            }
            if (pos < nbelow || pos >= nbelow + nlo + nc + nhi) return;  // the bracket missed
            // the answer at an end of the bracket: its value, counts and ties per block known
            auto at_end = [&](uint32_t value, int64_t c_lt, int64_t c_eq, int64_t BracketCounts::*per_block) {
                q.value = value;
                q.c_lt = c_lt;
                q.c_eq = c_eq;
                q.counted = true;
                q.eq_blk.resize(static_cast<size_t>(nblocks_));
                for (int64_t blk = 0; blk < nblocks_; ++blk)
                    q.eq_blk[static_cast<size_t>(blk)] = counts[static_cast<size_t>(blk) * nq + qi].*per_block;
                q.sampled = true;
            };
            if (pos < nbelow + nlo) return at_end(lo[qi], nbelow, nlo, &BracketCounts::at_lo);
            if (pos >= nbelow + nlo + nc) return at_end(hi[qi], nbelow + nlo + nc, nhi, &BracketCounts::at_hi);
            // The pos-th value by a linear-time selection on a copy of the values (the
            // per-block candidate lists are read in place, never concatenated: that copy
            // and per-tie push_backs cost ~10x the selection itself).
            std::vector<uint32_t> vals(static_cast<size_t>(nc));
            int64_t o = 0;
            for (int64_t blk = 0; blk < nblocks_; ++blk)
                for (const Cand& c : cands[static_cast<size_t>(blk) * nq + qi]) vals[static_cast<size_t>(o++)] = c.v;
            auto nth = vals.begin() + (pos - nbelow - nlo);
            std::nth_element(vals.begin(), nth, vals.end());
            const uint32_t value = *nth;
            q.value = value;
            int64_t lt = 0, eq = 0;
            for (const uint32_t v : vals) {  // order-free counts, on the permuted copy
                lt += v < value;
                eq += v == value;
            }
            // the ties' flat indices in flat order (blocks in order, each block's list in
            // element order), as the spec's tie rule needs
            q.tie_idx.resize(static_cast<size_t>(eq));
            int64_t t = 0;
            for (int64_t blk = 0; blk < nblocks_; ++blk)
                for (const Cand& c : cands[static_cast<size_t>(blk) * nq + qi])
                    if (c.v == value) q.tie_idx[static_cast<size_t>(t++)] = c.e;
            q.c_lt = nbelow + nlo + lt;
            q.c_eq = eq;
            q.sampled = true;
            if (tt.on)
                std::fprintf(stderr, "[lfm merge]     query %d: %lld candidates\n", static_cast<int>(qi),
                             static_cast<long long>(nc));
        });
        tt.mark("    finalize");
    }

    struct Cand {
        uint32_t v;
        int64_t e;
    };

    // A block's nc bracket candidates (values, block-local positions) as (value, flat index).
    static void keep_cands(std::vector<Cand>& out, const uint32_t* vals, const uint32_t* pos, int64_t nc,
                           int64_t start) {
        out.resize(static_cast<size_t>(nc));
        for (int64_t c = 0; c < nc; ++c) out[static_cast<size_t>(c)] = Cand{vals[c], start + pos[c]};
    }

    // The scan of sample_select for one block, every query still in play in one
    // delta_bracket_many sweep; false when the loops cannot (dtype), nothing done.
    bool bracket_many(const std::vector<Query>& queries, const std::vector<uint32_t>& lo,
                      const std::vector<uint32_t>& hi, int64_t cap, std::vector<std::atomic<int64_t>>& total,
                      std::vector<std::vector<Cand>>& cands, std::vector<BracketCounts>& counts, Scratch& s,
                      int64_t blk, int64_t start, int64_t len) {
        const int nq = static_cast<int>(queries.size());
        int act[kMaxBracketQueries];
        const void* xs[kMaxBracketQueries];
        uint32_t alo[kMaxBracketQueries], ahi[kMaxBracketQueries];
        uint32_t* ps[kMaxBracketQueries];
        uint32_t* vs[kMaxBracketQueries];
        int64_t cnt[kMaxBracketQueries];
        BracketCounts bn[kMaxBracketQueries];
        if (s.qpos.empty()) {
            s.qpos.resize(static_cast<size_t>(nq) * kBlock);
            s.qval.resize(static_cast<size_t>(nq) * kBlock);
        }
        int na = 0;
        for (int qi = 0; qi < nq; ++qi) {
            if (total[qi].load(std::memory_order_relaxed) > cap) continue;  // overflowed: radix
            act[na] = qi;
            xs[na] = ptr(a_.models[queries[qi].model], start);
            alo[na] = lo[qi];
            ahi[na] = hi[qi];
            ps[na] = s.qpos.data() + static_cast<int64_t>(na) * kBlock;
            vs[na] = s.qval.data() + static_cast<int64_t>(na) * kBlock;
            ++na;
        }
        uint32_t bad = 0;
        if (!loops_.delta_bracket_many(na, xs, ptr(a_.base, start), a_.base->dtype, alo, ahi, ps, vs, cnt, bn, &bad,
                                       len))
            return false;
        for (int a = 0; a < na; ++a) {
            const int qi = act[a];
            const int64_t nc = cnt[a];
            keep_cands(cands[static_cast<size_t>(blk) * nq + qi], vs[a], ps[a], nc, start);
            counts[static_cast<size_t>(blk) * nq + qi] = bn[a];
            total[qi].fetch_add(nc, std::memory_order_relaxed);
        }
        if (bad) nonfinite(start, len);
        return true;
    }

    void run_queries(std::vector<Query>& queries) {
        const int nq = static_cast<int>(queries.size());
        const int workers = plan_workers(nblocks_, std::min(kMaxHistWorkers, a_.n_threads > 0 ? a_.n_threads : get_num_threads()));
        // per worker: one 65536-bin histogram per query
        std::vector<std::vector<uint32_t>> hist(static_cast<size_t>(workers));
        auto hist_pass = [&](bool low) {
            for (auto& h : hist) h.assign(static_cast<size_t>(nq) * 65536, 0);
            parallel_for_runs(nblocks_, workers, [&](int64_t blk, int slot) {
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
                const int64_t pos = q.pos;
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
        parallel_for_runs(nblocks_, a_.n_threads, [&](int64_t blk, int slot) {
            Scratch& s = scratch(slot);
            const int64_t len = block_len(blk);
            load(s, blk * kBlock, len);
            for (size_t r = 0; r < nr; ++r) {
                const float* x = s.x.data() + static_cast<int64_t>(reqs[r].model) * kBlock;
                counts[static_cast<size_t>(blk) * nr + r] = loops_.count_equal_abs(x, reqs[r].value, len);
            }
        });
        for (size_t r = 0; r < nr; ++r)
            *reqs[r].target = locate_tie(reqs[r].model, reqs[r].value, reqs[r].ordinal, counts.data() + r, nr);
    }

    // Flat index of the ordinal-th element (flat order) of `model` whose |delta| bits equal
    // `value`, given how many such elements each block holds (counts[blk * stride]): only
    // the block holding it is reread.
    int64_t locate_tie(int model, uint32_t value, int64_t ordinal, const int64_t* counts, size_t stride) {
        int64_t cum = 0;
        for (int64_t blk = 0; blk < nblocks_; ++blk) {
            const int64_t c = counts[static_cast<size_t>(blk) * stride];
            if (cum + c > ordinal) {
                Scratch& s = scratch(0);
                const int64_t len = block_len(blk);
                load(s, blk * kBlock, len, model);
                const float* x = s.x.data() + static_cast<int64_t>(model) * kBlock;
                for (int64_t j = 0; j < len; ++j)
                    if ((f32_bits(x[j]) & 0x7fffffffu) == value && cum++ == ordinal) return blk * kBlock + j;
                break;
            }
            cum += c;
        }
        fail(LFM_STATUS_INTERNAL, "selection lost a tie (model ", model, ")");
    }

    // ---- random draws --------------------------------------------------------------
    // draws[j] = Philox word for element start + j, j < len (start need not be aligned).
    void fill_draws(uint32_t stream, int64_t start, int64_t len, uint32_t* draws) const {
        const int64_t q0 = start >> 2, q1 = (start + len + 3) >> 2;
        thread_local std::vector<uint32_t> words;
        words.resize(static_cast<size_t>(q1 - q0) * 4);
        loops_.philox_blocks(a_.seed, stream, static_cast<uint64_t>(q0), q1 - q0, words.data());
        std::memcpy(draws, words.data() + (start & 3), static_cast<size_t>(len) * 4);
    }

    // ---- stored masks (DARE's draws, DELLA's ranks) ---------------------------------
    // Left uninitialised here: each parallel task zeroes its own range before setting
    // bits, so the first touch of ~n bytes is spread over the threads instead of one
    // serial memset (~10 ms of DARE's 11008x4096 norm pass on two threads).
    void alloc_mask() {
        mbytes_ = (K_ + 7) / 8;
        mask_.reset(new uint8_t[static_cast<size_t>(n_ * mbytes_)]);
    }

    // ---- DELLA masks ---------------------------------------------------------------
    void della_masks() {
        const int64_t rows = a_.rows, cols = a_.cols;
        alloc_mask();
        // keep threshold per (model, rank), merge_plan.h
        std::vector<std::vector<uint64_t>> thr(static_cast<size_t>(K_));
        for (int i = 0; i < K_; ++i) thr[i] = della_thresholds(cols, a_.d[i], a_.eps[i]);
        parallel_for_runs(rows, a_.n_threads, [&](int64_t row, int) {
            thread_local std::vector<float> b, x;
            thread_local std::vector<uint32_t> keys, idx, keys2, idx2, draws;
            thread_local std::vector<uint8_t> keep;
            thread_local DellaRowScratch rs;
            keep.resize(cols);
            b.resize(cols);
            x.resize(cols);
            keys.resize(cols);
            idx.resize(cols);
            keys2.resize(cols);
            idx2.resize(cols);
            draws.resize(cols);
            const int64_t start = row * cols;
            std::memset(mask_.get() + start * mbytes_, 0, static_cast<size_t>(cols * mbytes_));
            load_f32(ptr(a_.base, start), a_.base->dtype, b.data(), cols);
            for (int i = 0; i < K_; ++i) {
                load_f32(ptr(a_.models[i], start), a_.models[i]->dtype, x.data(), cols);
                if (loops_.sub_check(x.data(), b.data(), cols)) nonfinite(start, cols);
                for (int64_t j = 0; j < cols; ++j) keys[j] = f32_bits(x[j]) & 0x7fffffffu;
                fill_draws(a_.stream[i], start, cols, draws.data());
                const uint64_t* t = thr[i].data();
                uint8_t* m = mask_.get() + start * mbytes_ + (i >> 3);
                const uint8_t bit = static_cast<uint8_t>(1u << (i & 7));
                // almost every row: decided from a histogram of its values (della_rank.h)
                if (loops_.della_keep_row(keys.data(), draws.data(), t, cols, keep.data(), rs)) {
                    loops_.or_bit(keep.data(), bit, m, mbytes_, cols);
                    continue;
                }
                // rank = position in (|delta| bits, column) ascending order: a stable LSD
                // radix sort on the bits keeps equal values in column order.
                for (int64_t j = 0; j < cols; ++j) idx[j] = static_cast<uint32_t>(j);
                radix_sort_stable(keys, idx, keys2, idx2, cols);
                for (int64_t r = 0; r < cols; ++r) {
                    const int64_t j = idx[r];
                    if (draws[j] < t[r]) m[j * mbytes_] |= bit;
                }
            }
        });
    }

    // Stable LSD radix sort of (keys, idx) by keys < 2^31, three 11-bit digits (the
    // counts fit in L1); digits on which all keys agree are skipped. Result in keys/idx.
    static void radix_sort_stable(std::vector<uint32_t>& keys, std::vector<uint32_t>& idx,
                                  std::vector<uint32_t>& keys2, std::vector<uint32_t>& idx2, int64_t n) {
        constexpr int kBits = 11, kBins = 1 << kBits;
        static thread_local uint32_t cnt[3][kBins];
        std::memset(cnt, 0, sizeof(cnt));
        for (int64_t j = 0; j < n; ++j) {
            const uint32_t k = keys[j];
            ++cnt[0][k & (kBins - 1)];
            ++cnt[1][(k >> kBits) & (kBins - 1)];
            ++cnt[2][(k >> (2 * kBits)) & (kBins - 1)];
        }
        for (int d = 0; d < 3; ++d) {
            const int sh = kBits * d;
            if (cnt[d][(keys[0] >> sh) & (kBins - 1)] == static_cast<uint32_t>(n)) continue;  // all equal here
            uint32_t off[kBins], sum = 0;
            for (int v = 0; v < kBins; ++v) {
                off[v] = sum;
                sum += cnt[d][v];
            }
            for (int64_t j = 0; j < n; ++j) {
                const uint32_t p = off[(keys[j] >> sh) & (kBins - 1)]++;
                keys2[p] = keys[j];
                idx2[p] = idx[j];
            }
            keys.swap(keys2);
            idx.swap(idx2);
        }
    }

    // ---- keep flags of one model over one block ------------------------------------
    void keep_flags(int i, int64_t start, int64_t len, const float* x, Scratch& s, uint8_t* out = nullptr) const {
        // k[j] = 1 iff model i keeps element start + j (x = its delta over the block);
        // k = out, or s.keep when out is null
        uint8_t* k = out ? out : s.keep.data();
        switch (a_.sparsifier) {
            case Sparsifier::None:
                std::memset(k, 1, static_cast<size_t>(len));
                return;
            case Sparsifier::Magnitude:
            case Sparsifier::MagnitudeOutliers: {
                const Cut& c = cuts_[i];
                if (c.all) { std::memset(k, 1, static_cast<size_t>(len)); return; }
                if (c.none) { std::memset(k, 0, static_cast<size_t>(len)); return; }
                loops_.cut_keep(x, start, c.lo_v, c.lo_emin, c.lo_emax, c.hi_v, c.hi_emin, c.hi_emax, k, len);
                return;
            }
            case Sparsifier::Random: {
                if (random_stored_) return mask_bits(i, start, len, k);
                const uint64_t t = thr_[i];
                if (t >= 0x100000000ull) { std::memset(k, 1, static_cast<size_t>(len)); return; }
                uint32_t* dr = s.draws.data();
                fill_draws(a_.stream[i], start, len, dr);
                loops_.draws_below(dr, static_cast<uint32_t>(t), k, len);
                return;
            }
            case Sparsifier::Della:
                return mask_bits(i, start, len, k);
        }
    }

    void mask_bits(int i, int64_t start, int64_t len, uint8_t* k) const {
        const uint8_t* m = mask_.get() + start * mbytes_ + (i >> 3);
        const int sh = i & 7;
        if (mbytes_ == 1) {  // K <= 8: contiguous bytes, so the loop vectorizes
            for (int64_t j = 0; j < len; ++j) k[j] = (m[j] >> sh) & 1u;
            return;
        }
        for (int64_t j = 0; j < len; ++j) k[j] = (m[j * mbytes_] >> sh) & 1u;
    }

    // ---- rescale: L1 norm matching -------------------------------------------------
    void l1_factors() {
        std::vector<double> tot(static_cast<size_t>(nblocks_) * K_, 0.0), kept(tot.size(), 0.0);
        // DARE: keep the drawn masks (ceil(K/8) bytes per element) so the merge pass
        // reads them instead of drawing again (Philox is most of DARE's cost).
        const bool store = a_.sparsifier == Sparsifier::Random;
        if (store) alloc_mask();
        // DARE (drawing its masks) or DELLA (reading them) with K <= 8 and one dtype (bf16 or
        // f32): one sweep per model and block from the input bytes where the SIMD level has
        // it (loops_.l1_block)
        const bool della = a_.sparsifier == Sparsifier::Della;
        bool one_sweep = (store || della) && mbytes_ == 1 && a_.base;
        for (const lfm_tensor* m : a_.models) one_sweep = one_sweep && m->dtype == a_.base->dtype;
        if (one_sweep) {  // does this level have the sweep for this dtype? (a zero-length call
            // touches nothing else) Asked once here, so a level without it does not draw
            // model 0's Philox words in every block only to draw them again below.
            double t0 = 0.0, k0 = 0.0;
            uint32_t bad0 = 0;
            one_sweep = loops_.l1_block(nullptr, nullptr, a_.base->dtype, nullptr, 0, nullptr, 1, della, &t0, &k0,
                                        &bad0, 0);
        }
        parallel_for_runs(nblocks_, a_.n_threads, [&](int64_t blk, int slot) {
            Scratch& s = scratch(slot);
            const int64_t start = blk * kBlock, len = block_len(blk);
            if (store) std::memset(mask_.get() + start * mbytes_, 0, static_cast<size_t>(len * mbytes_));
            if (one_sweep) {
                uint32_t bad = 0;
                for (int i = 0; i < K_; ++i) {
                    const uint64_t t = thr_[i];
                    uint32_t* dr = nullptr;
                    if (!della && t < 0x100000000ull) {
                        dr = s.draws.data();
                        fill_draws(a_.stream[i], start, len, dr);
                    }
                    loops_.l1_block(ptr(a_.models[i], start), ptr(a_.base, start), a_.base->dtype, dr,
                                    static_cast<uint32_t>(t), mask_.get() + start, static_cast<uint8_t>(1u << i), della,
                                    &tot[blk * K_ + i], &kept[blk * K_ + i], &bad, len);
                }
                if (bad) nonfinite(start, len);
                return;
            }
            load(s, start, len);
            for (int i = 0; i < K_; ++i) {
                const float* x = s.x.data() + static_cast<int64_t>(i) * kBlock;
                keep_flags(i, start, len, x, s);
                if (store)
                    loops_.or_bit(s.keep.data(), static_cast<uint8_t>(1u << (i & 7)),
                                  mask_.get() + start * mbytes_ + (i >> 3), mbytes_, len);
                double t = 0.0, k = 0.0;
                loops_.l1_sums(x, s.keep.data(), len, &t, &k);
                tot[blk * K_ + i] = t;
                kept[blk * K_ + i] = k;
            }
        });
        if (store) random_stored_ = true;
        for (int i = 0; i < K_; ++i) {
            double t = 0.0, k = 0.0;
            for (int64_t blk = 0; blk < nblocks_; ++blk) {
                t += tot[blk * K_ + i];
                k += kept[blk * K_ + i];
            }
            factor_[i] = l1_factor(t, k);
        }
    }

    // ---- the merge pass ------------------------------------------------------------
    void merge_pass() {
        // t_i = w_i * factor_i * delta_i where kept, in float32 (one rounding of the
        // coefficient, one of the product). The elected sign comes from the float64 sum of
        // kept w_i * (delta_i * factor_i), the reference's own operations, so it always
        // equals the reference's.
        const Coefficients cf = merge_coefficients(a_, factor_);
        const std::vector<float>& coef = cf.coef;
        const std::vector<float>& ecoef = cf.ecoef;
        const float inv_plain_div = cf.inv_plain_div;
        const float lam = static_cast<float>(a_.lambda);
        const bool sparse = a_.sparsifier != Sparsifier::None;
        const bool unw = a_.consensus_unweighted;
        // Divisor of each agreement pattern (K <= 8): cf.inv_div (merge_plan.h).
        const bool table = cf.table;
        const std::vector<float>& inv_div = cf.inv_div;
        const bool fused = table && !unw;
        if (fused && !sparse) ones_.assign(kBlock, 1);
        // One sweep straight from the input bytes when the dtypes allow (merge_direct).
        const bool direct = direct_ok(fused);
        DirectBlock proto;
        if (direct) {
            proto.K = K_;
            proto.dtype = a_.out->dtype;
            proto.consensus = a_.consensus;
            proto.coef = coef.data();
            proto.w = a_.w.data();
            proto.f = factor_.data();
            proto.table = inv_div.data();
            proto.inv_plain_div = inv_plain_div;
            proto.normalize = a_.normalize;
            proto.lam = lam;
        }
        parallel_for_runs(nblocks_, a_.n_threads, [&](int64_t blk, int slot) {
            Scratch& s = scratch(slot);
            const int64_t start = blk * kBlock, len = block_len(blk);
            if (direct) return direct_block(proto, s, start, len);
            load(s, start, len);
            float* mixed = s.mixed.data();
            std::fill(mixed, mixed + len, 0.0f);
            auto X = [&](int i) { return s.x.data() + static_cast<int64_t>(i) * kBlock; };
            auto T = [&](int i) { return s.t.data() + static_cast<int64_t>(i) * kBlock; };
            auto KP = [&](int i) { return s.keepk.data() + static_cast<int64_t>(i) * kBlock; };
            auto E = [&](int i) { return s.e.data() + static_cast<int64_t>(i) * kBlock; };
            if (fused) {
                // TIES family, K <= 8, weighted election: one register-level sweep per block
                // (loops_.fused_ties), the elected sign summed in float64 on the way.
                const float* xp[8];
                const uint8_t* kp[8];
                for (int i = 0; i < K_; ++i) {
                    xp[i] = X(i);
                    if (sparse) {
                        keep_flags(i, start, len, X(i), s, KP(i));
                        kp[i] = KP(i);
                    } else {
                        kp[i] = ones_.data();
                    }
                }
                float* o = s.o.data();
                loops_.fused_ties(K_, xp, kp, coef.data(), a_.w.data(), factor_.data(), s.b.data(), lam,
                                  inv_div.data(), o, len);
                store_out(o, start, len);
                return;
            }
            if (!a_.consensus) {
                for (int i = 0; i < K_; ++i) {
                    const uint8_t* k = nullptr;
                    if (sparse) {
                        keep_flags(i, start, len, X(i), s);
                        k = s.keep.data();
                    }
                    loops_.weigh_add(X(i), k, coef[i], mixed, len);
                }
                if (a_.normalize) loops_.scale(mixed, inv_plain_div, len);
            } else {
                // the elected sign from the float64 sum of kept (w_i) (delta_i * f_i), the
                // reference's operations, as in the fused sweep
                double* S = s.s64.data();
                std::fill(S, S + len, 0.0);
                for (int i = 0; i < K_; ++i) {
                    const uint8_t* k = nullptr;
                    if (sparse) {
                        keep_flags(i, start, len, X(i), s, KP(i));
                        k = KP(i);
                    }
                    loops_.weigh(X(i), k, coef[i], T(i), len);
                    // the election value e_i: t_i itself (weighted) or factor_i * delta'_i
                    if (unw) loops_.weigh(X(i), k, ecoef[i], E(i), len);
                    loops_.elect_add64(X(i), k, unw ? 1.0 : a_.w[i], factor_[i], S, len);
                }
                float* sgn = s.sgn.data();
                loops_.sign_of(S, sgn, len);
                if (table) {
                    float* bits = s.bits.data();
                    std::fill(bits, bits + len, 0.0f);
                    for (int i = 0; i < K_; ++i)
                        loops_.agree_add_bits(unw ? E(i) : T(i), T(i), sgn, static_cast<float>(1u << i), mixed,
                                              bits, len);
                    loops_.scale_by_table(mixed, bits, inv_div.data(), len);
                } else {
                    double* div = s.div.data();
                    std::fill(div, div + len, 0.0);
                    for (int i = 0; i < K_; ++i)
                        loops_.agree_add_div(unw ? E(i) : T(i), T(i), sgn, cf.dshare[i], mixed,
                                             div, len);
                    if (a_.normalize) loops_.divide_guarded(mixed, div, len);
                }
            }
            float* o = s.o.data();
            loops_.finish(a_.base ? s.b.data() : nullptr, lam, mixed, o, len);
            store_out(o, start, len);
        });
    }

    // merge_direct applies: one dtype (bf16 or f32) for the base, every model and the
    // output, K <= 8, and the weighted table election when there is an election.
    bool direct_ok(bool fused) const {
        const lfm_dtype dt = a_.out->dtype;
        if (K_ > 8 || (a_.consensus && !fused) || (dt != LFM_DTYPE_BF16 && dt != LFM_DTYPE_F32)) return false;
        if (a_.base && a_.base->dtype != dt) return false;
        for (const lfm_tensor* m : a_.models)
            if (m->dtype != dt) return false;
        return true;
    }

    void direct_block(const DirectBlock& proto, Scratch& s, int64_t start, int64_t len) {
        DirectBlock d = proto;
        const int64_t esz = static_cast<int64_t>(dtype_size(d.dtype));
        d.base = a_.base ? ptr(a_.base, start) : nullptr;
        d.out = static_cast<char*>(a_.out->data) + start * esz;
        const bool cut = a_.sparsifier == Sparsifier::None || a_.sparsifier == Sparsifier::Magnitude ||
                         a_.sparsifier == Sparsifier::MagnitudeOutliers;
        // flat index bounds made block-local and clamped to [-1, len] (as cut_keep does)
        auto local = [&](int64_t e) { return static_cast<int32_t>(std::min<int64_t>(std::max<int64_t>(e - start, -1), len)); };
        // The keep rule this block needs (DirectBlock::KeepRule): every model kept whole ->
        // kKeepAll; every boundary value's index range covering the whole block or none of
        // it -> kKeepRange, the bound made inclusive or exclusive for the block (the values
        // are integers: v > lo is v >= lo + 1); otherwise (the block holding a boundary's
        // first or last index) the full cut.
        bool every_all = true, range = true;
        uint32_t rlo[8], rhi[8];
        const int32_t last = static_cast<int32_t>(len) - 1;
        auto whole = [&](int32_t j0, int32_t j1) { return j0 <= 0 && j1 >= last; };
        auto empty = [&](int32_t j0, int32_t j1) { return j1 < 0 || j0 > last || j0 > j1; };
        for (int i = 0; i < K_; ++i) {
            d.x[i] = ptr(a_.models[i], start);
            if (!cut) {
                uint8_t* k = s.keepk.data() + static_cast<int64_t>(i) * kBlock;
                keep_flags(i, start, len, nullptr, s, k);
                d.keep[i] = k;
                continue;
            }
            const Cut& c = cuts_[i];
            const bool all = a_.sparsifier == Sparsifier::None || c.all;
            d.lo_v[i] = all ? 0u : c.none ? 1u : c.lo_v;
            d.hi_v[i] = all ? 0xffffffffu : c.none ? 0u : c.hi_v;
            d.lo_j0[i] = all ? -1 : local(c.lo_emin);
            d.lo_j1[i] = all ? static_cast<int32_t>(len) : local(c.lo_emax);
            d.hi_j0[i] = all ? -1 : local(c.hi_emin);
            d.hi_j1[i] = all ? static_cast<int32_t>(len) : local(c.hi_emax);
            every_all = every_all && all;
            rlo[i] = d.lo_v[i];
            rhi[i] = d.hi_v[i];
            if (all || c.none) continue;  // already a plain range
            const bool lo_in = whole(d.lo_j0[i], d.lo_j1[i]), hi_in = whole(d.hi_j0[i], d.hi_j1[i]);
            if (!(lo_in || empty(d.lo_j0[i], d.lo_j1[i])) || !(hi_in || empty(d.hi_j0[i], d.hi_j1[i]))) {
                range = false;
                continue;
            }
            const bool none = (!lo_in && rlo[i] == 0xffffffffu) || (!hi_in && rhi[i] == 0u);
            rlo[i] = none ? 1u : lo_in ? rlo[i] : rlo[i] + 1u;
            rhi[i] = none ? 0u : hi_in ? rhi[i] : rhi[i] - 1u;
        }
        if (!cut) {
            d.keep_rule = DirectBlock::kKeepBytes;
        } else if (every_all) {
            d.keep_rule = DirectBlock::kKeepAll;
        } else if (range) {
            d.keep_rule = DirectBlock::kKeepRange;
            std::copy(rlo, rlo + K_, d.lo_v);
            std::copy(rhi, rhi + K_, d.hi_v);
        }
        const int64_t r = loops_.merge_direct(d, len);
        if (r < 0) nonfinite(start, len);
        if (r > 0) nonfinite_out_.fetch_add(r, std::memory_order_relaxed);
    }

    // Store a float32 output block in the output dtype and count the NaN/Inf written
    // (lfm_merge_options.n_nonfinite_out).
    void store_out(const float* o, int64_t start, int64_t len) {
        char* dst = static_cast<char*>(a_.out->data) + start * static_cast<int64_t>(dtype_size(a_.out->dtype));
        store_f32(o, a_.out->dtype, dst, len);
        if (!a_.n_nonfinite_out) return;
        const lfm_dtype dt = a_.out->dtype;  // f32, bf16 or f16 (merge_args.cpp)
        const int64_t c = dt == LFM_DTYPE_F32    ? count_nonfinite(dst, 0x7f800000u, 4, len)
                          : dt == LFM_DTYPE_BF16 ? count_nonfinite(dst, 0x7f80u, 2, len)
                                                 : count_nonfinite(dst, 0x7c00u, 2, len);
        if (c) nonfinite_out_.fetch_add(c, std::memory_order_relaxed);
    }

    // elements of `esize` bytes whose exponent field (mask `e`) is all ones
    static int64_t count_nonfinite(const char* p, uint32_t e, int esize, int64_t len) {
        int64_t c = 0;
        if (esize == 4) {
            for (int64_t j = 0; j < len; ++j) {
                uint32_t u;
                std::memcpy(&u, p + 4 * j, 4);
                c += (u & e) == e;
            }
        } else {
            for (int64_t j = 0; j < len; ++j) {
                uint16_t u;
                std::memcpy(&u, p + 2 * j, 2);
                c += (u & e) == e;
            }
        }
        return c;
    }

    const MergeArgs& a_;
    const int K_;
    const int64_t n_;
    int64_t nblocks_ = 0;
    std::vector<Cut> cuts_;
    std::vector<double> factor_;
    std::vector<uint64_t> thr_;
    std::unique_ptr<uint8_t[]> mask_;  // bit i of byte e * mbytes_ + i / 8: model i keeps e
    int64_t mbytes_ = 0;
    bool random_stored_ = false;  // DARE masks kept in mask_ by l1_factors
    std::atomic<int64_t> nonfinite_out_{0};  // NaN/Inf written to the output
    std::vector<uint8_t> ones_;   // keep flags of an unsparsified model in the fused pass
    const LoopTable& loops_ = merge_loops();  // the active SIMD level's loops
    std::vector<std::unique_ptr<Scratch>> scratch_ =
        std::vector<std::unique_ptr<Scratch>>(static_cast<size_t>(std::max({1, get_num_threads(), a_.n_threads})));
};

}  // namespace

void merge_cpu(const MergeArgs& a) {
    for (const lfm_tensor* m : a.models) check_device(*m, LFM_DEVICE_CPU, "model");
    CpuMerge(a).run();
}

}  // namespace lfm::merge
