#include "python/tensor_arg.h"

namespace lfm::py {

namespace {
lfm_codec_options make_options(int codec, int64_t group_size, bool per_tensor, double alpha, int n_threads) {
    lfm_codec_options o;
    lfm_codec_options_init(&o);
    o.codec = static_cast<lfm_codec>(codec);
    o.group_size = group_size;
    o.per_tensor = per_tensor ? 1 : 0;
    o.alpha = alpha;
    o.n_threads = n_threads;
    return o;
}
}  // namespace

void bind_codec(pyb::module_& m) {
    m.def(
        "codec_encode",
        [](pyb::handle delta, pyb::handle data, pyb::handle scales, int codec, int64_t group_size, bool per_tensor,
           int n_threads) {
            lfm_tensor d = to_view(delta), p = to_view(data), s = to_view(scales);
            lfm_codec_options o = make_options(codec, group_size, per_tensor, 1.0, n_threads);
            lfm_status st;
            {
                pyb::gil_scoped_release release;
                st = lfm_codec_encode(&d, &p, &s, &o, nullptr);
            }
            check(st);
        },
        pyb::arg("delta"), pyb::arg("data"), pyb::arg("scales"), pyb::arg("codec"), pyb::arg("group_size"),
        pyb::arg("per_tensor"), pyb::arg("n_threads"));
    m.def(
        "codec_decode",
        [](pyb::handle data, pyb::handle scales, pyb::object base, pyb::handle out, int codec, int64_t group_size,
           bool per_tensor, double alpha, int n_threads, uintptr_t stream) {
            lfm_tensor p = to_view(data), s = to_view(scales), o_v = to_view(out), b{};
            const bool has_base = !base.is_none();
            if (has_base) b = to_view(base);
            lfm_codec_options o = make_options(codec, group_size, per_tensor, alpha, n_threads);
            lfm_status st;
            {
                pyb::gil_scoped_release release;
                st = lfm_codec_decode(&p, &s, has_base ? &b : nullptr, &o_v, &o, reinterpret_cast<void*>(stream));
            }
            check(st);
        },
        pyb::arg("data"), pyb::arg("scales"), pyb::arg("base"), pyb::arg("out"), pyb::arg("codec"),
        pyb::arg("group_size"), pyb::arg("per_tensor"), pyb::arg("alpha"), pyb::arg("n_threads"), pyb::arg("stream"));
    m.def(
        "delta_apply",
        [](pyb::handle x, pyb::sequence data, pyb::sequence scales, pyb::handle token_slot, pyb::handle y, int codec,
           int64_t group_size, bool per_tensor, double alpha, int n_threads) {
            lfm_tensor xv = to_view(x), yv = to_view(y), sv = to_view(token_slot);
            std::vector<lfm_tensor> dv = to_views(data), scv = to_views(scales);
            if (dv.size() != scv.size()) throw pyb::value_error("delta_apply: one scales tensor per data tensor");
            lfm_codec_options o = make_options(codec, group_size, per_tensor, alpha, n_threads);
            lfm_status st;
            {
                pyb::gil_scoped_release release;
                st = lfm_delta_apply(&xv, dv.data(), scv.data(), static_cast<int32_t>(dv.size()), &sv, &yv, &o, nullptr);
            }
            check(st);
        },
        pyb::arg("x"), pyb::arg("data"), pyb::arg("scales"), pyb::arg("token_slot"), pyb::arg("y"), pyb::arg("codec"),
        pyb::arg("group_size"), pyb::arg("per_tensor"), pyb::arg("alpha"), pyb::arg("n_threads"));
}

}  // namespace lfm::py
