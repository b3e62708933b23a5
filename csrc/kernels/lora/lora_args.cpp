// Validation of the multi-LoRA ops: the one place the C ABI checks their inputs.
#include <algorithm>
#include <cmath>

#include "core/status.h"
#include "core/tensor.h"
#include "core/thread_pool.h"
#include "kernels/lora/lora.h"

namespace lfm::lora {
namespace {

void check_dev(const lfm_tensor& t, const LoraArgs& a, const std::string& what) {
    if (t.device != a.device || (t.device == LFM_DEVICE_CUDA && t.device_id != a.device_id))
        fail(LFM_STATUS_INVALID_ARGUMENT, what, " is on ", t.device == LFM_DEVICE_CUDA ? "cuda:" : "cpu",
             t.device == LFM_DEVICE_CUDA ? std::to_string(t.device_id) : std::string(), " but the batch is on ",
             a.device == LFM_DEVICE_CUDA ? "cuda:" : "cpu",
             a.device == LFM_DEVICE_CUDA ? std::to_string(a.device_id) : std::string());
}

// 2-D float matrix with unit column stride; returns the row stride.
int64_t check_rows(const lfm_tensor* t, const std::string& what) {
    check_view(t, what.c_str());
    check_float(*t, what);
    check_ndim(*t, 2, what);
    if (t->shape[1] > 1 && t->strides[1] != 1)
        fail(LFM_STATUS_INVALID_ARGUMENT, what, " needs unit stride along its last dimension, got stride ",
             t->strides[1]);
    if (t->shape[0] > 1 && t->strides[0] < t->shape[1])
        fail(LFM_STATUS_INVALID_ARGUMENT, what, " has row stride ", t->strides[0], " < its ", t->shape[1],
             " columns (overlapping rows)");
    return t->shape[0] > 1 ? t->strides[0] : t->shape[1];
}

// Contiguous, or empty (an empty view's strides carry no layout).
void check_packed(const lfm_tensor& t, const std::string& what) {
    if (numel(t) > 0) check_contiguous(t, what);
}

void check_table(const lfm_tensor* t, const std::string& what) {
    check_view(t, what.c_str());
    check_float(*t, what);
    check_ndim(*t, 3, what);
    check_packed(*t, what);
}

const int32_t* check_index(const lfm_tensor* t, int64_t n, const std::string& what, const LoraArgs& a) {
    check_view(t, what.c_str());
    check_dtype(*t, LFM_DTYPE_I32, what);
    check_ndim(*t, 1, what);
    check_packed(*t, what);
    if (t->shape[0] != n)
        fail(LFM_STATUS_SHAPE_MISMATCH, what, " has ", t->shape[0], " entries, expected ", n);
    check_dev(*t, a, what);
    return static_cast<const int32_t*>(t->data);
}

}  // namespace

LoraArgs resolve_lora_args(Op op, const lfm_tensor* in, const lfm_lora_slice* slices, int32_t n_slices,
                           const lfm_tensor* token_slot, const lfm_tensor* seg_start, const lfm_tensor* seg_slot,
                           const lfm_tensor* out, const lfm_lora_options* opts) {
    LoraArgs a;
    a.op = op;
    if (opts) {
        if (opts->struct_size < sizeof(lfm_lora_options))
            fail(LFM_STATUS_INVALID_ARGUMENT, "options.struct_size is ", opts->struct_size, ", expected ",
                 sizeof(lfm_lora_options), " (initialise with lfm_lora_options_init)");
        a.check_values = opts->check_values != 0;
        a.n_threads = opts->n_threads;
        check_n_threads(a.n_threads);
    }
    if (n_slices < 1 || n_slices > LFM_LORA_MAX_SLICES)
        fail(LFM_STATUS_INVALID_ARGUMENT, "n_slices = ", n_slices, " outside 1..", LFM_LORA_MAX_SLICES);
    if (!slices) fail(LFM_STATUS_INVALID_ARGUMENT, "slices is NULL");
    const bool has_x = op != Op::Expand, has_y = op != Op::Shrink;

    // x (shrink/apply) or u (expand) comes in `in`; u (shrink) or y (expand/apply) in `out`.
    const lfm_tensor* xu = in;
    check_view(xu, has_x ? "x" : "u");
    a.device = xu->device;
    a.device_id = xu->device_id;
    if (has_x) {
        a.x_ld = check_rows(xu, "x");
        a.x = xu->data;
        a.x_dt = xu->dtype;
        a.T = xu->shape[0];
        a.H_in = xu->shape[1];
    }
    const lfm_tensor* u = op == Op::Shrink ? out : (op == Op::Expand ? in : nullptr);
    if (op != Op::Apply) {  // shrink and expand need u: a NULL u is refused by check_view, not skipped
        check_view(u, "u");
        check_dtype(*u, LFM_DTYPE_F32, "u");
        check_packed(*u, "u");
        check_dev(*u, a, "u");
        if (!(u->ndim == 3 || (u->ndim == 2 && n_slices == 1)))
            fail(LFM_STATUS_SHAPE_MISMATCH, "u must be [n_slices, T, R_max] (or [T, R_max] for one slice), got ",
                 shape_str(*u));
        const int64_t us = u->ndim == 3 ? u->shape[0] : 1;
        const int64_t uT = u->shape[u->ndim - 2];
        if (us != n_slices) fail(LFM_STATUS_SHAPE_MISMATCH, "u holds ", us, " slices but n_slices = ", n_slices);
        if (has_x && uT != a.T) fail(LFM_STATUS_SHAPE_MISMATCH, "u has T = ", uT, " rows but x has ", a.T);
        a.T = uT;
        a.u = static_cast<float*>(u->data);
        a.u_R = u->shape[u->ndim - 1];
    }
    if (has_y) {
        a.y_ld = check_rows(out, "y");
        check_dev(*out, a, "y");
        if (out->shape[0] != a.T)
            fail(LFM_STATUS_SHAPE_MISMATCH, "y has ", out->shape[0], " rows but the batch has T = ", a.T);
        a.y = out->data;
        a.y_dt = out->dtype;
        a.H_y = out->shape[1];
    }

    a.slices.resize(static_cast<size_t>(n_slices));
    for (int i = 0; i < n_slices; ++i) {
        const lfm_lora_slice& s = slices[i];
        Slice& d = a.slices[static_cast<size_t>(i)];
        const std::string sfx = n_slices > 1 ? cat(" of slice ", i) : std::string();
        int64_t n_slots = -1, R = -1;
        if (has_x) {
            const std::string w = "A" + sfx;
            check_table(s.A, w);
            check_dev(*s.A, a, w);
            if (s.A->shape[2] != a.H_in)
                fail(LFM_STATUS_SHAPE_MISMATCH, w, " has H_in = ", s.A->shape[2], " (shape ", shape_str(*s.A),
                     ") but x has H_in = ", a.H_in);
            n_slots = s.A->shape[0];
            R = s.A->shape[1];
            d.A = s.A->data;
            d.a_dt = s.A->dtype;
        }
        if (has_y) {
            const std::string w = "B" + sfx;
            check_table(s.B, w);
            check_dev(*s.B, a, w);
            if (n_slots >= 0 && (s.B->shape[0] != n_slots || s.B->shape[2] != R))
                fail(LFM_STATUS_SHAPE_MISMATCH, w, " has shape ", shape_str(*s.B), " but A", sfx, " ",
                     shape_str(*s.A), " needs [", n_slots, ", H_out, ", R, "]");
            n_slots = s.B->shape[0];
            R = s.B->shape[2];
            d.B = s.B->data;
            d.b_dt = s.B->dtype;
            d.H_out = s.B->shape[1];
            d.off = s.y_col_offset;
            // overflow-safe (off + H_out could wrap): both sizes are >= 0 (check_view)
            if (d.off < 0 || d.H_out > a.H_y || d.off > a.H_y - d.H_out)
                fail(LFM_STATUS_OUT_OF_RANGE, "slice ", i, " writes ", d.H_out, " columns from column offset ", d.off,
                     " but y has ", a.H_y, " columns");
            d.scales = static_cast<const float*>(nullptr);
        }
        if (u && R != a.u_R)
            fail(LFM_STATUS_SHAPE_MISMATCH, (has_x ? "A" : "B"), sfx, " has R_max = ", R, " but u has R_max = ",
                 a.u_R);
        if (i == 0) a.n_slots = n_slots;
        else if (n_slots != a.n_slots)
            fail(LFM_STATUS_SHAPE_MISMATCH, "slice ", i, " has ", n_slots, " slots but slice 0 has ", a.n_slots,
                 " (slices share one slot table)");
        d.R = R;
        d.ranks = check_index(s.ranks, n_slots, "ranks" + sfx, a);
        if (has_y) {
            const std::string w = "scales" + sfx;
            check_view(s.scales, w.c_str());
            check_dtype(*s.scales, LFM_DTYPE_F32, w);
            check_ndim(*s.scales, 1, w);
            check_packed(*s.scales, w);
            check_dev(*s.scales, a, w);
            if (s.scales->shape[0] != n_slots)
                fail(LFM_STATUS_SHAPE_MISMATCH, w, " has ", s.scales->shape[0], " entries, expected ", n_slots);
            d.scales = static_cast<const float*>(s.scales->data);
        }
    }
    if (has_y) {  // slices must not write the same columns (they run concurrently)
        std::vector<std::pair<int64_t, int>> order;
        for (int i = 0; i < n_slices; ++i) order.emplace_back(a.slices[i].off, i);
        std::sort(order.begin(), order.end());
        for (size_t k = 1; k < order.size(); ++k) {
            const Slice& p = a.slices[order[k - 1].second];
            if (order[k].first < p.off + p.H_out)
                fail(LFM_STATUS_INVALID_ARGUMENT, "slices ", order[k - 1].second, " and ", order[k].second,
                     " write overlapping columns of y");
        }
    }

    if (token_slot) {
        if (seg_start || seg_slot)
            fail(LFM_STATUS_INVALID_ARGUMENT, "give either token_slot or (seg_start, seg_slot), not both");
        a.token_slot = check_index(token_slot, a.T, "token_slot", a);
    } else {
        a.segments = true;
        if (!seg_start || !seg_slot)
            fail(LFM_STATUS_INVALID_ARGUMENT, "no slot map: give token_slot, or both seg_start and seg_slot");
        check_view(seg_slot, "seg_slot");
        check_ndim(*seg_slot, 1, "seg_slot");
        a.S = seg_slot->shape[0];
        a.seg_slot = check_index(seg_slot, a.S, "seg_slot", a);
        a.seg_start = check_index(seg_start, a.S + 1, "seg_start", a);
    }
    if (a.device == LFM_DEVICE_CPU && a.check_values) {
        std::vector<const int32_t*> r;
        std::vector<const float*> sc;
        for (auto& s : a.slices) {
            r.push_back(s.ranks);
            sc.push_back(s.scales);
        }
        check_lora_values(a, a.token_slot, a.seg_start, a.seg_slot, r, sc);  // host pointers on the CPU
    }
    return a;
}

void check_lora_values(const LoraArgs& a, const int32_t* token_slot, const int32_t* seg_start,
                       const int32_t* seg_slot, const std::vector<const int32_t*>& ranks,
                       const std::vector<const float*>& scales) {
    const int32_t* slots = a.segments ? seg_slot : token_slot;
    const int64_t n = a.segments ? a.S : a.T;
    for (int64_t i = 0; i < n; ++i)
        if (slots[i] < -1 || slots[i] >= a.n_slots)
            fail(LFM_STATUS_OUT_OF_RANGE, a.segments ? "seg_slot[" : "token_slot[", i, "] = ", slots[i],
                 " is out of range: slots are -1 (no adapter) or 0..", a.n_slots - 1);
    if (a.segments) {
        if (seg_start[0] != 0 || seg_start[a.S] != a.T)
            fail(LFM_STATUS_INVALID_ARGUMENT, "seg_start must start at 0 and end at T = ", a.T, ", got ",
                 seg_start[0], " .. ", seg_start[a.S]);
        for (int64_t i = 0; i < a.S; ++i)
            if (seg_start[i + 1] < seg_start[i])
                fail(LFM_STATUS_INVALID_ARGUMENT, "seg_start must be non-decreasing: seg_start[", i + 1, "] = ",
                     seg_start[i + 1], " < seg_start[", i, "] = ", seg_start[i]);
    }
    const size_t ns = a.slices.size();
    for (size_t k = 0; k < ns; ++k) {
        const std::string sfx = ns > 1 ? cat(" of slice ", k) : std::string();
        for (int64_t s = 0; s < a.n_slots; ++s) {
            const int32_t r = ranks[k][s];
            if (r < 0 || r > a.slices[k].R)
                fail(LFM_STATUS_INVALID_ARGUMENT, "ranks", sfx, "[", s, "] = ", r, " is outside 0..R_max = ",
                     a.slices[k].R);
            if (k < scales.size() && scales[k] && !std::isfinite(scales[k][s]))
                fail(LFM_STATUS_INVALID_ARGUMENT, "scales", sfx, "[", s, "] = ", scales[k][s], " is not finite");
        }
    }
}

}  // namespace lfm::lora
