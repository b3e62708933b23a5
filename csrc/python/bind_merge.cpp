#include <optional>

#include "kernels/merge/merge.h"
#include "kernels/merge/merge_methods_table.h"
#include "kernels/merge/merge_plan.h"
#include "python/tensor_arg.h"

namespace lfm::py {

namespace {

lfm::merge::Sparsifier sparsifier_of(int method) {
    if (method < 0 || method >= lfm::merge::kMethodCount)
        throw pyb::value_error("unknown merge method code " + std::to_string(method));
    return lfm::merge::kMethodTable[method].sparsifier;
}

pyb::dict cut_dict(const lfm::merge::Cut& c) {
    pyb::dict d;
    d["all"] = c.all;
    d["none"] = c.none;
    d["lo_v"] = c.lo_v;
    d["hi_v"] = c.hi_v;
    d["lo_emin"] = c.lo_emin;
    d["lo_emax"] = c.lo_emax;
    d["hi_emin"] = c.hi_emin;
    d["hi_emax"] = c.hi_emax;
    return d;
}

const char* tie_field_name(lfm::merge::TieField f) {
    switch (f) {
        case lfm::merge::TieField::LoEmin: return "lo_emin";
        case lfm::merge::TieField::LoEmax: return "lo_emax";
        case lfm::merge::TieField::HiEmax: return "hi_emax";
        case lfm::merge::TieField::None: break;
    }
    return "";
}

// The merge planner (kernels/merge/merge_plan.h) for the Triton backend, which runs its
// own device passes but takes every host decision from here.
void bind_merge_plan(pyb::module_& m) {
    m.def(
        "merge_plan_cuts",
        [](int method, int64_t n, std::vector<double> d, std::vector<double> gamma) {
            if (gamma.size() != d.size()) throw pyb::value_error("densities and gammas differ in length");
            lfm::merge::CutPlan p = lfm::merge::plan_cuts(sparsifier_of(method), n, d, gamma);
            pyb::list cuts, queries;
            for (const auto& c : p.cuts) cuts.append(cut_dict(c));
            for (const auto& q : p.queries) queries.append(pyb::make_tuple(q.model, q.pos, q.upper));
            return pyb::make_tuple(cuts, queries);
        },
        pyb::arg("method"), pyb::arg("n"), pyb::arg("densities"), pyb::arg("gammas"),
        "(cuts [K dicts], queries [(model, pos, upper)]) of a magnitude-type sparsifier");
    m.def(
        "merge_apply_cut_answer",
        [](int method, int64_t n, int model, int64_t pos, bool upper, uint32_t value, int64_t c_lt, int64_t c_eq,
           pyb::dict cut) {
            lfm::merge::Cut c;
            c.all = cut["all"].cast<bool>();
            c.none = cut["none"].cast<bool>();
            c.lo_v = cut["lo_v"].cast<uint32_t>();
            c.hi_v = cut["hi_v"].cast<uint32_t>();
            c.lo_emin = cut["lo_emin"].cast<int64_t>();
            c.lo_emax = cut["lo_emax"].cast<int64_t>();
            c.hi_emin = cut["hi_emin"].cast<int64_t>();
            c.hi_emax = cut["hi_emax"].cast<int64_t>();
            const lfm::merge::TieNeed need = lfm::merge::apply_cut_answer(
                sparsifier_of(method), n, lfm::merge::CutQuery{model, pos, upper}, value, c_lt, c_eq, c);
            return pyb::make_tuple(cut_dict(c), tie_field_name(need.field), need.ordinal);
        },
        pyb::arg("method"), pyb::arg("n"), pyb::arg("model"), pyb::arg("pos"), pyb::arg("upper"), pyb::arg("value"),
        pyb::arg("c_lt"), pyb::arg("c_eq"), pyb::arg("cut"),
        "(updated cut, index field a tie lookup fills or '', tie ordinal or -1)");
    m.def(
        "merge_della_thresholds",
        [](int64_t cols, double d, double eps) { return lfm::merge::della_thresholds(cols, d, eps); },
        pyb::arg("cols"), pyb::arg("density"), pyb::arg("epsilon"), "DELLA keep thresholds per rank (uint64)");
    m.def(
        "merge_rescale_factor",
        [](const std::string& kind, double a, double b) {
            if (kind == "l1") return lfm::merge::l1_factor(a, b);
            if (kind == "inverse_density") return lfm::merge::inverse_density_factor(a);
            throw pyb::value_error("unknown rescale '" + kind + "'");
        },
        pyb::arg("kind"), pyb::arg("a"), pyb::arg("b") = 0.0,
        "l1: ||delta||_1 / ||delta'||_1 from (a, b); inverse_density: 1 / a");
    m.def(
        "merge_coefficients",
        [](int method, std::vector<double> weights, std::vector<double> factors, bool normalize, bool unweighted,
           bool disjoint_count) {
            if (factors.size() != weights.size()) throw pyb::value_error("weights and factors differ in length");
            lfm::merge::MergeArgs a;
            a.method = static_cast<lfm_merge_method>(method);
            a.consensus = lfm::merge::kMethodTable[static_cast<int>(a.method)].consensus;
            (void)sparsifier_of(method);
            a.K = static_cast<int>(weights.size());
            a.w = weights;
            a.normalize = normalize;
            a.consensus_unweighted = unweighted;
            a.disjoint_count = disjoint_count;
            const lfm::merge::Coefficients c = lfm::merge::merge_coefficients(a, factors);
            pyb::dict d;
            d["coef"] = c.coef;
            d["ecoef"] = c.ecoef;
            d["dshare"] = c.dshare;
            d["inv_plain_div"] = c.inv_plain_div;
            d["table"] = c.table;
            d["inv_div"] = c.inv_div;
            return d;
        },
        pyb::arg("method"), pyb::arg("weights"), pyb::arg("factors"), pyb::arg("normalize"), pyb::arg("unweighted"),
        pyb::arg("disjoint_count"), "the merge pass's fp32 coefficients and divisor table");
    m.def(
        "merge_method_table",
        [] {
            static const char* sp_names[] = {"none", "magnitude", "random", "magnitude_outliers", "della_magprune"};
            pyb::list rows;
            for (const auto& r : lfm::merge::kMethodTable) {
                pyb::dict d;
                d["code"] = r.code;
                d["name"] = r.name;
                d["sparsifier"] = sp_names[static_cast<int>(r.sparsifier)];
                d["consensus"] = r.consensus;
                d["normalize_default"] = r.normalize_default;
                d["rescale_default"] = r.rescale_default;
                d["uses_base"] = r.uses_base;
                d["checks_gamma"] = r.checks_gamma;
                d["checks_epsilon"] = r.checks_epsilon;
                rows.append(d);
            }
            pyb::dict defaults;
            defaults["weight"] = lfm::merge::kDefaultWeight;
            defaults["density"] = lfm::merge::kDefaultDensity;
            defaults["gamma"] = lfm::merge::kDefaultGamma;
            defaults["epsilon"] = lfm::merge::kDefaultEpsilon;
            defaults["lambda"] = lfm::merge::kDefaultLambda;
            pyb::dict ranges;
            ranges["density"] = pyb::make_tuple(lfm::merge::kDensityMin, lfm::merge::kDensityMax);
            ranges["gamma"] = pyb::make_tuple(lfm::merge::kGammaMin, lfm::merge::kGammaMax);
            ranges["epsilon"] = pyb::make_tuple(lfm::merge::kEpsilonMin, pyb::none());
            return pyb::make_tuple(rows, defaults, ranges);
        },
        "the compiled core's merge method table: (rows, defaults, ranges)");
}

}  // namespace

void bind_merge(pyb::module_& m) {
    m.def(
        "merge",
        [](pyb::object base, pyb::sequence models, pyb::handle out, int method, std::vector<double> weights,
           std::vector<double> densities, std::vector<double> gammas, std::vector<double> epsilons,
           std::vector<int32_t> positions, int normalize, int rescale, int consensus_unweighted, int disjoint_count,
           std::optional<double> lam, uint64_t seed, std::string name, int n_threads, uintptr_t stream,
           std::vector<std::string> model_names) {
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
            if (lam) o.lambda = *lam;
            o.seed = seed;
            o.tensor_name = name.c_str();
            o.n_threads = n_threads;
            if (!model_names.empty() && model_names.size() != K)
                throw pyb::value_error("model_names must have one name per model");
            std::vector<const char*> names;
            for (const auto& s : model_names) names.push_back(s.c_str());
            o.model_names = names.empty() ? nullptr : names.data();
            int64_t n_nonfinite = -1;
            o.n_nonfinite_out = &n_nonfinite;
            lfm_status st;
            {
                pyb::gil_scoped_release release;
                st = lfm_merge(has_base ? &base_v : nullptr, mv.data(), &out_v, &o, reinterpret_cast<void*>(stream));
            }
            check(st);
            return n_nonfinite;  // NaN/Inf written to out; -1: not counted (CUDA)
        },
        // options are keywords (lfm_merge_options' fields); an omitted one takes the C
        // default (lfm_merge_options_init), so no default is repeated here
        pyb::arg("base"), pyb::arg("models"), pyb::arg("out"), pyb::kw_only(), pyb::arg("method"),
        pyb::arg("weights") = std::vector<double>{}, pyb::arg("densities") = std::vector<double>{},
        pyb::arg("gammas") = std::vector<double>{}, pyb::arg("epsilons") = std::vector<double>{},
        pyb::arg("positions") = std::vector<int32_t>{}, pyb::arg("normalize") = -1, pyb::arg("rescale") = -1,
        pyb::arg("consensus_unweighted") = 0, pyb::arg("disjoint_count") = 0, pyb::arg("lam") = pyb::none(),
        pyb::arg("seed") = 0, pyb::arg("name") = "", pyb::arg("n_threads") = 0, pyb::arg("stream") = 0,
        pyb::arg("model_names") = std::vector<std::string>{});
    bind_merge_plan(m);
}

}  // namespace lfm::py
