/* Bounded, seeded fuzz of every exported lfm_ entry point, for the sanitizer job
 * (tools/sanitize_check.sh builds liblfm and this program with ASan + UBSan).
 *
 * Each case builds random arguments: tensor views with valid or garbage dtype/device
 * codes, ndim, shapes (negative, huge, mismatched), NULL pointers, options with
 * out-of-range enums, NaN/negative/huge parameters, offsets near INT64_MAX. Data
 * buffers are always honest for the shape they claim (at most MAX_ELEMS elements, or
 * no buffer when the shape is huge and the data pointer is NULL), so any memory error
 * the sanitizers report is the library's. The library may accept or refuse a case;
 * what it must never do is crash, read or write out of bounds, or hit undefined
 * behaviour. It must also leave a message for every non-OK status.
 *
 * usage: abi_fuzz [cases] [seed]     (default 3000 cases, seed 1)
 */
#include <lfm/lfm.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define MAX_ELEMS 64
#define MAX_TENSORS 64

static uint64_t g_state;
static uint64_t next_u64(void) { /* splitmix64 */
    uint64_t z = (g_state += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}
static int rnd(int n) { return (int)(next_u64() % (uint64_t)n); }
static int chance(int pct) { return rnd(100) < pct; }

static void* g_bufs[MAX_TENSORS * 4];
static int g_nbufs;
static lfm_tensor g_views[MAX_TENSORS];
static int g_nviews;

static void* alloc_buf(size_t bytes) {
    void* p = malloc(bytes ? bytes : 1);
    unsigned char* c = (unsigned char*)p;
    for (size_t i = 0; i < bytes; ++i) c[i] = (unsigned char)next_u64();
    if (g_nbufs < (int)(sizeof g_bufs / sizeof g_bufs[0])) g_bufs[g_nbufs++] = p;
    return p;
}

static void free_all(void) {
    for (int i = 0; i < g_nbufs; ++i) free(g_bufs[i]);
    g_nbufs = 0;
    g_nviews = 0;
}

static int32_t any_code(int valid_max) {
    switch (rnd(6)) {
        case 0: return -1;
        case 1: return valid_max + 1 + rnd(40);
        case 2: return (int32_t)next_u64();
        default: return rnd(valid_max + 1);
    }
}

static size_t elem_size(int32_t dt) {
    switch (dt) {
        case LFM_DTYPE_F32: case LFM_DTYPE_I32: case LFM_DTYPE_U32: return 4;
        case LFM_DTYPE_F16: case LFM_DTYPE_BF16: return 2;
        case LFM_DTYPE_I64: return 8;
        default: return 1;
    }
}

/* Fill float32 buffers with small values (sometimes NaN/Inf), int buffers with small ints. */
static void fill(lfm_tensor* t, int64_t n) {
    if (!t->data) return;
    int32_t dt = (int32_t)t->dtype;
    for (int64_t i = 0; i < n; ++i) {
        if (dt == LFM_DTYPE_F32) {
            float v = (float)(rnd(2001) - 1000) / 500.0f;
            if (chance(1)) v = chance(50) ? NAN : INFINITY;
            ((float*)t->data)[i] = v;
        } else if (dt == LFM_DTYPE_I32) {
            ((int32_t*)t->data)[i] = rnd(10) - 2;
        } else if (dt == LFM_DTYPE_I64) {
            ((int64_t*)t->data)[i] = rnd(10) - 2;
        }
    }
}

/* A view of rank `ndim` (or a random rank); shapes small unless `wild`. */
static lfm_tensor* make_view(int ndim_hint, const int64_t* shape_hint, int32_t dtype_hint) {
    if (g_nviews >= MAX_TENSORS) return NULL;
    if (chance(3)) return NULL;
    lfm_tensor* t = &g_views[g_nviews++];
    memset(t, 0, sizeof *t);
    int ndim = ndim_hint >= 0 && !chance(10) ? ndim_hint : rnd(4);
    if (chance(2)) ndim = chance(50) ? -1 : LFM_MAX_DIMS + 1;
    int32_t dt = dtype_hint >= 0 && !chance(10) ? dtype_hint : any_code(7);
    int wild = chance(5);
    int64_t n = 1;
    int d = ndim < 0 ? 0 : (ndim > LFM_MAX_DIMS ? LFM_MAX_DIMS : ndim);
    for (int i = 0; i < d; ++i) {
        int64_t s = shape_hint && i < ndim_hint && !chance(10) ? shape_hint[i] : 1 + rnd(5);
        if (wild) s = chance(50) ? -1 - rnd(3) : (int64_t)(next_u64() >> 1);
        t->shape[i] = s;
        if (s > 0 && n <= MAX_ELEMS) n = n * s;
    }
    memcpy(&t->dtype, &dt, sizeof dt);  /* may be out of range on purpose */
    int32_t dev = chance(95) ? LFM_DEVICE_CPU : any_code(1);
    memcpy(&t->device, &dev, sizeof dev);
    t->ndim = ndim;
    int64_t stride = 1;
    for (int i = d - 1; i >= 0; --i) {
        t->strides[i] = stride;
        if (t->shape[i] > 0 && stride < (int64_t)1 << 40) stride *= t->shape[i];
    }
    if (chance(3) && d > 0) t->strides[0] = t->strides[0] > 1 ? t->strides[0] - 1 : 0; /* non-contiguous */
    if (!wild && n <= MAX_ELEMS && !chance(3)) {
        t->data = alloc_buf((size_t)n * elem_size(dt));
        fill(t, n);
    }
    return t;
}

static int g_ok, g_err;

static void note(lfm_status st, const char* fn) {
    if (st == LFM_STATUS_OK) {
        ++g_ok;
        return;
    }
    ++g_err;
    const char* msg = lfm_last_error();
    if (!msg || !*msg) {
        fprintf(stderr, "%s returned status %d with no message\n", fn, (int)st);
        exit(1);
    }
    if (strlen(lfm_status_string(st)) == 0) exit(1);
}

static double any_double(void) {
    switch (rnd(8)) {
        case 0: return NAN;
        case 1: return -1.0;
        case 2: return 1e300;
        case 3: return 2.0;
        default: return (double)rnd(101) / 100.0;
    }
}

static void fuzz_merge(void) {
    int K = rnd(10);
    if (chance(3)) K = chance(50) ? -3 : 1000;
    int64_t shape[3] = {1 + rnd(4), 1 + rnd(6), 1 + rnd(3)};
    int nd = 1 + rnd(3);
    lfm_tensor* base = make_view(nd, shape, rnd(3));
    lfm_tensor models[12];
    int km = K < 0 ? 0 : (K > 12 ? 12 : K);
    for (int i = 0; i < km; ++i) {
        lfm_tensor* v = make_view(nd, shape, rnd(3));
        if (v) models[i] = *v;
        else memset(&models[i], 0, sizeof models[i]);
    }
    lfm_tensor* out = make_view(nd, shape, rnd(3));
    lfm_merge_options o;
    lfm_merge_options_init(&o);
    int32_t method = any_code(LFM_MERGE_LINEAR);
    memcpy(&o.method, &method, sizeof method);
    o.n_models = K;
    double w[12], dd[12], g[12], e[12];
    int32_t pos[12];
    for (int i = 0; i < 12; ++i) {
        w[i] = chance(90) ? (double)(rnd(21) - 10) / 10.0 : any_double();
        dd[i] = any_double();
        g[i] = any_double() / 10.0;
        e[i] = any_double() / 10.0;
        pos[i] = chance(90) ? i : (int32_t)next_u64();
    }
    if (chance(70)) o.weights = w;
    if (chance(70)) o.densities = dd;
    if (chance(30)) o.gammas = g;
    if (chance(30)) o.epsilons = e;
    if (chance(20)) o.model_positions = pos;
    o.normalize = rnd(4) - 1;
    o.rescale = chance(90) ? rnd(5) - 1 : (int32_t)next_u64();
    o.consensus_unweighted = rnd(3) - 1;
    o.disjoint_count = rnd(2);
    o.lambda = chance(90) ? 1.0 : any_double();
    o.seed = next_u64();
    o.tensor_name = chance(80) ? "model.layers.0.mlp.up_proj.weight" : NULL;
    o.n_threads = chance(90) ? rnd(3) : (chance(50) ? -1 : 0x7fffffff);
    if (chance(2)) o.struct_size = 3;
    note(lfm_merge(base, km ? models : (chance(50) ? NULL : models), out, chance(2) ? NULL : &o, NULL), "lfm_merge");
}

static void fuzz_lora(int which) {
    int64_t T = 1 + rnd(4), H = 1 + rnd(6), R = 1 + rnd(3), S = 1 + rnd(3), Ho = 1 + rnd(5);
    int ns = 1 + rnd(3);
    if (chance(3)) ns = chance(50) ? 0 : LFM_LORA_MAX_SLICES + 1;
    lfm_lora_slice sl[4];
    int nsl = ns < 0 ? 0 : (ns > 4 ? 4 : ns);
    int64_t off = 0;
    for (int i = 0; i < nsl; ++i) {
        int64_t as[3] = {S, R, H}, bs[3] = {S, Ho, R}, r1[1] = {S};
        sl[i].A = make_view(3, as, rnd(3));
        sl[i].B = make_view(3, bs, rnd(3));
        sl[i].ranks = make_view(1, r1, LFM_DTYPE_I32);
        sl[i].scales = make_view(1, r1, LFM_DTYPE_F32);
        sl[i].y_col_offset = off;
        if (chance(5)) sl[i].y_col_offset = chance(50) ? INT64_MAX - rnd(8) : -1 - rnd(3);
        off += Ho;
    }
    int64_t xs[2] = {T, H}, ys[2] = {T, off}, us[3] = {ns, T, R}, ts[1] = {T}, ss[1] = {2}, ss1[1] = {3};
    lfm_tensor* x = make_view(2, xs, rnd(3));
    lfm_tensor* y = make_view(2, ys, rnd(3));
    lfm_tensor* u = make_view(3, us, LFM_DTYPE_F32);
    lfm_tensor *tok = NULL, *seg_start = NULL, *seg_slot = NULL;
    if (chance(60)) tok = make_view(1, ts, LFM_DTYPE_I32);
    if (!tok || chance(10)) {
        seg_slot = make_view(1, ss, LFM_DTYPE_I32);
        seg_start = make_view(1, ss1, LFM_DTYPE_I32);
    }
    lfm_lora_options o;
    lfm_lora_options_init(&o);
    o.n_threads = chance(90) ? rnd(3) : -1;
    if (chance(2)) o.struct_size = 1;
    const lfm_lora_slice* sp = nsl ? sl : NULL;
    const lfm_lora_options* op = chance(3) ? NULL : &o;
    if (which == 0) note(lfm_lora_shrink(x, sp, ns, tok, seg_start, seg_slot, u, op, NULL), "lfm_lora_shrink");
    if (which == 1) note(lfm_lora_expand(u, sp, ns, tok, seg_start, seg_slot, y, op, NULL), "lfm_lora_expand");
    if (which == 2) note(lfm_lora_apply(x, sp, ns, tok, seg_start, seg_slot, y, op, NULL), "lfm_lora_apply");
}

static void fuzz_codec(int which) {
    int64_t rows = 1 + rnd(4), cols = 1 + rnd(16), gs = 1 + rnd(8);
    lfm_codec_options o;
    lfm_codec_options_init(&o);
    int32_t codec = any_code(4);
    memcpy(&o.codec, &codec, sizeof codec);
    o.group_size = chance(90) ? gs : (chance(50) ? 0 : INT64_MAX);
    o.per_tensor = rnd(2);
    o.alpha = chance(90) ? 1.0 : any_double();
    o.n_threads = rnd(3);
    if (chance(2)) o.struct_size = 0;
    int64_t ds[2] = {rows, cols};
    int64_t pk[2] = {rows, (cols + 1) / 2 + rnd(3)};
    int64_t sc[2] = {rows, (cols + gs - 1) / gs};
    lfm_tensor* delta = make_view(2, ds, rnd(3));
    lfm_tensor* data = make_view(2, pk, chance(50) ? LFM_DTYPE_U8 : LFM_DTYPE_U32);
    lfm_tensor* scales = make_view(2, sc, rnd(3));
    const lfm_codec_options* op = chance(3) ? NULL : &o;
    if (which == 0) {
        note(lfm_codec_encode(delta, data, scales, op, NULL), "lfm_codec_encode");
    } else if (which == 1) {
        lfm_tensor* base = chance(30) ? NULL : make_view(2, ds, rnd(3));
        lfm_tensor* out = make_view(2, ds, rnd(3));
        note(lfm_codec_decode(data, scales, base, out, op, NULL), "lfm_codec_decode");
    } else {
        int64_t T = 1 + rnd(3);
        int64_t xs[2] = {T, cols}, ys[2] = {T, rows}, ts[1] = {T};
        int n_slots = rnd(3);
        if (chance(3)) n_slots = chance(50) ? -1 : 1 << 30;
        lfm_tensor dv[2], sv[2];
        for (int i = 0; i < 2; ++i) {
            lfm_tensor* a = make_view(2, pk, LFM_DTYPE_U8);
            lfm_tensor* b = make_view(2, sc, rnd(3));
            if (a) dv[i] = *a; else memset(&dv[i], 0, sizeof dv[i]);
            if (b) sv[i] = *b; else memset(&sv[i], 0, sizeof sv[i]);
        }
        lfm_tensor* x = make_view(2, xs, rnd(3));
        lfm_tensor* y = make_view(2, ys, rnd(3));
        lfm_tensor* tok = make_view(1, ts, chance(50) ? LFM_DTYPE_I32 : LFM_DTYPE_I64);
        int ndv = n_slots < 0 ? 0 : (n_slots > 2 ? 2 : n_slots);
        note(lfm_delta_apply(x, ndv || chance(50) ? dv : NULL, ndv || chance(50) ? sv : NULL, n_slots, tok, y, op,
                             NULL), "lfm_delta_apply");
    }
}

static void fuzz_skinny(void) {
    int64_t M = rnd(5) == 0 ? LFM_SKINNY_LINEAR_MAX_M + rnd(3) : 1 + rnd(4), N = 1 + rnd(6), K = 1 + rnd(20);
    int64_t xs[2] = {M, K}, ws[2] = {N, K}, bs[1] = {N}, ys[2] = {M, N};
    if (chance(10)) ws[1] = K + 1; /* mismatched K */
    lfm_tensor* x = make_view(2, xs, rnd(3));
    lfm_tensor* w = make_view(2, ws, rnd(3));
    lfm_tensor* b = chance(40) ? NULL : make_view(1, bs, rnd(3));
    lfm_tensor* y = make_view(2, ys, rnd(3));
    lfm_skinny_linear_options o;
    lfm_skinny_linear_options_init(&o);
    o.n_threads = chance(90) ? rnd(3) : -1;
    if (chance(5)) o.struct_size = (size_t)rnd(16);
    note(lfm_skinny_linear(x, w, b, y, chance(20) ? NULL : &o), "lfm_skinny_linear");
}

static void fuzz_misc(void) {
    lfm_tensor t;
    int64_t shape[LFM_MAX_DIMS];
    for (int i = 0; i < LFM_MAX_DIMS; ++i) shape[i] = chance(90) ? rnd(5) : (int64_t)(next_u64() >> rnd(64));
    int32_t dt = any_code(7), dev = any_code(1);
    lfm_dtype dtv;
    lfm_device_type devv;
    memcpy(&dtv, &dt, sizeof dt);
    memcpy(&devv, &dev, sizeof dev);
    note(lfm_tensor_init(chance(3) ? NULL : &t, NULL, dtv, devv, rnd(11) - 1, chance(3) ? NULL : shape),
         "lfm_tensor_init");
    int32_t st = any_code(9);
    lfm_status stv;
    memcpy(&stv, &st, sizeof st);
    if (!lfm_status_string(stv)) exit(1);
    if (!lfm_version() || !lfm_build_info() || lfm_abi_version() != LFM_ABI_VERSION) exit(1);
    if (chance(10)) note(lfm_set_num_threads(chance(80) ? 1 + rnd(3) : (chance(50) ? -5 : 0x7fffffff)),
                         "lfm_set_num_threads");
    if (lfm_get_num_threads() < 1) exit(1);
    if (chance(5)) {
        static const char* levels[] = {"baseline", "avx2", "avx512", "neon", "bogus", "", NULL};
        note(lfm_set_simd(levels[rnd(7)]), "lfm_set_simd");
    }
}

int main(int argc, char** argv) {
    long cases = argc > 1 ? atol(argv[1]) : 3000;
    g_state = argc > 2 ? strtoull(argv[2], NULL, 10) : 1;
    lfm_set_num_threads(2);
    for (long c = 0; c < cases; ++c) {
        switch (rnd(9)) {
            case 0: case 1: fuzz_merge(); break;
            case 2: fuzz_lora(0); break;
            case 3: fuzz_lora(1); break;
            case 4: fuzz_lora(2); break;
            case 5: fuzz_codec(rnd(3)); break;
            case 6: fuzz_codec(rnd(2)); break;
            case 7: fuzz_skinny(); break;
            default: fuzz_misc(); break;
        }
        free_all();
    }
    lfm_set_simd(NULL);
    lfm_set_num_threads(2);
    printf("abi_fuzz: %ld cases, %d accepted, %d refused with a message: OK\n", cases, g_ok, g_err);
    return 0;
}
