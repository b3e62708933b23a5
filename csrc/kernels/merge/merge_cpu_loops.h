// Inner loops of the CPU merge kernel, over one block of `len` elements.
// Each is compiled twice from merge_cpu_loops_body.inc, for baseline x86-64 (namespace
// base, merge_cpu_loops_base.cpp) and for x86-64-v3 = AVX2/FMA (namespace v3,
// merge_cpu_loops_v3.cpp), both without FP contraction, so they give the same bits; the
// entry points in lfm::merge::loops (merge_cpu_loops.cpp) pick one per call from the
// effective SIMD level (core/cpu_features.h, LFM_SIMD). Written branch-free so they vectorize.
#pragma once
#include <cstdint>

#include "lfm/lfm.h"

namespace lfm::merge::loops {
#include "kernels/merge/merge_cpu_loops_decl.inc"
namespace base {
#include "kernels/merge/merge_cpu_loops_decl.inc"
}  // namespace base
namespace v3 {
#include "kernels/merge/merge_cpu_loops_decl.inc"
}  // namespace v3

}  // namespace lfm::merge::loops
