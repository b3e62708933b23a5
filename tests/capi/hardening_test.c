/* Bad input through the C ABI (issue 11, "hardening"): each case must return the named
 * error status, write nothing, and (under tools/sanitize_check.sh) raise no sanitizer
 * report: out-of-range enum codes, element counts that overflow int64, NULL outputs,
 * and the exact-election repro (weights 0.5, 0.3). Prints OK when every case passed. */
#include <lfm/lfm.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

static int failures = 0;

static void expect(lfm_status got, lfm_status want, const char* what) {
    if (got != want) {
        printf("FAIL %s: status %d (%s), want %d; error: %s\n", what, (int)got, lfm_status_string(got), (int)want,
               lfm_last_error());
        ++failures;
    }
}

int main(void) {
    float xs[2][4], b[4] = {0, 0, 0, 0}, out[4];
    int64_t n4 = 4;
    lfm_tensor base, models[2], o;
    expect(lfm_tensor_init(&base, b, LFM_DTYPE_F32, LFM_DEVICE_CPU, 1, &n4), LFM_STATUS_OK, "init base");
    expect(lfm_tensor_init(&o, out, LFM_DTYPE_F32, LFM_DEVICE_CPU, 1, &n4), LFM_STATUS_OK, "init out");
    for (int i = 0; i < 4; ++i) {
        xs[0][i] = -0.0029296875f;
        xs[1][i] = 0.0048828125f;
    }
    for (int k = 0; k < 2; ++k)
        expect(lfm_tensor_init(&models[k], xs[k], LFM_DTYPE_F32, LFM_DEVICE_CPU, 1, &n4), LFM_STATUS_OK, "init x");

    /* lfm_tensor_init: enum codes and overflowing shapes */
    lfm_tensor t;
    expect(lfm_tensor_init(&t, b, (lfm_dtype)-1, LFM_DEVICE_CPU, 1, &n4), LFM_STATUS_UNSUPPORTED_DTYPE, "dtype -1");
    expect(lfm_tensor_init(&t, b, (lfm_dtype)42, LFM_DEVICE_CPU, 1, &n4), LFM_STATUS_UNSUPPORTED_DTYPE, "dtype 42");
    expect(lfm_tensor_init(&t, b, LFM_DTYPE_F32, (lfm_device_type)5, 1, &n4), LFM_STATUS_INVALID_ARGUMENT, "device 5");
    int64_t huge[2] = {INT64_MAX / 2, 5};
    expect(lfm_tensor_init(&t, b, LFM_DTYPE_F32, LFM_DEVICE_CPU, 2, huge), LFM_STATUS_INVALID_ARGUMENT,
           "shape overflow");
    /* a refused init leaves the tensor as it was (nothing half-written) */
    t.ndim = 3;
    t.data = xs;
    int64_t neg[2] = {2, -1};
    expect(lfm_tensor_init(&t, b, LFM_DTYPE_F32, LFM_DEVICE_CPU, 2, neg), LFM_STATUS_INVALID_ARGUMENT, "negative dim");
    if (t.ndim != 3 || t.data != (void*)xs) {
        printf("FAIL refused lfm_tensor_init wrote the tensor\n");
        ++failures;
    }

    /* the exact election: 0.5 * -0.0029296875 + 0.3 * 0.0048828125 == 0 in float64 -> sign +1 */
    double w[2] = {0.5, 0.3};
    lfm_merge_options mo;
    lfm_merge_options_init(&mo);
    mo.method = LFM_MERGE_TIES;
    mo.n_models = 2;
    mo.weights = w;
    expect(lfm_merge(&base, models, &o, &mo, NULL), LFM_STATUS_OK, "ties repro");
    for (int i = 0; i < 4; ++i)
        if (out[i] != 0.0048828125f) {
            printf("FAIL ties repro: out[%d] = %.10g, want 0.0048828125 (elected sign must be +1)\n", i, out[i]);
            ++failures;
        }

    /* lfm_merge: enum codes read before conversion, views with bad codes or counts */
    lfm_merge_options bad = mo;
    bad.method = (lfm_merge_method)-1;
    expect(lfm_merge(&base, models, &o, &bad, NULL), LFM_STATUS_INVALID_ARGUMENT, "method -1");
    lfm_tensor bt = base;
    bt.dtype = (lfm_dtype)42;
    expect(lfm_merge(&bt, models, &o, &mo, NULL), LFM_STATUS_UNSUPPORTED_DTYPE, "base dtype 42");
    bt = base;
    bt.device = (lfm_device_type)7;
    expect(lfm_merge(&bt, models, &o, &mo, NULL), LFM_STATUS_INVALID_ARGUMENT, "base device 7");
    bt = base;
    bt.ndim = 2;
    bt.shape[0] = INT64_MAX / 2;
    bt.shape[1] = 3;
    expect(lfm_merge(&bt, models, &o, &mo, NULL), LFM_STATUS_INVALID_ARGUMENT, "base numel overflow");
    expect(lfm_merge(&base, NULL, &o, &mo, NULL), LFM_STATUS_INVALID_ARGUMENT, "models NULL");
    expect(lfm_merge(&base, models, NULL, &mo, NULL), LFM_STATUS_INVALID_ARGUMENT, "out NULL");

    /* codec: codec code -1 */
    lfm_codec_options co;
    lfm_codec_options_init(&co);
    co.codec = (lfm_codec)-1;
    expect(lfm_codec_encode(&base, &o, &o, &co, NULL), LFM_STATUS_INVALID_ARGUMENT, "codec -1");

    /* lora: shrink with a NULL u; expand with an offset that overflows off + H_out */
    float A[1 * 2 * 4], B[1 * 4 * 2], x[1 * 4], u[1 * 2], y[1 * 4], sc[1] = {1.0f};
    int32_t ranks[1] = {2}, slot[1] = {0};
    memset(A, 0, sizeof A);
    memset(B, 0, sizeof B);
    memset(x, 0, sizeof x);
    memset(y, 0, sizeof y);
    int64_t sa[3] = {1, 2, 4}, sb[3] = {1, 4, 2}, sx[2] = {1, 4}, su[2] = {1, 2}, s1 = 1;
    lfm_tensor tA, tB, tx, tu, ty, tr, ts, tslot;
    lfm_tensor_init(&tA, A, LFM_DTYPE_F32, LFM_DEVICE_CPU, 3, sa);
    lfm_tensor_init(&tB, B, LFM_DTYPE_F32, LFM_DEVICE_CPU, 3, sb);
    lfm_tensor_init(&tx, x, LFM_DTYPE_F32, LFM_DEVICE_CPU, 2, sx);
    lfm_tensor_init(&tu, u, LFM_DTYPE_F32, LFM_DEVICE_CPU, 2, su);
    lfm_tensor_init(&ty, y, LFM_DTYPE_F32, LFM_DEVICE_CPU, 2, sx);
    lfm_tensor_init(&tr, ranks, LFM_DTYPE_I32, LFM_DEVICE_CPU, 1, &s1);
    lfm_tensor_init(&ts, sc, LFM_DTYPE_F32, LFM_DEVICE_CPU, 1, &s1);
    lfm_tensor_init(&tslot, slot, LFM_DTYPE_I32, LFM_DEVICE_CPU, 1, &s1);
    lfm_lora_slice sl = {&tA, &tB, &tr, &ts, 0};
    expect(lfm_lora_shrink(&tx, &sl, 1, &tslot, NULL, NULL, &tu, NULL, NULL), LFM_STATUS_OK, "shrink ok");
    expect(lfm_lora_shrink(&tx, &sl, 1, &tslot, NULL, NULL, NULL, NULL, NULL), LFM_STATUS_INVALID_ARGUMENT,
           "shrink u NULL");
    sl.y_col_offset = INT64_MAX - 3;
    expect(lfm_lora_expand(&tu, &sl, 1, &tslot, NULL, NULL, &ty, NULL, NULL), LFM_STATUS_OUT_OF_RANGE,
           "expand offset overflow");

    if (failures) return 1;
    printf("OK\n");
    return 0;
}
