/* Multi-LoRA through the C ABI: two slices (fused output), token and segment form, shrink +
 * expand == apply, heterogeneous ranks, slot -1, and an out-of-range slot refused. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "lfm/lfm.h"

#define T 5
#define HIN 19
#define NS 3
#define R 4
#define H0 7
#define H1 3
#define HY (H0 + H1 + 2)

static float frand(unsigned* s) {
    *s = *s * 1103515245u + 12345u;
    return ((float)((*s >> 8) & 0xffff) / 65536.0f) - 0.5f;
}

static int fail(const char* what, lfm_status st) {
    printf("FAIL %s: %s (%s)\n", what, lfm_status_string(st), lfm_last_error());
    return 1;
}

int main(void) {
    unsigned seed = 7;
    static float x[T][HIN], A0[NS][R][HIN], A1[NS][R][HIN], B0[NS][H0][R], B1[NS][H1][R];
    static float y[T][HY], y2[T][HY], y3[T][HY], expect[T][HY], u[2][T][R];
    int32_t ranks[NS] = {4, 1, 3}, ts[T] = {2, -1, 0, 2, 1};
    int32_t seg_start[5] = {0, 1, 2, 4, 5}, seg_slot[4] = {2, -1, 0, 1};  /* differs at token 3 */
    float scales[NS] = {0.5f, 2.0f, 1.0f};
    float *flat[] = {&x[0][0], &A0[0][0][0], &A1[0][0][0], &B0[0][0][0], &B1[0][0][0]};
    size_t sizes[] = {T * HIN, NS * R * HIN, NS * R * HIN, NS * H0 * R, NS * H1 * R};
    for (int k = 0; k < 5; ++k)
        for (size_t i = 0; i < sizes[k]; ++i) flat[k][i] = frand(&seed);
    for (int t = 0; t < T; ++t)
        for (int o = 0; o < HY; ++o) y[t][o] = y2[t][o] = y3[t][o] = expect[t][o] = frand(&seed);

    /* expected result, naive */
    for (int t = 0; t < T; ++t) {
        int s = ts[t];
        if (s < 0) continue;
        for (int sl = 0; sl < 2; ++sl) {
            int H = sl ? H1 : H0, off = sl ? H0 + 2 : 0;
            double uu[R] = {0};
            for (int j = 0; j < ranks[s]; ++j)
                for (int k = 0; k < HIN; ++k) uu[j] += (double)x[t][k] * (sl ? A1 : A0)[s][j][k];
            for (int o = 0; o < H; ++o) {
                double d = 0;
                for (int j = 0; j < ranks[s]; ++j) d += uu[j] * (sl ? B1[s][o][j] : B0[s][o][j]);
                expect[t][off + o] += (float)(scales[s] * d);
            }
        }
    }

    lfm_tensor tx, tA0, tA1, tB0, tB1, tr, tsc, tts, ty, ty2, ty3, tu, tss, tsl;
    int64_t sx[2] = {T, HIN}, sa[3] = {NS, R, HIN}, sb0[3] = {NS, H0, R}, sb1[3] = {NS, H1, R};
    int64_t sn[1] = {NS}, st[1] = {T}, sy[2] = {T, HY}, su[3] = {2, T, R}, s5[1] = {5}, s4[1] = {4};
    lfm_tensor_init(&tx, x, LFM_DTYPE_F32, LFM_DEVICE_CPU, 2, sx);
    lfm_tensor_init(&tA0, A0, LFM_DTYPE_F32, LFM_DEVICE_CPU, 3, sa);
    lfm_tensor_init(&tA1, A1, LFM_DTYPE_F32, LFM_DEVICE_CPU, 3, sa);
    lfm_tensor_init(&tB0, B0, LFM_DTYPE_F32, LFM_DEVICE_CPU, 3, sb0);
    lfm_tensor_init(&tB1, B1, LFM_DTYPE_F32, LFM_DEVICE_CPU, 3, sb1);
    lfm_tensor_init(&tr, ranks, LFM_DTYPE_I32, LFM_DEVICE_CPU, 1, sn);
    lfm_tensor_init(&tsc, scales, LFM_DTYPE_F32, LFM_DEVICE_CPU, 1, sn);
    lfm_tensor_init(&tts, ts, LFM_DTYPE_I32, LFM_DEVICE_CPU, 1, st);
    lfm_tensor_init(&ty, y, LFM_DTYPE_F32, LFM_DEVICE_CPU, 2, sy);
    lfm_tensor_init(&ty2, y2, LFM_DTYPE_F32, LFM_DEVICE_CPU, 2, sy);
    lfm_tensor_init(&ty3, y3, LFM_DTYPE_F32, LFM_DEVICE_CPU, 2, sy);
    lfm_tensor_init(&tu, u, LFM_DTYPE_F32, LFM_DEVICE_CPU, 3, su);
    lfm_tensor_init(&tss, seg_start, LFM_DTYPE_I32, LFM_DEVICE_CPU, 1, s5);
    lfm_tensor_init(&tsl, seg_slot, LFM_DTYPE_I32, LFM_DEVICE_CPU, 1, s4);

    lfm_lora_slice sl[2] = {{&tA0, &tB0, &tr, &tsc, 0}, {&tA1, &tB1, &tr, &tsc, H0 + 2}};
    lfm_lora_options opts;
    lfm_lora_options_init(&opts);
    lfm_status s;
    if ((s = lfm_lora_apply(&tx, sl, 2, &tts, NULL, NULL, &ty, &opts, NULL)) != LFM_STATUS_OK) return fail("apply", s);
    if ((s = lfm_lora_shrink(&tx, sl, 2, &tts, NULL, NULL, &tu, &opts, NULL)) != LFM_STATUS_OK) return fail("shrink", s);
    if ((s = lfm_lora_expand(&tu, sl, 2, &tts, NULL, NULL, &ty2, &opts, NULL)) != LFM_STATUS_OK) return fail("expand", s);
    for (int t = 0; t < T; ++t)
        for (int o = 0; o < HY; ++o)
            if (fabsf(y[t][o] - expect[t][o]) > 1e-5f || fabsf(y2[t][o] - expect[t][o]) > 1e-5f) {
                printf("FAIL value y[%d][%d] = %g / %g, expected %g\n", t, o, y[t][o], y2[t][o], expect[t][o]);
                return 1;
            }
    if (u[0][1][0] != 0.0f || u[0][4][1] != 0.0f) { printf("FAIL u not zero beyond rank / for slot -1\n"); return 1; }

    /* segment form: token 3 uses slot 0 instead of 2 here, token 4 slot 1 */
    if ((s = lfm_lora_apply(&tx, sl, 2, NULL, &tss, &tsl, &ty3, &opts, NULL)) != LFM_STATUS_OK) return fail("segments", s);
    for (int o = 0; o < HY; ++o)
        if (y3[0][o] != y[0][o] || y3[2][o] != y[2][o] || y3[1][o] != y[1][o]) {
            printf("FAIL segment form differs from token form on shared tokens\n");
            return 1;
        }

    /* out-of-range slot: refused before any write */
    ts[3] = NS;
    memcpy(y3, y, sizeof(y));
    s = lfm_lora_apply(&tx, sl, 2, &tts, NULL, NULL, &ty3, &opts, NULL);
    if (s != LFM_STATUS_OUT_OF_RANGE || !strstr(lfm_last_error(), "token_slot[3]")) return fail("expected OUT_OF_RANGE", s);
    if (memcmp(y3, y, sizeof(y)) != 0) { printf("FAIL y written by a refused call\n"); return 1; }
    /* overlapping slices refused */
    ts[3] = 2;
    sl[1].y_col_offset = 3;
    s = lfm_lora_apply(&tx, sl, 2, &tts, NULL, NULL, &ty3, &opts, NULL);
    if (s != LFM_STATUS_INVALID_ARGUMENT) return fail("expected INVALID_ARGUMENT for overlap", s);
    /* an offset whose sum with H_out overflows int64 must not pass the bounds check */
    sl[1].y_col_offset = INT64_MAX - 3;
    memcpy(y3, y, sizeof(y));
    s = lfm_lora_apply(&tx, sl, 2, &tts, NULL, NULL, &ty3, &opts, NULL);
    if (s != LFM_STATUS_OUT_OF_RANGE) return fail("expected OUT_OF_RANGE for an overflowing offset", s);
    s = lfm_lora_expand(&tu, sl, 2, &tts, NULL, NULL, &ty3, &opts, NULL);
    if (s != LFM_STATUS_OUT_OF_RANGE) return fail("expected OUT_OF_RANGE for an overflowing offset (expand)", s);
    if (memcmp(y3, y, sizeof(y)) != 0) { printf("FAIL y written by a refused call\n"); return 1; }
    sl[1].y_col_offset = 3;
    /* a worker count from input is bounded (per-worker scratch would be huge) */
    opts.n_threads = 0x7fffffff;
    s = lfm_lora_apply(&tx, sl, 2, &tts, NULL, NULL, &ty3, &opts, NULL);
    if (s != LFM_STATUS_INVALID_ARGUMENT) return fail("expected INVALID_ARGUMENT for n_threads = 2^31 - 1", s);
    if (lfm_set_num_threads(0x7fffffff) != LFM_STATUS_INVALID_ARGUMENT) return fail("set_num_threads(2^31-1)", s);
    printf("OK\n");
    return 0;
}
