// Validation and defaults for lfm_merge: the one place the C ABI checks merge inputs,
// against the method table generated from lfm_engine/core/merge_registry.py.
#include <cmath>
#include <cstddef>
#include <cstring>

#include "core/philox.h"
#include "core/status.h"
#include "core/tensor.h"
#include "core/thread_pool.h"
#include "kernels/merge/merge.h"
#include "kernels/merge/merge_methods_table.h"

namespace lfm::merge {

// The method table is generated from the Python registry (merge_methods_table.h).
const MethodRow& method_row(lfm_merge_method m) {
    const int c = static_cast<int>(m);
    if (c < 0 || c >= kMethodCount) fail(LFM_STATUS_INVALID_ARGUMENT, "unknown merge method code ", c);
    return kMethodTable[c];
}

Sparsifier method_sparsifier(lfm_merge_method m) { return method_row(m).sparsifier; }
bool method_consensus(lfm_merge_method m) { return method_row(m).consensus; }
bool method_normalize_default(lfm_merge_method m) { return method_row(m).normalize_default; }
bool method_rescale_default(lfm_merge_method m) { return method_row(m).rescale_default; }

const char* method_name(lfm_merge_method m) {
    const int c = static_cast<int>(m);
    return c >= 0 && c < kMethodCount ? kMethodTable[c].name : "unknown";
}

std::string MergeArgs::model_label(int i) const {
    if (i >= 0 && static_cast<size_t>(i) < model_names.size()) return "model " + model_names[static_cast<size_t>(i)];
    return cat("model ", i);
}

namespace {

// The message wording matches lfm_engine/core/merge_methods.py's.
std::vector<double> per_model(const MergeArgs& a, const double* v, double dflt, const char* pname) {
    std::vector<double> out(static_cast<size_t>(a.K), dflt);
    if (v)
        for (int i = 0; i < a.K; ++i) {
            if (!std::isfinite(v[i]))
                fail(LFM_STATUS_INVALID_ARGUMENT, "parameter '", pname, "' of ", a.model_label(i), " is not finite (",
                     v[i], ")");
            out[static_cast<size_t>(i)] = v[i];
        }
    return out;
}

void check_range(const MergeArgs& a, const std::vector<double>& v, double lo, double hi, const char* pname) {
    for (int i = 0; i < a.K; ++i)
        if (!(v[i] >= lo && v[i] <= hi))
            fail(LFM_STATUS_INVALID_ARGUMENT, "parameter '", pname, "' of ", a.model_label(i), " must lie in [", lo,
                 ", ", hi, "], got ", v[i]);
}

// Bytes of lfm_merge_options a caller of ABI version 1 (before model_names) passes.
constexpr size_t kOptionsV1Size = offsetof(lfm_merge_options, model_names);

}  // namespace

MergeArgs resolve_merge_args(const lfm_tensor* base, const lfm_tensor* models, const lfm_tensor* out,
                             const lfm_merge_options* opts) {
    if (!opts) fail(LFM_STATUS_INVALID_ARGUMENT, "options are NULL (call lfm_merge_options_init)");
    // a caller built against an older, shorter struct is accepted (the fields it lacks
    // take their defaults); anything shorter than the first version is refused
    if (opts->struct_size < kOptionsV1Size)
        fail(LFM_STATUS_INVALID_ARGUMENT, "options.struct_size is ", opts->struct_size, ", expected ",
             sizeof(lfm_merge_options), " (initialise with lfm_merge_options_init)");
    const bool has_names = opts->struct_size >= offsetof(lfm_merge_options, model_names) + sizeof(opts->model_names);
    const bool has_count =
        opts->struct_size >= offsetof(lfm_merge_options, n_nonfinite_out) + sizeof(opts->n_nonfinite_out);
    MergeArgs a;
    a.method = opts->method;
    const MethodRow& row = method_row(a.method);
    a.sparsifier = row.sparsifier;
    a.consensus = row.consensus;
    a.normalize = opts->normalize < 0 ? row.normalize_default : opts->normalize != 0;
    if (opts->rescale < 0)
        a.rescale = row.rescale_default ? LFM_RESCALE_L1 : LFM_RESCALE_NONE;
    else if (opts->rescale <= LFM_RESCALE_INVERSE_DENSITY)
        a.rescale = static_cast<lfm_rescale>(opts->rescale);
    else
        fail(LFM_STATUS_INVALID_ARGUMENT, "unknown rescale code ", opts->rescale);
    a.consensus_unweighted = opts->consensus_unweighted != 0;
    a.disjoint_count = opts->disjoint_count != 0;
    a.lambda = opts->lambda;
    if (!std::isfinite(a.lambda)) fail(LFM_STATUS_INVALID_ARGUMENT, "lambda is not finite");
    a.seed = opts->seed;
    a.name = opts->tensor_name ? opts->tensor_name : "";
    a.n_threads = opts->n_threads;
    a.n_nonfinite_out = has_count ? opts->n_nonfinite_out : nullptr;
    check_n_threads(a.n_threads);

    a.K = opts->n_models;
    if (a.K < 1) fail(LFM_STATUS_INVALID_ARGUMENT, "no models to merge (n_models = ", a.K, ")");
    if (a.K > LFM_MERGE_MAX_MODELS)
        fail(LFM_STATUS_INVALID_ARGUMENT, "too many models: ", a.K, " (at most ", LFM_MERGE_MAX_MODELS, ")");
    if (!models) fail(LFM_STATUS_INVALID_ARGUMENT, "models is NULL");
    if (has_names && opts->model_names)
        for (int i = 0; i < a.K; ++i)
            a.model_names.emplace_back(opts->model_names[i] ? opts->model_names[i] : cat(i));

    a.w = per_model(a, opts->weights, kDefaultWeight, "weight");
    a.d = per_model(a, opts->densities, kDefaultDensity, "density");
    a.gamma = per_model(a, opts->gammas, kDefaultGamma, "gamma");
    a.eps = per_model(a, opts->epsilons, kDefaultEpsilon, "epsilon");
    check_range(a, a.d, kDensityMin, kDensityMax, "density");
    if (row.checks_gamma) check_range(a, a.gamma, kGammaMin, kGammaMax, "gamma");
    if (row.checks_epsilon)
        for (int i = 0; i < a.K; ++i) {
            const double d = a.d[i], lo = d - a.eps[i], hi = d + a.eps[i];
            if (!(a.eps[i] >= kEpsilonMin))
                fail(LFM_STATUS_INVALID_ARGUMENT, "parameter 'epsilon' of ", a.model_label(i), " must be >= ",
                     kEpsilonMin, ", got ", a.eps[i]);
            if (!(lo > 0.0 && lo < 1.0 && hi > 0.0 && hi < 1.0))
                fail(LFM_STATUS_INVALID_ARGUMENT, "invalid della epsilon for ", a.model_label(i),
                     ": density - epsilon = ", lo, " and density + epsilon = ", hi, " must both lie in (0, 1)");
        }
    a.stream.resize(static_cast<size_t>(a.K));
    for (int i = 0; i < a.K; ++i) {
        int32_t pos = opts->model_positions ? opts->model_positions[i] : i;
        if (pos < 0 || pos > 255)
            fail(LFM_STATUS_INVALID_ARGUMENT, "model position of ", a.model_label(i), " must lie in [0, 255], got ", pos);
        a.stream[i] = merge_stream_id(a.name.data(), a.name.size(), static_cast<uint32_t>(pos));
    }

    // views
    check_view(out, "out");
    check_float(*out, "out");
    check_contiguous(*out, "out");
    if (base) {
        check_view(base, "base");
        check_float(*base, "base");
        check_contiguous(*base, "base");
        check_same_shape(*out, *base, "out", "base");
        check_device(*base, out->device, "base");
    } else if (row.uses_base) {
        fail(LFM_STATUS_INVALID_ARGUMENT, "base is NULL; only the linear method merges without a base");
    }
    if (!row.uses_base) base = nullptr;  // linear never reads the base
    a.base = base;
    a.out = out;
    a.models.resize(static_cast<size_t>(a.K));
    for (int i = 0; i < a.K; ++i) {
        const lfm_tensor* m = &models[i];
        std::string what = a.model_label(i);
        check_view(m, what.c_str());
        check_float(*m, what);
        check_contiguous(*m, what);
        check_same_shape(*out, *m, "out", what);
        check_device(*m, out->device, what);
        if (m->device == LFM_DEVICE_CUDA && m->device_id != out->device_id)
            fail(LFM_STATUS_INVALID_ARGUMENT, what, " is on cuda:", m->device_id, " but out is on cuda:",
                 out->device_id);
        a.models[i] = m;
    }
    a.n = numel(*out);
    if (a.n >= (int64_t(1) << 40)) fail(LFM_STATUS_INVALID_ARGUMENT, "tensor too large (", a.n, " elements)");
    if (out->ndim >= 2 && out->shape[0] > 0) {
        a.rows = out->shape[0];
        a.cols = a.n / a.rows;
    } else {
        a.rows = 1;
        a.cols = a.n;
    }
    return a;
}

}  // namespace lfm::merge
