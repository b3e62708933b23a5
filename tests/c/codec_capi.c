/* C ABI smoke test of the codec family: encode -> decode-and-add round trip for int4,
 * sign1 per-row scales, and clear errors for bad arguments. Prints "ok" on success. */
#include <math.h>
#include <stdio.h>
#include <string.h>

#include "lfm/lfm.h"

#define ROWS 6
#define COLS 40
#define GROUP 16

static int failures = 0;
#define CHECK(cond, msg)                                      \
    do {                                                      \
        if (!(cond)) {                                        \
            printf("FAIL %s (%s)\n", msg, lfm_last_error());  \
            ++failures;                                       \
        }                                                     \
    } while (0)

int main(void) {
    float delta[ROWS * COLS], base[ROWS * COLS], out[ROWS * COLS];
    uint8_t packed[ROWS * (COLS / 2)];
    uint16_t scales[ROWS * ((COLS + GROUP - 1) / GROUP)];
    for (int i = 0; i < ROWS * COLS; ++i) {
        delta[i] = 0.01f * (float)((i * 37) % 23 - 11);
        base[i] = 1.0f + 0.001f * (float)i;
    }
    int64_t dshape[2] = {ROWS, COLS}, pshape[2] = {ROWS, COLS / 2}, sshape[2] = {ROWS, (COLS + GROUP - 1) / GROUP};
    lfm_tensor d, p, s, b, o;
    CHECK(lfm_tensor_init(&d, delta, LFM_DTYPE_F32, LFM_DEVICE_CPU, 2, dshape) == LFM_STATUS_OK, "init d");
    lfm_tensor_init(&p, packed, LFM_DTYPE_U8, LFM_DEVICE_CPU, 2, pshape);
    lfm_tensor_init(&s, scales, LFM_DTYPE_F16, LFM_DEVICE_CPU, 2, sshape);
    lfm_tensor_init(&b, base, LFM_DTYPE_F32, LFM_DEVICE_CPU, 2, dshape);
    lfm_tensor_init(&o, out, LFM_DTYPE_F32, LFM_DEVICE_CPU, 2, dshape);
    lfm_codec_options opt;
    lfm_codec_options_init(&opt);
    opt.codec = LFM_CODEC_INT4;
    opt.group_size = GROUP;
    CHECK(lfm_codec_encode(&d, &p, &s, &opt, NULL) == LFM_STATUS_OK, "encode int4");
    CHECK(lfm_codec_decode(&p, &s, &b, &o, &opt, NULL) == LFM_STATUS_OK, "decode int4");
    double err = 0, nrm = 0;
    for (int i = 0; i < ROWS * COLS; ++i) {
        double e = (out[i] - base[i]) - delta[i];
        err += e * e;
        nrm += (double)delta[i] * delta[i];
    }
    CHECK(sqrt(err / nrm) < 0.15, "int4 round-trip error");
    /* nf4: same layout, NF4 code book values */
    opt.codec = LFM_CODEC_NF4;
    CHECK(lfm_codec_encode(&d, &p, &s, &opt, NULL) == LFM_STATUS_OK, "encode nf4");
    CHECK(lfm_codec_decode(&p, &s, &b, &o, &opt, NULL) == LFM_STATUS_OK, "decode nf4");
    err = 0;
    for (int i = 0; i < ROWS * COLS; ++i) {
        double e = (out[i] - base[i]) - delta[i];
        err += e * e;
    }
    CHECK(sqrt(err / nrm) < 0.15, "nf4 round-trip error");
    opt.codec = (lfm_codec)5;
    CHECK(lfm_codec_decode(&p, &s, &b, &o, &opt, NULL) == LFM_STATUS_INVALID_ARGUMENT, "codec 5 refused");
    opt.codec = LFM_CODEC_INT4;
    CHECK(lfm_codec_encode(&d, &p, &s, &opt, NULL) == LFM_STATUS_OK, "encode int4 again");
    /* wrong scales shape -> SHAPE_MISMATCH with a message naming scales */
    int64_t bad[2] = {ROWS, 1};
    lfm_tensor sb;
    lfm_tensor_init(&sb, scales, LFM_DTYPE_F16, LFM_DEVICE_CPU, 2, bad);
    CHECK(lfm_codec_decode(&p, &sb, &b, &o, &opt, NULL) == LFM_STATUS_SHAPE_MISMATCH, "bad scales status");
    CHECK(strstr(lfm_last_error(), "scales") != NULL, "bad scales message");
    /* NaN in the delta -> NONFINITE */
    delta[5] = NAN;
    CHECK(lfm_codec_encode(&d, &p, &s, &opt, NULL) == LFM_STATUS_NONFINITE, "NaN refused");
    /* an options struct that is too small -> INVALID_ARGUMENT */
    opt.struct_size = 4;
    CHECK(lfm_codec_decode(&p, &s, &b, &o, &opt, NULL) == LFM_STATUS_INVALID_ARGUMENT, "struct_size checked");
    /* delta_apply: out-of-range slot */
    lfm_codec_options_init(&opt);
    opt.codec = LFM_CODEC_INT4;
    opt.group_size = GROUP;
    float x[2 * COLS], y[2 * ROWS];
    memset(x, 0, sizeof x);
    memset(y, 0, sizeof y);
    int32_t slots[2] = {0, 1};
    int64_t xs[2] = {2, COLS}, ys[2] = {2, ROWS}, ts[1] = {2};
    lfm_tensor xv, yv, tv;
    lfm_tensor_init(&xv, x, LFM_DTYPE_F32, LFM_DEVICE_CPU, 2, xs);
    lfm_tensor_init(&yv, y, LFM_DTYPE_F32, LFM_DEVICE_CPU, 2, ys);
    lfm_tensor_init(&tv, slots, LFM_DTYPE_I32, LFM_DEVICE_CPU, 1, ts);
    CHECK(lfm_delta_apply(&xv, &p, &s, 1, &tv, &yv, &opt, NULL) == LFM_STATUS_OUT_OF_RANGE, "slot range");
    slots[1] = -1;
    CHECK(lfm_delta_apply(&xv, &p, &s, 1, &tv, &yv, &opt, NULL) == LFM_STATUS_OK, "delta_apply");
    if (failures == 0) printf("ok\n");
    return failures ? 1 : 0;
}
