// pybind11 skin of the multi-LoRA C ABI (lfm_lora_shrink / expand / apply).
#include "python/tensor_arg.h"

namespace lfm::py {
namespace {

struct Call {
    std::vector<lfm_tensor> A, B, ranks, scales;
    std::vector<lfm_lora_slice> slices;
    lfm_tensor ts{}, ss{}, sl{};
    bool has_ts = false, has_seg = false;

    Call(const pyb::sequence& As, const pyb::sequence& Bs, const pyb::sequence& rk, const pyb::sequence& sc,
         const std::vector<int64_t>& offs, const pyb::object& token_slot, const pyb::object& seg_start,
         const pyb::object& seg_slot) {
        A = to_views(As);
        B = to_views(Bs);
        ranks = to_views(rk);
        scales = to_views(sc);
        const size_t n = ranks.size();
        if ((!A.empty() && A.size() != n) || (!B.empty() && B.size() != n) || (!scales.empty() && scales.size() != n) ||
            (!offs.empty() && offs.size() != n))
            throw pyb::value_error("lora: A, B, ranks, scales and offsets need one entry per slice");
        slices.resize(n);
        for (size_t i = 0; i < n; ++i) {
            slices[i].A = A.empty() ? nullptr : &A[i];
            slices[i].B = B.empty() ? nullptr : &B[i];
            slices[i].ranks = &ranks[i];
            slices[i].scales = scales.empty() ? nullptr : &scales[i];
            slices[i].y_col_offset = offs.empty() ? 0 : offs[i];
        }
        if (!token_slot.is_none()) {
            ts = to_view(token_slot);
            has_ts = true;
        }
        if (!seg_start.is_none() || !seg_slot.is_none()) {
            if (seg_start.is_none() || seg_slot.is_none())
                throw pyb::value_error("lora: the segment form needs both seg_start and seg_slot");
            ss = to_view(seg_start);
            sl = to_view(seg_slot);
            has_seg = true;
        }
    }
    const lfm_tensor* tsp() const { return has_ts ? &ts : nullptr; }
    const lfm_tensor* ssp() const { return has_seg ? &ss : nullptr; }
    const lfm_tensor* slp() const { return has_seg ? &sl : nullptr; }
    int32_t n() const { return static_cast<int32_t>(slices.size()); }
};

lfm_lora_options options(int check_values, int n_threads) {
    lfm_lora_options o;
    lfm_lora_options_init(&o);
    o.check_values = check_values;
    o.n_threads = n_threads;
    return o;
}

}  // namespace

void bind_lora(pyb::module_& m) {
    m.def(
        "lora_shrink",
        [](pyb::handle x, pyb::sequence As, pyb::sequence ranks, pyb::object token_slot, pyb::object seg_start,
           pyb::object seg_slot, pyb::handle u, int check_values, int n_threads, uintptr_t stream) {
            Call c(As, pyb::list(), ranks, pyb::list(), {}, token_slot, seg_start, seg_slot);
            lfm_tensor xv = to_view(x), uv = to_view(u);
            lfm_lora_options o = options(check_values, n_threads);
            lfm_status st;
            {
                pyb::gil_scoped_release release;
                st = lfm_lora_shrink(&xv, c.slices.data(), c.n(), c.tsp(), c.ssp(), c.slp(), &uv, &o,
                                     reinterpret_cast<void*>(stream));
            }
            check(st);
        },
        pyb::arg("x"), pyb::arg("As"), pyb::arg("ranks"), pyb::arg("token_slot"), pyb::arg("seg_start"),
        pyb::arg("seg_slot"), pyb::arg("u"), pyb::arg("check"), pyb::arg("n_threads"), pyb::arg("stream"));
    m.def(
        "lora_expand",
        [](pyb::handle u, pyb::sequence Bs, pyb::sequence ranks, pyb::sequence scales, std::vector<int64_t> offs,
           pyb::object token_slot, pyb::object seg_start, pyb::object seg_slot, pyb::handle y, int check_values,
           int n_threads, uintptr_t stream) {
            Call c(pyb::list(), Bs, ranks, scales, offs, token_slot, seg_start, seg_slot);
            lfm_tensor uv = to_view(u), yv = to_view(y);
            lfm_lora_options o = options(check_values, n_threads);
            lfm_status st;
            {
                pyb::gil_scoped_release release;
                st = lfm_lora_expand(&uv, c.slices.data(), c.n(), c.tsp(), c.ssp(), c.slp(), &yv, &o,
                                     reinterpret_cast<void*>(stream));
            }
            check(st);
        },
        pyb::arg("u"), pyb::arg("Bs"), pyb::arg("ranks"), pyb::arg("scales"), pyb::arg("offsets"),
        pyb::arg("token_slot"), pyb::arg("seg_start"), pyb::arg("seg_slot"), pyb::arg("y"), pyb::arg("check"),
        pyb::arg("n_threads"), pyb::arg("stream"));
    m.def(
        "lora_apply",
        [](pyb::handle x, pyb::sequence As, pyb::sequence Bs, pyb::sequence ranks, pyb::sequence scales,
           std::vector<int64_t> offs, pyb::object token_slot, pyb::object seg_start, pyb::object seg_slot,
           pyb::handle y, int check_values, int n_threads, uintptr_t stream) {
            Call c(As, Bs, ranks, scales, offs, token_slot, seg_start, seg_slot);
            lfm_tensor xv = to_view(x), yv = to_view(y);
            lfm_lora_options o = options(check_values, n_threads);
            lfm_status st;
            {
                pyb::gil_scoped_release release;
                st = lfm_lora_apply(&xv, c.slices.data(), c.n(), c.tsp(), c.ssp(), c.slp(), &yv, &o,
                                    reinterpret_cast<void*>(stream));
            }
            check(st);
        },
        pyb::arg("x"), pyb::arg("As"), pyb::arg("Bs"), pyb::arg("ranks"), pyb::arg("scales"), pyb::arg("offsets"),
        pyb::arg("token_slot"), pyb::arg("seg_start"), pyb::arg("seg_slot"), pyb::arg("y"), pyb::arg("check"),
        pyb::arg("n_threads"), pyb::arg("stream"));
}

}  // namespace lfm::py
