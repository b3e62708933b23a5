/* Same bits on every CPU: merge a fixed, seeded, tie-heavy case with every method at
 * every SIMD level this host runs, and compare a 64-bit FNV-1a digest of each output
 * with the digest checked in below (computed on x86-64; tools/aarch64_check.sh runs this
 * program under qemu-aarch64, so an ARM build must reproduce the x86 bits exactly).
 *
 * Inputs are generated with integer arithmetic only (splitmix64), so every host builds
 * the same bytes: a bf16 base on a coarse grid and K = 3 bf16 fine-tunes whose deltas
 * are small multiples of 2^-10, with exact cancellations (model 1 = -3 x model 0 on about
 * a third of the elements, weights 0.3 / 0.1 / 0.7) and many equal magnitudes at every
 * cut. The tensor is large enough (2^19 elements) that the sample-and-bracket selection
 * runs, not only the small-tensor radix path.
 *
 * usage: merge_digest_test            check (prints OK, exit 0) or print what differs
 *        merge_digest_test --print    print the digests as C initialisers (to update them
 *                                      after an intended change of the spec's results) */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "lfm/lfm.h"

enum { ROWS = 512, COLS = 1024, N = ROWS * COLS, K = 3 };

static uint64_t splitmix64(uint64_t* s) {
    uint64_t z = (*s += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

/* bf16 bits of the small integer multiple m * 2^-10 + g / 64 are built through float:
 * every value here is exact in float32 and in bfloat16 (|m| <= 21, |g| <= 64). */
static uint16_t bf16_of(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    return (uint16_t)(u >> 16);
}

static uint64_t fnv1a(const void* p, size_t n) {
    const unsigned char* b = (const unsigned char*)p;
    uint64_t h = 0xcbf29ce484222325ull;
    for (size_t i = 0; i < n; ++i) {
        h ^= b[i];
        h *= 0x100000001b3ull;
    }
    return h;
}

typedef struct {
    const char* name;
    lfm_merge_method method;
    double density, gamma, epsilon;
    uint64_t expected;
} Case;

static Case cases[] = {
    {"task_arithmetic", LFM_MERGE_TASK_ARITHMETIC, 1.0, 0.0, 0.0, 0xd7924a20912bdc62ull},
    {"linear", LFM_MERGE_LINEAR, 1.0, 0.0, 0.0, 0x76511a9b44054f38ull},
    {"ties", LFM_MERGE_TIES, 0.2, 0.0, 0.0, 0xd2f0f018bb68d628ull},
    {"ties_d06", LFM_MERGE_TIES, 0.6, 0.0, 0.0, 0x23727ad348221c26ull},
    {"dare_linear", LFM_MERGE_DARE_LINEAR, 0.6, 0.0, 0.0, 0xf374a0cfaf3e6048ull},
    {"dare_ties", LFM_MERGE_DARE_TIES, 0.6, 0.0, 0.0, 0x84eb5f80186ed957ull},
    {"breadcrumbs", LFM_MERGE_BREADCRUMBS, 0.8, 0.05, 0.0, 0xe0ca7d1b9e4f11c2ull},
    {"breadcrumbs_ties", LFM_MERGE_BREADCRUMBS_TIES, 0.8, 0.05, 0.0, 0x5e78778f24ebbce9ull},
    {"della", LFM_MERGE_DELLA, 0.6, 0.0, 0.1, 0x8d73378436886fa9ull},
    {"della_linear", LFM_MERGE_DELLA_LINEAR, 0.6, 0.0, 0.1, 0x1b6e224ef000d90full},
};
enum { NCASES = sizeof(cases) / sizeof(cases[0]) };

int main(int argc, char** argv) {
    const int print = argc > 1 && strcmp(argv[1], "--print") == 0;
    static const int steps[10] = {-7, -5, -3, -2, -1, 1, 2, 3, 5, 7};
    uint16_t* base = malloc(sizeof(uint16_t) * N);
    uint16_t* models = malloc(sizeof(uint16_t) * N * K);
    uint16_t* out = malloc(sizeof(uint16_t) * N);
    if (!base || !models || !out) {
        printf("FAIL out of memory\n");
        return 1;
    }
    uint64_t s = 12345;
    for (int64_t j = 0; j < N; ++j) {
        const float b = (float)((int)(splitmix64(&s) % 128) - 64) / 64.0f;
        int d[K];
        for (int i = 0; i < K; ++i) d[i] = steps[splitmix64(&s) % 10];
        if (splitmix64(&s) % 3 == 0) d[1] = -3 * d[0]; /* exact cancellation 0.3 d0 + 0.1 d1 = 0 */
        base[j] = bf16_of(b);
        for (int i = 0; i < K; ++i) models[(int64_t)i * N + j] = bf16_of(b + (float)d[i] / 1024.0f);
    }
    int64_t shape[2] = {ROWS, COLS};
    lfm_tensor tb, tm[K], to;
    lfm_tensor_init(&tb, base, LFM_DTYPE_BF16, LFM_DEVICE_CPU, 2, shape);
    for (int i = 0; i < K; ++i) lfm_tensor_init(&tm[i], models + (int64_t)i * N, LFM_DTYPE_BF16, LFM_DEVICE_CPU, 2, shape);
    lfm_tensor_init(&to, out, LFM_DTYPE_BF16, LFM_DEVICE_CPU, 2, shape);

    static const char* levels[] = {"baseline", "avx2", "avx512", "neon"};
    double w[K] = {0.3, 0.1, 0.7}, dens[K], gam[K], eps[K];
    int failures = 0, nlevels = 0;
    for (int l = 0; l < 4; ++l) {
        if (lfm_set_simd(levels[l]) != LFM_STATUS_OK) continue; /* not runnable on this CPU */
        ++nlevels;
        for (int c = 0; c < NCASES; ++c) {
            lfm_merge_options o;
            lfm_merge_options_init(&o);
            for (int i = 0; i < K; ++i) {
                dens[i] = cases[c].density;
                gam[i] = cases[c].gamma;
                eps[i] = cases[c].epsilon;
            }
            o.method = cases[c].method;
            o.n_models = K;
            o.weights = w;
            o.densities = dens;
            o.gammas = gam;
            o.epsilons = eps;
            o.seed = 7;
            o.tensor_name = "model.layers.0.mlp.up_proj.weight";
            o.n_threads = 2;
            memset(out, 0, sizeof(uint16_t) * N);
            lfm_status st = lfm_merge(cases[c].method == LFM_MERGE_LINEAR ? NULL : &tb, tm, &to, &o, NULL);
            if (st != LFM_STATUS_OK) {
                printf("FAIL %s at %s: %s\n", cases[c].name, levels[l], lfm_last_error());
                ++failures;
                continue;
            }
            const uint64_t h = fnv1a(out, sizeof(uint16_t) * N);
            if (print) {
                if (nlevels == 1) printf("    %s 0x%016llxull\n", cases[c].name, (unsigned long long)h);
            } else if (h != cases[c].expected) {
                printf("FAIL %s at %s: digest 0x%016llx, expected 0x%016llx\n", cases[c].name, levels[l],
                       (unsigned long long)h, (unsigned long long)cases[c].expected);
                ++failures;
            }
        }
    }
    lfm_set_simd(NULL);
    free(base);
    free(models);
    free(out);
    if (print) return 0;
    printf("%s: %d methods x %d SIMD levels, %d digest mismatches\n", failures ? "FAILED" : "OK", NCASES, nlevels,
           failures);
    return failures ? 1 : 0;
}
