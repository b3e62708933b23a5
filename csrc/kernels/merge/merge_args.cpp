// Validation and defaults for lfm_merge: the one place the C ABI checks merge inputs.
#include <cmath>
#include <cstring>

#include "core/philox.h"
#include "core/status.h"
#include "core/tensor.h"
#include "core/thread_pool.h"
#include "kernels/merge/merge.h"

namespace lfm::merge {

Sparsifier method_sparsifier(lfm_merge_method m) {
    switch (m) {
        case LFM_MERGE_TIES: return Sparsifier::Magnitude;
        case LFM_MERGE_DARE_LINEAR: case LFM_MERGE_DARE_TIES: return Sparsifier::Random;
        case LFM_MERGE_BREADCRUMBS: case LFM_MERGE_BREADCRUMBS_TIES: return Sparsifier::MagnitudeOutliers;
        case LFM_MERGE_DELLA_LINEAR: case LFM_MERGE_DELLA: return Sparsifier::Della;
        default: return Sparsifier::None;
    }
}

bool method_consensus(lfm_merge_method m) {
    return m == LFM_MERGE_TIES || m == LFM_MERGE_DARE_TIES || m == LFM_MERGE_BREADCRUMBS_TIES ||
           m == LFM_MERGE_DELLA;
}

bool method_normalize_default(lfm_merge_method m) {
    return m == LFM_MERGE_TIES || m == LFM_MERGE_DELLA || m == LFM_MERGE_LINEAR;
}

bool method_rescale_default(lfm_merge_method m) {
    return m == LFM_MERGE_DARE_LINEAR || m == LFM_MERGE_DARE_TIES || m == LFM_MERGE_DELLA_LINEAR ||
           m == LFM_MERGE_DELLA;
}

const char* method_name(lfm_merge_method m) {
    switch (m) {
        case LFM_MERGE_TASK_ARITHMETIC: return "task_arithmetic";
        case LFM_MERGE_TIES: return "ties";
        case LFM_MERGE_DARE_LINEAR: return "dare_linear";
        case LFM_MERGE_DARE_TIES: return "dare_ties";
        case LFM_MERGE_BREADCRUMBS: return "breadcrumbs";
        case LFM_MERGE_BREADCRUMBS_TIES: return "breadcrumbs_ties";
        case LFM_MERGE_DELLA_LINEAR: return "della_linear";
        case LFM_MERGE_DELLA: return "della";
        case LFM_MERGE_LINEAR: return "linear";
    }
    return "unknown";
}

namespace {

std::vector<double> per_model(const double* v, int K, double dflt, const char* pname) {
    std::vector<double> out(static_cast<size_t>(K), dflt);
    if (v)
        for (int i = 0; i < K; ++i) {
            if (!std::isfinite(v[i])) fail(LFM_STATUS_INVALID_ARGUMENT, pname, " of model ", i, " is not finite");
            out[static_cast<size_t>(i)] = v[i];
        }
    return out;
}

}  // namespace

MergeArgs resolve_merge_args(const lfm_tensor* base, const lfm_tensor* models, const lfm_tensor* out,
                             const lfm_merge_options* opts) {
    if (!opts) fail(LFM_STATUS_INVALID_ARGUMENT, "options are NULL (call lfm_merge_options_init)");
    if (opts->struct_size < sizeof(lfm_merge_options))
        fail(LFM_STATUS_INVALID_ARGUMENT, "options.struct_size is ", opts->struct_size, ", expected ",
             sizeof(lfm_merge_options), " (initialise with lfm_merge_options_init)");
    MergeArgs a;
    a.method = opts->method;
    if (static_cast<int>(a.method) < 0 || static_cast<int>(a.method) > LFM_MERGE_LINEAR)
        fail(LFM_STATUS_INVALID_ARGUMENT, "unknown merge method code ", static_cast<int>(a.method));
    a.sparsifier = method_sparsifier(a.method);
    a.consensus = method_consensus(a.method);
    a.normalize = opts->normalize < 0 ? method_normalize_default(a.method) : opts->normalize != 0;
    if (opts->rescale < 0)
        a.rescale = method_rescale_default(a.method) ? LFM_RESCALE_L1 : LFM_RESCALE_NONE;
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
    check_n_threads(a.n_threads);

    a.K = opts->n_models;
    if (a.K < 1) fail(LFM_STATUS_INVALID_ARGUMENT, "no models to merge (n_models = ", a.K, ")");
    if (a.K > LFM_MERGE_MAX_MODELS)
        fail(LFM_STATUS_INVALID_ARGUMENT, "too many models: ", a.K, " (at most ", LFM_MERGE_MAX_MODELS, ")");
    if (!models) fail(LFM_STATUS_INVALID_ARGUMENT, "models is NULL");

    a.w = per_model(opts->weights, a.K, 1.0, "weight");
    a.d = per_model(opts->densities, a.K, 1.0, "density");
    a.gamma = per_model(opts->gammas, a.K, 0.01, "gamma");
    a.eps = per_model(opts->epsilons, a.K, 0.15, "epsilon");
    for (int i = 0; i < a.K; ++i) {
        double d = a.d[i];
        if (!(d >= 0.0 && d <= 1.0))
            fail(LFM_STATUS_INVALID_ARGUMENT, "density of model ", i, " must lie in [0, 1], got ", d);
        if (a.sparsifier == Sparsifier::MagnitudeOutliers && !(a.gamma[i] >= 0.0 && a.gamma[i] <= 1.0))
            fail(LFM_STATUS_INVALID_ARGUMENT, "gamma of model ", i, " must lie in [0, 1], got ", a.gamma[i]);
        if (a.sparsifier == Sparsifier::Della) {
            double lo = d - a.eps[i], hi = d + a.eps[i];
            if (a.eps[i] < 0.0 || !(lo > 0.0 && lo < 1.0 && hi > 0.0 && hi < 1.0))
                fail(LFM_STATUS_INVALID_ARGUMENT, "invalid della epsilon for model ", i, ": density - epsilon = ", lo,
                     " and density + epsilon = ", hi, " must both lie in (0, 1)");
        }
    }
    a.stream.resize(static_cast<size_t>(a.K));
    for (int i = 0; i < a.K; ++i) {
        int32_t pos = opts->model_positions ? opts->model_positions[i] : i;
        if (pos < 0 || pos > 255)
            fail(LFM_STATUS_INVALID_ARGUMENT, "model position of model ", i, " must lie in [0, 255], got ", pos);
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
    } else if (a.method != LFM_MERGE_LINEAR) {
        fail(LFM_STATUS_INVALID_ARGUMENT, "base is NULL; only the linear method merges without a base");
    }
    if (a.method == LFM_MERGE_LINEAR) base = nullptr;  // linear never reads the base
    a.base = base;
    a.out = out;
    a.models.resize(static_cast<size_t>(a.K));
    for (int i = 0; i < a.K; ++i) {
        const lfm_tensor* m = &models[i];
        std::string what = cat("model ", i);
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
