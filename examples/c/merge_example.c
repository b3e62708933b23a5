/* merge_example.c: TIES-merge three bf16 fine-tunes of one weight matrix with liblfm.
 *
 * What an embedding runtime does with the C ABI (include/lfm/lfm.h):
 *   1. describe its buffers as lfm_tensor views (no copies; the caller owns the memory),
 *   2. fill an lfm_merge_options struct (always through lfm_merge_options_init first),
 *   3. call lfm_merge and check the returned lfm_status; lfm_last_error() says what went wrong.
 *
 * The program also recomputes the merge in plain C from the definition (docs/spec/merge.md:
 * keep the k = floor(d*n) largest |delta| of each model, ties to the lower index; weight;
 * elect the sign of the weighted sum; average the agreeing entries; add to the base) and
 * checks that every element agrees within one bf16 rounding. It prints "OK" and exits 0
 * when it does.
 *
 * Build (from a source checkout; CMake: -DLFM_BUILD_EXAMPLES=ON builds it as merge_example):
 *   cc -std=c99 examples/c/merge_example.c -Iinclude -Llfm_engine -llfm -Wl,-rpath,$PWD/lfm_engine -lm
 * or against an installed package:
 *   INC=$(python -c 'import lfm_engine; print(lfm_engine.get_include())')
 *   LIB=$(python -c 'import lfm_engine; print(lfm_engine.get_library())')
 *   cc -std=c99 merge_example.c -I$INC $LIB -Wl,-rpath,$(dirname $LIB) -lm -o merge_example
 */
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "lfm/lfm.h"

enum { ROWS = 64, COLS = 96, N = ROWS * COLS, K = 3 };

