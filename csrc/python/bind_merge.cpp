#include "python/tensor_arg.h"

namespace lfm::py {

void bind_merge(pyb::module_& m) {
    m.def(
        "merge",
        [](pyb::object base, pyb::sequence models, pyb::handle out, int method, std::vector<double> weights,
           std::vector<double> densities, std::vector<double> gammas, std::vector<double> epsilons,
           std::vector<int32_t> positions, int normalize, int rescale, int consensus_unweighted, int disjoint_count,
           double lam, uint64_t seed, std::string name, int n_threads, uintptr_t stream) {
            lfm_tensor base_v{};
            const bool has_base = !base.is_none();
            if (has_base) base_v = to_view(base);
            std::vector<lfm_tensor> mv = to_views(models);
            lfm_tensor out_v = to_view(out);
            const size_t K = mv.size();
            auto sized = [&](const std::vector<double>& v, const char* what) {
                if (!v.empty() && v.size() != K)
                    throw pyb::value_error(std::string(what) + " must have one value per model");
                return v.empty() ? nullptr : v.data();
            };
            lfm_merge_options o;
            lfm_merge_options_init(&o);
            o.method = static_cast<lfm_merge_method>(method);
            o.n_models = static_cast<int32_t>(K);
            o.weights = sized(weights, "weights");
            o.densities = sized(densities, "densities");
            o.gammas = sized(gammas, "gammas");
            o.epsilons = sized(epsilons, "epsilons");
            if (!positions.empty() && positions.size() != K)
                throw pyb::value_error("model_positions must have one value per model");
            o.model_positions = positions.empty() ? nullptr : positions.data();
            o.normalize = normalize;
            o.rescale = rescale;
            o.consensus_unweighted = consensus_unweighted;
            o.disjoint_count = disjoint_count;
            o.lambda = lam;
            o.seed = seed;
            o.tensor_name = name.c_str();
            o.n_threads = n_threads;
            lfm_status st;
            {
                pyb::gil_scoped_release release;
                st = lfm_merge(has_base ? &base_v : nullptr, mv.data(), &out_v, &o, reinterpret_cast<void*>(stream));
            }
            check(st);
        },
        pyb::arg("base"), pyb::arg("models"), pyb::arg("out"), pyb::arg("method"), pyb::arg("weights"),
        pyb::arg("densities"), pyb::arg("gammas"), pyb::arg("epsilons"), pyb::arg("positions"),
        pyb::arg("normalize"), pyb::arg("rescale"), pyb::arg("consensus_unweighted"), pyb::arg("disjoint_count"),
        pyb::arg("lam"), pyb::arg("seed"), pyb::arg("name"), pyb::arg("n_threads"), pyb::arg("stream"));
}

}  // namespace lfm::py
