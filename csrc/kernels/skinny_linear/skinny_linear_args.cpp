// Validation of lfm_skinny_linear: the one place its inputs are checked.
#include "core/status.h"
#include "core/tensor.h"
#include "core/thread_pool.h"
#include "kernels/skinny_linear/skinny_linear.h"

namespace lfm::skinny {
namespace {

void check_cpu(const lfm_tensor& t, const char* what) {
    if (t.device != LFM_DEVICE_CPU)
        fail(LFM_STATUS_INVALID_ARGUMENT, what, " is a CUDA view; lfm_skinny_linear runs on the CPU only "
             "(on a GPU use the vendor GEMM, e.g. torch.nn.functional.linear)");
}

// 2-D float matrix with unit column stride; returns the row stride.
int64_t check_rows(const lfm_tensor* t, const char* what) {
    check_view(t, what);
    check_float(*t, what);
    check_cpu(*t, what);
    check_ndim(*t, 2, what);
    if (t->shape[1] > 1 && t->strides[1] != 1)
        fail(LFM_STATUS_INVALID_ARGUMENT, what, " needs unit stride along its last dimension, got stride ",
             t->strides[1], " (pass a contiguous copy)");
    if (t->shape[0] > 1 && t->strides[0] < t->shape[1])
        fail(LFM_STATUS_INVALID_ARGUMENT, what, " has row stride ", t->strides[0], " < its ", t->shape[1],
             " columns (overlapping rows)");
    return t->shape[0] > 1 ? t->strides[0] : t->shape[1];
}

}  // namespace

Args resolve_args(const lfm_tensor* x, const lfm_tensor* w, const lfm_tensor* bias, const lfm_tensor* y,
                  const lfm_skinny_linear_options* opts) {
    Args a;
    if (opts) {
        if (opts->struct_size < sizeof(lfm_skinny_linear_options))
            fail(LFM_STATUS_INVALID_ARGUMENT, "options.struct_size is ", opts->struct_size, ", expected ",
                 sizeof(lfm_skinny_linear_options), " (initialise with lfm_skinny_linear_options_init)");
        a.n_threads = opts->n_threads;
        check_n_threads(a.n_threads);
    }
    a.x_ld = check_rows(x, "x");
    a.M = x->shape[0];
    a.K = x->shape[1];
    if (a.M > kMaxM)
        fail(LFM_STATUS_INVALID_ARGUMENT, "x has M = ", a.M, " rows; the skinny kernel takes at most ", kMaxM,
             " (use a GEMM for larger batches)");
    check_view(w, "weight");
    check_float(*w, "weight");
    check_cpu(*w, "weight");
    check_ndim(*w, 2, "weight");
    if (numel(*w) > 0) check_contiguous(*w, "weight");
    a.N = w->shape[0];
    if (w->shape[1] != a.K)
        fail(LFM_STATUS_SHAPE_MISMATCH, "weight has shape ", shape_str(*w), " ([N, K]) but x has K = ", a.K,
             " columns");
    if (bias) {
        check_view(bias, "bias");
        check_float(*bias, "bias");
        check_cpu(*bias, "bias");
        check_ndim(*bias, 1, "bias");
        if (bias->shape[0] != a.N)
            fail(LFM_STATUS_SHAPE_MISMATCH, "bias has shape ", shape_str(*bias), " but weight has N = ", a.N,
                 " rows");
        if (numel(*bias) > 0) check_contiguous(*bias, "bias");
        a.bias = bias->data;
        a.b_dt = bias->dtype;
    }
    a.y_ld = check_rows(y, "y");
    if (y->shape[0] != a.M || y->shape[1] != a.N)
        fail(LFM_STATUS_SHAPE_MISMATCH, "y has shape ", shape_str(*y), ", expected [M, N] = [", a.M, ", ", a.N,
             "]");
    a.x = x->data;
    a.x_dt = x->dtype;
    a.w = w->data;
    a.w_dt = w->dtype;
    a.y = y->data;
    a.y_dt = y->dtype;
    return a;
}

}  // namespace lfm::skinny