/* bf16 <-> float (bf16 is the top half of an IEEE float; round to nearest even) */
static uint16_t to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    u += 0x7FFFu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}
static float from_bf16(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

/* a small deterministic generator (xorshift64*) for reproducible "weights" */
static uint64_t rng_state = 0x9E3779B97F4A7C15ull;
static float uniform_pm1(void) {
    rng_state ^= rng_state >> 12;
    rng_state ^= rng_state << 25;
    rng_state ^= rng_state >> 27;
    uint64_t r = rng_state * 0x2545F4914F6CDD1Dull;
    return (float)((double)(r >> 11) / 9007199254740992.0 * 2.0 - 1.0);
}

/* ---- plain-C TIES from the definition, for the check ---- */
static const float* sort_mag;
static int by_magnitude_desc(const void* a, const void* b) {
    int64_t i = *(const int64_t*)a, j = *(const int64_t*)b;
    float mi = fabsf(sort_mag[i]), mj = fabsf(sort_mag[j]);
    if (mi != mj) return mi > mj ? -1 : 1;
    return i < j ? -1 : 1; /* equal magnitudes: the lower flat index wins */
}

static void ties_reference(const uint16_t* base, uint16_t* const* ft, const double* w, const double* d,
                           float* out) {
    static float delta[K][N];
    static unsigned char keep[K][N];
    static int64_t order[N];
    for (int i = 0; i < K; ++i) {
        for (int e = 0; e < N; ++e) delta[i][e] = from_bf16(ft[i][e]) - from_bf16(base[e]);
        int64_t k = d[i] >= 1.0 ? N : (d[i] <= 0.0 ? 0 : (int64_t)floor(d[i] * N));
        if (d[i] > 0.0 && k < 1) k = 1;
        for (int e = 0; e < N; ++e) order[e] = e;
        sort_mag = delta[i];
        qsort(order, N, sizeof(int64_t), by_magnitude_desc);
        memset(keep[i], 0, N);
        for (int64_t r = 0; r < k; ++r) keep[i][order[r]] = 1;
    }
    for (int e = 0; e < N; ++e) {
        double t[K], sum = 0.0;
        for (int i = 0; i < K; ++i) {
            t[i] = keep[i][e] ? w[i] * delta[i][e] : 0.0;
            sum += t[i];
        }
        double s = sum >= 0.0 ? 1.0 : -1.0, mixed = 0.0, divisor = 0.0;
        for (int i = 0; i < K; ++i) {
            if (t[i] != 0.0 && (t[i] > 0.0) == (s > 0.0)) {
                mixed += t[i];
                divisor += w[i];
            }
        }
        if (divisor == 0.0) divisor = 1.0;
        out[e] = (float)(from_bf16(base[e]) + mixed / divisor); /* ties normalizes by default */
    }
}

int main(void) {
    printf("liblfm %s, build %s\n", lfm_version(), lfm_build_info());

    /* a bf16 base weight and three fine-tunes (base + small task vectors) */
    static uint16_t base[N], ft_data[K][N], out[N];
    uint16_t* ft[K] = {ft_data[0], ft_data[1], ft_data[2]};
    for (int e = 0; e < N; ++e) base[e] = to_bf16(0.05f * uniform_pm1());
    for (int i = 0; i < K; ++i)
        for (int e = 0; e < N; ++e) ft[i][e] = to_bf16(from_bf16(base[e]) + 0.01f * uniform_pm1());

    /* 1. views: [ROWS, COLS] bf16 on the CPU, contiguous */
    int64_t shape[2] = {ROWS, COLS};
    lfm_tensor t_base, t_models[K], t_out;
    lfm_tensor_init(&t_base, base, LFM_DTYPE_BF16, LFM_DEVICE_CPU, 2, shape);
    for (int i = 0; i < K; ++i) lfm_tensor_init(&t_models[i], ft[i], LFM_DTYPE_BF16, LFM_DEVICE_CPU, 2, shape);
    lfm_tensor_init(&t_out, out, LFM_DTYPE_BF16, LFM_DEVICE_CPU, 2, shape);

    /* 2. options: TIES with mergekit's parameter names (weight, density per model) */
    double weights[K] = {0.5, 0.3, 0.2};
    double densities[K] = {0.3, 0.5, 0.2};
    lfm_merge_options opt;
    lfm_merge_options_init(&opt); /* defaults: normalize/rescale per method, lambda 1, seed 0 */
    opt.method = LFM_MERGE_TIES;
    opt.n_models = K;
    opt.weights = weights;
    opt.densities = densities;
    opt.tensor_name = "model.layers.0.mlp.up_proj.weight"; /* names the Philox stream (DARE/DELLA) */

    /* 3. merge */
    lfm_status st = lfm_merge(&t_base, t_models, &t_out, &opt, NULL);
    if (st != LFM_STATUS_OK) {
        fprintf(stderr, "lfm_merge failed (%d): %s\n", (int)st, lfm_last_error());
        return 1;
    }

    /* check against the definition */
    static float expect[N];
    ties_reference(base, ft, weights, densities, expect);
    int bad = 0, changed = 0;
    double worst = 0.0;
    for (int e = 0; e < N; ++e) {
        float got = from_bf16(out[e]);
        float ulp = fabsf(from_bf16(to_bf16(expect[e]))) * 0.0078125f; /* 2^-7: one bf16 step */
        double err = fabs((double)got - expect[e]);
        if (err > worst) worst = err;
        if (!(err <= ulp || err <= 1e-30)) ++bad;
        changed += out[e] != base[e];
    }
    printf("TIES merge of %d bf16 models [%d x %d]: %d of %d elements changed, max |err| vs plain C %.2e\n", K,
           ROWS, COLS, changed, N, worst);

    /* errors are values, not crashes: a wrong output shape is refused with a message */
    int64_t wrong[2] = {ROWS, COLS - 1};
    lfm_tensor t_wrong;
    lfm_tensor_init(&t_wrong, out, LFM_DTYPE_BF16, LFM_DEVICE_CPU, 2, wrong);
    st = lfm_merge(&t_base, t_models, &t_wrong, &opt, NULL);
    printf("merge into a [%d x %d] output: status %d, \"%s\"\n", ROWS, COLS - 1, (int)st, lfm_last_error());

    if (bad || st == LFM_STATUS_OK || changed == 0) {
        printf("FAILED: %d elements off by more than one bf16 rounding\n", bad);
        return 1;
    }
    printf("OK\n");
    return 0;
}
