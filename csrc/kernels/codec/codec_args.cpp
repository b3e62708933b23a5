// Validation of the codec C ABI arguments (once, here, for every backend).
#include <cmath>
#include <cstring>

#include "core/tensor.h"
#include "core/thread_pool.h"
#include "kernels/codec/codec.h"

namespace lfm::codec {

void matrix_view(const lfm_tensor& t, int64_t* rows, int64_t* cols) {
    if (t.ndim == 0) {
        *rows = 1;
        *cols = 1;
    } else if (t.ndim == 1) {
        *rows = 1;
        *cols = t.shape[0];
    } else {
        *rows = t.shape[0];
        int64_t c = 1;
        for (int i = 1; i < t.ndim; ++i) c *= t.shape[i];
        *cols = c;
    }
}

namespace {

const char* codec_name(lfm_codec c) {
    switch (c) {
        case LFM_CODEC_SIGN1: return "sign1";
        case LFM_CODEC_INT8: return "int8";
        case LFM_CODEC_INT4: return "int4";
        case LFM_CODEC_INT2: return "int2";
        case LFM_CODEC_NF4: return "nf4";
    }
    return "?";
}

void read_options(const lfm_codec_options* opts, lfm_codec* codec, int64_t* group, bool* per_tensor, float* alpha,
                  int* n_threads) {
    if (!opts) fail(LFM_STATUS_INVALID_ARGUMENT, "options are NULL (use lfm_codec_options_init)");
    if (opts->struct_size < sizeof(lfm_codec_options))
        fail(LFM_STATUS_INVALID_ARGUMENT, "options.struct_size is ", opts->struct_size, ", expected >= ",
             sizeof(lfm_codec_options), " (initialise with lfm_codec_options_init)");
    int c = static_cast<int>(opts->codec);
    if (c < 0 || c > 4) fail(LFM_STATUS_INVALID_ARGUMENT, "unknown codec code ", c);
    *codec = opts->codec;
    *group = opts->group_size;
    if (*codec != LFM_CODEC_SIGN1 && *group < 1)
        fail(LFM_STATUS_INVALID_ARGUMENT, "group_size must be >= 1, got ", *group);
    *per_tensor = opts->per_tensor != 0;
    if (!std::isfinite(opts->alpha)) fail(LFM_STATUS_INVALID_ARGUMENT, "alpha is not finite");
    *alpha = static_cast<float>(opts->alpha);
    check_n_threads(opts->n_threads);
    *n_threads = opts->n_threads;
}

lfm_dtype data_dtype(lfm_codec c) {
    return c == LFM_CODEC_SIGN1 ? LFM_DTYPE_U32 : c == LFM_CODEC_INT8 ? LFM_DTYPE_I8 : LFM_DTYPE_U8;
}

// data [rows, packed_cols] and scales of the right count/dtype, for a rows x cols delta.
void check_payload(const lfm_tensor* data, const lfm_tensor* scales, lfm_codec codec, int64_t rows, int64_t cols,
                   int64_t group, bool per_tensor, const std::string& what) {
    check_view(data, "data");
    check_view(scales, "scales");
    check_dtype(*data, data_dtype(codec), what + "data");
    check_contiguous(*data, what + "data");
    check_contiguous(*scales, what + "scales");
    if (!is_float_dtype(scales->dtype))
        fail(LFM_STATUS_UNSUPPORTED_DTYPE, what, "scales have dtype ", dtype_name(scales->dtype),
             "; supported: float16, float32, bfloat16");
    const int64_t pc = packed_cols(codec, cols);
    if (numel(*data) != rows * pc)
        fail(LFM_STATUS_SHAPE_MISMATCH, what, "data has shape ", shape_str(*data), " but a ", rows, " x ", cols, " ",
             codec_name(codec), " delta needs ", rows, " x ", pc, " elements of ", dtype_name(data_dtype(codec)));
    int64_t ns;
    if (codec == LFM_CODEC_SIGN1)
        ns = per_tensor ? 1 : rows;
    else
        ns = rows * groups_per_row(cols, group);
    if (numel(*scales) != ns)
        fail(LFM_STATUS_SHAPE_MISMATCH, what, "scales have shape ", shape_str(*scales), " but ", ns,
             " scales are needed (", codec_name(codec), ", ", rows, " x ", cols,
             codec == LFM_CODEC_SIGN1 ? "" : cat(", group ", group), ")");
    if (data->device != scales->device) fail(LFM_STATUS_INVALID_ARGUMENT, what, "data and scales on different devices");
}

}  // namespace

CodecArgs resolve_encode_args(const lfm_tensor* delta, const lfm_tensor* data, const lfm_tensor* scales,
                              const lfm_codec_options* opts) {
    CodecArgs a;
    read_options(opts, &a.codec, &a.group, &a.per_tensor, &a.alpha, &a.n_threads);
    check_view(delta, "delta");
    check_float(*delta, "delta");
    check_contiguous(*delta, "delta");
    check_device(*delta, LFM_DEVICE_CPU, "delta");
    matrix_view(*delta, &a.rows, &a.cols);
    check_payload(data, scales, a.codec, a.rows, a.cols, a.group, a.per_tensor, "");
    check_device(*data, LFM_DEVICE_CPU, "data");
    a.n_groups = a.codec == LFM_CODEC_SIGN1 ? 0 : groups_per_row(a.cols, a.group);
    a.delta = delta;
    a.data = data;
    a.scales = scales;
    return a;
}

CodecArgs resolve_decode_args(const lfm_tensor* data, const lfm_tensor* scales, const lfm_tensor* base,
                              const lfm_tensor* out, const lfm_codec_options* opts) {
    CodecArgs a;
    read_options(opts, &a.codec, &a.group, &a.per_tensor, &a.alpha, &a.n_threads);
    check_view(out, "out");
    check_float(*out, "out");
    check_contiguous(*out, "out");
    matrix_view(*out, &a.rows, &a.cols);
    check_payload(data, scales, a.codec, a.rows, a.cols, a.group, a.per_tensor, "");
    if (data->device != out->device) fail(LFM_STATUS_INVALID_ARGUMENT, "data and out are on different devices");
    if (base) {
        check_view(base, "base");
        check_float(*base, "base");
        check_contiguous(*base, "base");
        check_same_shape(*base, *out, "base", "out");
        if (base->device != out->device) fail(LFM_STATUS_INVALID_ARGUMENT, "base and out are on different devices");
        // Partial overlap would read elements already overwritten; exact aliasing is fine
        // (every element is read before it is written, by the same thread).
        if (base->data != out->data) {
            const char* b0 = static_cast<const char*>(base->data);
            const char* o0 = static_cast<const char*>(out->data);
            const int64_t nb = numel(*base) * static_cast<int64_t>(dtype_size(base->dtype));
            const int64_t no = numel(*out) * static_cast<int64_t>(dtype_size(out->dtype));
            if (nb > 0 && no > 0 && b0 < o0 + no && o0 < b0 + nb)
                fail(LFM_STATUS_INVALID_ARGUMENT, "base and out overlap partially (they may only be the same memory)");
        }
    }
    a.n_groups = a.codec == LFM_CODEC_SIGN1 ? 0 : groups_per_row(a.cols, a.group);
    a.data = data;
    a.scales = scales;
    a.base = base;
    a.out = out;
    return a;
}

DeltaApplyArgs resolve_delta_apply_args(const lfm_tensor* x, const lfm_tensor* data, const lfm_tensor* scales,
                                        int32_t n_slots, const lfm_tensor* token_slot, const lfm_tensor* y,
                                        const lfm_codec_options* opts) {
    DeltaApplyArgs a;
    read_options(opts, &a.codec, &a.group, &a.per_tensor, &a.alpha, &a.n_threads);
    check_view(x, "x");
    check_view(y, "y");
    check_view(token_slot, "token_slot");
    check_float(*x, "x");
    check_float(*y, "y");
    check_ndim(*x, 2, "x");
    check_ndim(*y, 2, "y");
    check_ndim(*token_slot, 1, "token_slot");
    check_contiguous(*x, "x");
    check_contiguous(*y, "y");
    check_contiguous(*token_slot, "token_slot");
    if (token_slot->dtype != LFM_DTYPE_I32 && token_slot->dtype != LFM_DTYPE_I64)
        fail(LFM_STATUS_UNSUPPORTED_DTYPE, "token_slot has dtype ", dtype_name(token_slot->dtype), "; use int32 or int64");
    check_device(*x, LFM_DEVICE_CPU, "x");
    check_device(*y, LFM_DEVICE_CPU, "y");
    check_device(*token_slot, LFM_DEVICE_CPU, "token_slot");
    a.T = x->shape[0];
    a.in = x->shape[1];
    a.out = y->shape[1];
    if (y->shape[0] != a.T) fail(LFM_STATUS_SHAPE_MISMATCH, "y has ", y->shape[0], " rows but x has ", a.T);
    if (token_slot->shape[0] != a.T)
        fail(LFM_STATUS_SHAPE_MISMATCH, "token_slot has ", token_slot->shape[0], " entries but x has ", a.T, " rows");
    if (n_slots < 0) fail(LFM_STATUS_INVALID_ARGUMENT, "n_slots must be >= 0");
    if (n_slots > 0 && (!data || !scales)) fail(LFM_STATUS_INVALID_ARGUMENT, "data/scales arrays are NULL");
    for (int32_t s = 0; s < n_slots; ++s) {
        const std::string what = cat("slot ", s, ": ");
        check_payload(&data[s], &scales[s], a.codec, a.out, a.in, a.group, a.per_tensor, what);
        check_device(data[s], LFM_DEVICE_CPU, what + "data");
        if (s == 0) a.scale_dtype = scales[s].dtype;
        else if (scales[s].dtype != a.scale_dtype)
            fail(LFM_STATUS_UNSUPPORTED_DTYPE, what, "scales dtype differs from slot 0's");
        a.data.push_back(data[s].data);
        a.scales.push_back(scales[s].data);
    }
    // Index range check here, so the kernel never reads outside the slot table.
    for (int64_t t = 0; t < a.T; ++t) {
        int64_t s = token_slot->dtype == LFM_DTYPE_I32 ? static_cast<const int32_t*>(token_slot->data)[t]
                                                       : static_cast<const int64_t*>(token_slot->data)[t];
        if (s < -1 || s >= n_slots)
            fail(LFM_STATUS_OUT_OF_RANGE, "token_slot[", t, "] = ", s, " is outside [-1, ", n_slots, ")");
    }
    a.n_groups = a.codec == LFM_CODEC_SIGN1 ? 0 : groups_per_row(a.in, a.group);
    a.x = x;
    a.y = y;
    a.token_slot = token_slot;
    return a;
}

}  // namespace lfm::codec
