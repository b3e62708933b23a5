// The x86-64-v3 (AVX2/FMA/BMI2) build of the CPU merge inner loops. The headers are read
// before the target pragma, so inline library code they define keeps the baseline target
// (no AVX2 instruction can leak into code a baseline CPU runs); only the loops below are
// compiled for v3. -ffp-contract=off (CMakeLists.txt) keeps FMA out of them.
#include <algorithm>
#include <cmath>
#include <cstring>

#include "core/cpu_features.h"
#include "core/dtype.h"
#include "kernels/merge/merge_cpu_loops.h"
#if defined(__x86_64__)
#include <immintrin.h>
#endif

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#pragma GCC target("arch=x86-64-v3")
#define LFM_LOOPS_ISA v3
#include "kernels/merge/merge_cpu_loops_body.inc"
#else
// off x86-64 GCC the dispatcher never calls v3::; define them as the baseline build anyway
#define LFM_LOOPS_ISA v3
#include "kernels/merge/merge_cpu_loops_body.inc"
#endif
