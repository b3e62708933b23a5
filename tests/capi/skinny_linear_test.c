/* C ABI test of lfm_skinny_linear: y = x W^T + b for M = 1..16 against a double reference
 * within the spec's bound (docs/spec/skinny_linear.md), fp32 and bf16 weights, every
 * output written; clear statuses for bad arguments. Prints "OK" on success. Also run under
 * qemu-aarch64 (tools/aarch64_check.sh) at LFM_SIMD=baseline and neon. */
#include <math.h>
#include <stdio.h>
#include <string.h>

#include "lfm/lfm.h"

#define N 19
#define K 37
#define MAXM LFM_SKINNY_LINEAR_MAX_M

static int failures = 0;
#define CHECK(cond, msg)                                      \
    do {                                                      \
        if (!(cond)) {                                        \
            printf("FAIL %s (%s)\n", msg, lfm_last_error());  \
            ++failures;                                       \
        }                                                     \
    } while (0)

static uint16_t to_bf16(float f) { /* truncation is fine: the reference reads the bf16 back */
    uint32_t u;
    memcpy(&u, &f, 4);
    return (uint16_t)(u >> 16);
}
static float from_bf16(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

int main(void) {
    static float x[MAXM * K], w[N * K], wr[N * K], b[N], y[(MAXM + 1) * N];
    static uint16_t wb[N * K];
    for (int i = 0; i < MAXM * K; ++i) x[i] = (float)((i * 29) % 31 - 15) / 8.0f;
    for (int i = 0; i < N * K; ++i) {
        w[i] = (float)((i * 17) % 13 - 6) / 3.0f;
        wb[i] = to_bf16(w[i]);
    }
    for (int i = 0; i < N; ++i) b[i] = 0.25f * (float)(i - 9);
    int64_t wshape[2] = {N, K}, bshape[1] = {N};
    lfm_tensor wt, wbt, bt, xt, yt;
    lfm_tensor_init(&wt, w, LFM_DTYPE_F32, LFM_DEVICE_CPU, 2, wshape);
    lfm_tensor_init(&wbt, wb, LFM_DTYPE_BF16, LFM_DEVICE_CPU, 2, wshape);
    lfm_tensor_init(&bt, b, LFM_DTYPE_F32, LFM_DEVICE_CPU, 1, bshape);
    for (int pass = 0; pass < 2; ++pass) {
        const lfm_tensor* W = pass ? &wbt : &wt;
        for (int i = 0; i < N * K; ++i) wr[i] = pass ? from_bf16(wb[i]) : w[i];
        for (int M = 1; M <= MAXM; ++M) {
            int64_t xshape[2] = {M, K}, yshape[2] = {M, N};
            lfm_tensor_init(&xt, x, LFM_DTYPE_F32, LFM_DEVICE_CPU, 2, xshape);
            lfm_tensor_init(&yt, y, LFM_DTYPE_F32, LFM_DEVICE_CPU, 2, yshape);
            for (int i = 0; i < M * N; ++i) y[i] = NAN;
            CHECK(lfm_skinny_linear(&xt, W, &bt, &yt, NULL) == LFM_STATUS_OK, "skinny_linear");
            for (int m = 0; m < M; ++m)
                for (int n = 0; n < N; ++n) {
                    double exact = b[n], mag = fabs(b[n]);
                    for (int k = 0; k < K; ++k) {
                        exact += (double)x[m * K + k] * wr[n * K + k];
                        mag += fabs((double)x[m * K + k] * wr[n * K + k]);
                    }
                    const double bound = (K + 2) * ldexp(1.0, -24) * mag + ldexp(fabs(exact), -24);
                    if (!(fabs(y[m * N + n] - exact) <= bound)) {
                        printf("FAIL pass %d M %d y[%d,%d] = %.9g, exact %.9g\n", pass, M, m, n, y[m * N + n], exact);
                        ++failures;
                    }
                }
        }
    }
    /* bad arguments */
    int64_t x17[2] = {MAXM + 1, K}, y17[2] = {MAXM + 1, N}, ybad[2] = {2, N + 1}, x2[2] = {2, K};
    lfm_tensor_init(&xt, x, LFM_DTYPE_F32, LFM_DEVICE_CPU, 2, x17);
    lfm_tensor_init(&yt, y, LFM_DTYPE_F32, LFM_DEVICE_CPU, 2, y17);
    CHECK(lfm_skinny_linear(&xt, &wt, NULL, &yt, NULL) == LFM_STATUS_INVALID_ARGUMENT, "M > max refused");
    CHECK(strstr(lfm_last_error(), "at most") != NULL, "M > max message");
    lfm_tensor_init(&xt, x, LFM_DTYPE_F32, LFM_DEVICE_CPU, 2, x2);
    lfm_tensor_init(&yt, y, LFM_DTYPE_F32, LFM_DEVICE_CPU, 2, ybad);
    CHECK(lfm_skinny_linear(&xt, &wt, NULL, &yt, NULL) == LFM_STATUS_SHAPE_MISMATCH, "y shape refused");
    lfm_tensor wi;
    lfm_tensor_init(&wi, w, LFM_DTYPE_I32, LFM_DEVICE_CPU, 2, wshape);
    int64_t yok[2] = {2, N};
    lfm_tensor_init(&yt, y, LFM_DTYPE_F32, LFM_DEVICE_CPU, 2, yok);
    CHECK(lfm_skinny_linear(&xt, &wi, NULL, &yt, NULL) == LFM_STATUS_UNSUPPORTED_DTYPE, "int weight refused");
    lfm_skinny_linear_options o;
    lfm_skinny_linear_options_init(&o);
    o.struct_size = 1;
    CHECK(lfm_skinny_linear(&xt, &wt, NULL, &yt, &o) == LFM_STATUS_INVALID_ARGUMENT, "old options refused");
    lfm_skinny_linear_options_init(&o);
    o.n_threads = 2;
    CHECK(lfm_skinny_linear(&xt, &wt, &bt, &yt, &o) == LFM_STATUS_OK, "n_threads 2");
    CHECK(lfm_skinny_linear(&xt, &wt, NULL, NULL, NULL) == LFM_STATUS_INVALID_ARGUMENT, "NULL y refused");
    if (failures) return 1;
    printf("OK: %d M values x 2 weight dtypes\n", MAXM);
    return 0;
}
