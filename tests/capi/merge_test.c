/* Embedding test of the C ABI: include lfm.h, link liblfm, merge two arrays, check.
 * Exit code 0 = all checks passed; prints what failed otherwise. */
#include <math.h>
#include <stddef.h>
#include <stdio.h>
#include <string.h>

#include "lfm/lfm.h"

static int failures = 0;
#define CHECK(cond, ...)                      \
    do {                                      \
        if (!(cond)) {                        \
            printf("FAIL %s:%d: ", __FILE__, __LINE__); \
            printf(__VA_ARGS__);              \
            printf("\n");                     \
            ++failures;                       \
        }                                     \
    } while (0)

int main(void) {
    enum { N = 8 };
    float base[N] = {0, 1, 2, 3, 4, 5, 6, 7};
    float a[N], b[N], out[N];
    for (int i = 0; i < N; ++i) {
        a[i] = base[i] + (i % 2 ? 0.5f : -0.25f);
        b[i] = base[i] + (i < 4 ? 0.5f : 0.125f);
    }
    int64_t shape[1] = {N};
    lfm_tensor tb, tm[2], to;
    CHECK(lfm_tensor_init(&tb, base, LFM_DTYPE_F32, LFM_DEVICE_CPU, 1, shape) == LFM_STATUS_OK, "init base");
    lfm_tensor_init(&tm[0], a, LFM_DTYPE_F32, LFM_DEVICE_CPU, 1, shape);
    lfm_tensor_init(&tm[1], b, LFM_DTYPE_F32, LFM_DEVICE_CPU, 1, shape);
    lfm_tensor_init(&to, out, LFM_DTYPE_F32, LFM_DEVICE_CPU, 1, shape);

    /* task arithmetic: out = base + 0.5*(a-base) + 1.0*(b-base) */
    lfm_merge_options o;
    lfm_merge_options_init(&o);
    double w[2] = {0.5, 1.0};
    o.method = LFM_MERGE_TASK_ARITHMETIC;
    o.n_models = 2;
    o.weights = w;
    lfm_status st = lfm_merge(&tb, tm, &to, &o, NULL);
    CHECK(st == LFM_STATUS_OK, "task_arithmetic failed: %s", lfm_last_error());
    for (int i = 0; i < N; ++i) {
        float expect = base[i] + 0.5f * (a[i] - base[i]) + (b[i] - base[i]);
        CHECK(fabsf(out[i] - expect) < 1e-6f, "element %d: %f != %f", i, out[i], expect);
    }

    /* ties with full density: elected sign per element, disjoint mean */
    o.method = LFM_MERGE_TIES;
    o.weights = NULL;
    st = lfm_merge(&tb, tm, &to, &o, NULL);
    CHECK(st == LFM_STATUS_OK, "ties failed: %s", lfm_last_error());
    for (int i = 0; i < N; ++i) {
        float da = a[i] - base[i], db = b[i] - base[i];
        float s = da + db >= 0 ? 1.0f : -1.0f, sum = 0, cnt = 0;
        if (da * s > 0) { sum += da; cnt += 1; }
        if (db * s > 0) { sum += db; cnt += 1; }
        float expect = base[i] + (cnt > 0 ? sum / cnt : 0);
        CHECK(fabsf(out[i] - expect) < 1e-6f, "ties element %d: %f != %f", i, out[i], expect);
    }

    /* errors come back as a status with a message, never an abort */
    double bad_density[2] = {1.5, 0.5};
    o.densities = bad_density;
    st = lfm_merge(&tb, tm, &to, &o, NULL);
    CHECK(st == LFM_STATUS_INVALID_ARGUMENT, "bad density accepted (status %d)", (int)st);
    CHECK(strstr(lfm_last_error(), "density") != NULL, "message does not name density: %s", lfm_last_error());
    o.densities = NULL;
    int64_t short_shape[1] = {N - 1};
    lfm_tensor tshort;
    lfm_tensor_init(&tshort, b, LFM_DTYPE_F32, LFM_DEVICE_CPU, 1, short_shape);
    lfm_tensor mixed[2] = {tm[0], tshort};
    st = lfm_merge(&tb, mixed, &to, &o, NULL);
    CHECK(st == LFM_STATUS_SHAPE_MISMATCH, "shape mismatch accepted (status %d)", (int)st);
    st = lfm_merge(&tb, tm, &to, NULL, NULL);
    CHECK(st == LFM_STATUS_INVALID_ARGUMENT, "NULL options accepted");
    a[3] = NAN;
    st = lfm_merge(&tb, tm, &to, &o, NULL);
    CHECK(st == LFM_STATUS_NONFINITE, "NaN accepted (status %d)", (int)st);
    CHECK(strstr(lfm_last_error(), "model 0") != NULL, "message does not name model 0: %s", lfm_last_error());
    /* model_names: messages name the models */
    const char* names[2] = {"ft-a", "ft-b"};
    o.model_names = names;
    st = lfm_merge(&tb, tm, &to, &o, NULL);
    CHECK(st == LFM_STATUS_NONFINITE && strstr(lfm_last_error(), "model ft-a") != NULL,
          "message does not name ft-a: %s", lfm_last_error());
    /* a caller built against ABI 1's shorter options struct (no model_names) still works */
    a[3] = base[3];
    o.struct_size = offsetof(lfm_merge_options, model_names);
    st = lfm_merge(&tb, tm, &to, &o, NULL);
    CHECK(st == LFM_STATUS_OK, "ABI 1 options refused: %s", lfm_last_error());
    o.struct_size = offsetof(lfm_merge_options, model_names) - 1;
    st = lfm_merge(&tb, tm, &to, &o, NULL);
    CHECK(st == LFM_STATUS_INVALID_ARGUMENT, "a truncated options struct accepted (status %d)", (int)st);
    o.struct_size = sizeof(o);
    /* n_nonfinite_out: the NaN/Inf written to out (here lambda pushes every value past
       float32), counted during the write; an older, shorter struct (without the field) leaves it alone */
    int64_t n_bad = 12345;
    o.model_names = NULL;
    o.n_nonfinite_out = &n_bad;
    o.lambda = 1e39;
    st = lfm_merge(&tb, tm, &to, &o, NULL);
    CHECK(st == LFM_STATUS_OK && n_bad > 0 && n_bad <= N, "overflow not counted: %lld", (long long)n_bad);
    int64_t expect_bad = 0;
    for (int i = 0; i < N; ++i) expect_bad += !isfinite(out[i]);
    CHECK(n_bad == expect_bad, "counted %lld non-finite, out holds %lld", (long long)n_bad, (long long)expect_bad);
    o.lambda = 1.0;
    st = lfm_merge(&tb, tm, &to, &o, NULL);
    CHECK(st == LFM_STATUS_OK && n_bad == 0, "finite result counted %lld", (long long)n_bad);
    n_bad = 12345;
    o.struct_size = offsetof(lfm_merge_options, n_nonfinite_out);
    st = lfm_merge(&tb, tm, &to, &o, NULL);
    CHECK(st == LFM_STATUS_OK && n_bad == 12345, "a struct without n_nonfinite_out had it written");
    o.struct_size = sizeof(o);

    CHECK(lfm_abi_version() == LFM_ABI_VERSION, "ABI version mismatch");
    CHECK(strstr(lfm_build_info(), "\"abi\"") != NULL, "build info: %s", lfm_build_info());
    printf("%s: lfm %s, %d failures\n", failures ? "FAILED" : "OK", lfm_version(), failures);
    return failures ? 1 : 0;
}
