// Fused sparsify-and-merge (docs/spec/merge.md): torch-free launchers shared by the C ABI.
//
// MergeArgs is the validated, fully resolved form of lfm_merge_options; the C ABI
// (csrc/capi/merge.cpp) builds it once, so every backend sees the same checks and
// defaults. Shapes: base, models[i], out all hold n elements (flat, contiguous);
// DELLA views the tensor as [rows, cols] = [shape[0], n / shape[0]] (1-D: one row).
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "core/status.h"
#include "lfm/lfm.h"

namespace lfm::merge {

enum class Sparsifier { None, Magnitude, Random, MagnitudeOutliers, Della };

struct MergeArgs {
    lfm_merge_method method = LFM_MERGE_TASK_ARITHMETIC;
    Sparsifier sparsifier = Sparsifier::None;
    bool consensus = false;
    bool normalize = false;
    lfm_rescale rescale = LFM_RESCALE_NONE;
    bool consensus_unweighted = false;
    bool disjoint_count = false;
    double lambda = 1.0;
    uint64_t seed = 0;
    std::string name;
    int n_threads = 0;

    int K = 0;                       // number of models
    int64_t n = 0;                   // elements per tensor
    int64_t rows = 1, cols = 0;      // DELLA row view
    std::vector<double> w, d, gamma, eps;
    std::vector<uint32_t> stream;    // Philox stream id per model
    std::vector<std::string> model_names;  // empty: messages say "model <i>"

    std::string model_label(int i) const;  // "model <name>" or "model <i>", for messages

    const lfm_tensor* base = nullptr;  // nullptr only for linear
    std::vector<const lfm_tensor*> models;
    const lfm_tensor* out = nullptr;
    int64_t* n_nonfinite_out = nullptr;  // lfm_merge_options.n_nonfinite_out (NULL: not wanted)
};

// Method table (merge_methods_table.h, generated from lfm_engine/core/merge_registry.py).
Sparsifier method_sparsifier(lfm_merge_method m);
bool method_consensus(lfm_merge_method m);
bool method_normalize_default(lfm_merge_method m);
bool method_rescale_default(lfm_merge_method m);
const char* method_name(lfm_merge_method m);

// Validate the views and options (throws lfm::Error naming the problem).
MergeArgs resolve_merge_args(const lfm_tensor* base, const lfm_tensor* models, const lfm_tensor* out,
                             const lfm_merge_options* opts);

void merge_cpu(const MergeArgs& a);
#ifdef LFM_HAVE_CUDA
void merge_cuda(const MergeArgs& a, void* stream);
#else
[[noreturn]] inline void merge_cuda(const MergeArgs&, void*) { fail_no_cuda("merge"); }
#endif

}  // namespace lfm::merge
