/*
 * Fused sparsify-and-merge of task vectors (docs/spec/merge.md).
 * Included by lfm/lfm.h; do not include directly.
 */
#ifndef LFM_MERGE_H
#define LFM_MERGE_H

#ifdef __cplusplus
extern "C" {
#endif

typedef LFM_ENUM(lfm_merge_method) {
    LFM_MERGE_TASK_ARITHMETIC = 0,
    LFM_MERGE_TIES = 1,
    LFM_MERGE_DARE_LINEAR = 2,
    LFM_MERGE_DARE_TIES = 3,
    LFM_MERGE_BREADCRUMBS = 4,
    LFM_MERGE_BREADCRUMBS_TIES = 5,
    LFM_MERGE_DELLA_LINEAR = 6,
    LFM_MERGE_DELLA = 7,
    LFM_MERGE_LINEAR = 8
} lfm_merge_method;

typedef LFM_ENUM(lfm_rescale) {
    LFM_RESCALE_NONE = 0,
    LFM_RESCALE_L1 = 1,              /* kept *= ||delta||_1 / ||delta'||_1 (spec) */
    LFM_RESCALE_INVERSE_DENSITY = 2  /* kept *= 1 / density (PEFT, original DARE) */
} lfm_rescale;

#define LFM_MERGE_MAX_MODELS 64

typedef struct lfm_merge_options {
    size_t struct_size;          /* = sizeof(lfm_merge_options), set by init */
    lfm_merge_method method;
    int32_t n_models;            /* K, 1..LFM_MERGE_MAX_MODELS */
    /* NULL below = every model takes the registry default (docs/merge.md's method table) */
    const double* weights;       /* [K] w_i; NULL = the default weight */
    const double* densities;     /* [K] d_i in [0, 1]; NULL = the default density */
    const double* gammas;        /* [K] breadcrumbs gamma in [0, 1]; NULL = the default gamma */
    const double* epsilons;      /* [K] DELLA epsilon; NULL = the default epsilon */
    const int32_t* model_positions; /* [K] Philox stream positions 0..255; NULL = 0..K-1 */
    int32_t normalize;           /* -1 = the method's default, 0 = off, 1 = on */
    int32_t rescale;             /* -1 = the method's default, else an lfm_rescale */
    int32_t consensus_unweighted;/* 0 = elect sign of sum w_i d'_i (spec); 1 = of sum d'_i (PEFT) */
    int32_t disjoint_count;      /* 0 = divide by sum of agreeing w_i (spec); 1 = by their count (PEFT) */
    double lambda;               /* out = base + lambda * mixed */
    uint64_t seed;               /* Philox key for DARE / DELLA */
    const char* tensor_name;     /* UTF-8 output tensor name (Philox stream id); NULL = "" */
    int32_t n_threads;           /* CPU workers for this call; 0 = library default */
    /* added after ABI 1 (a caller passing the shorter struct_size gets NULL): */
    const char* const* model_names; /* [K] UTF-8 names used in error messages ("model NAME");
                                       NULL = "model <index>" */
    /* added later still (a struct_size without it: nothing is counted or written): */
    int64_t* n_nonfinite_out;    /* out: when not NULL, set to the number of NaN/Inf elements
                                    written to `out` (finite inputs whose merged values overflow
                                    the output dtype), counted on the CPU while the output is
                                    written; a CUDA call sets -1 (not counted: check the output) */
} lfm_merge_options;

LFM_API void lfm_merge_options_init(lfm_merge_options* opts);

/*
 * out = merge(base, models[0..K-1]) elementwise over the flat tensor.
 * base: same shape as every model; may be NULL only for LFM_MERGE_LINEAR.
 * models: array of K views. out: caller-allocated, same shape, any float dtype.
 * Inputs may mix f32/f16/bf16. All views contiguous and on one device; for CUDA
 * views `stream` is a cudaStream_t (NULL = default stream), ignored on the CPU.
 * NaN/Inf in the inputs -> LFM_STATUS_NONFINITE (out is then unspecified).
 */
LFM_API lfm_status lfm_merge(const lfm_tensor* base, const lfm_tensor* models, const lfm_tensor* out,
                             const lfm_merge_options* opts, void* stream);

#ifdef __cplusplus
}
#endif

#endif /* LFM_MERGE_H */
