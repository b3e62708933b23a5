// CUDA fused sparsify-and-merge: being written (issue "GPU fused sparsify-and-merge").
#include "core/status.h"
#include "kernels/merge/merge.h"

namespace lfm::merge {
void merge_cuda(const MergeArgs&, void*) {
    fail(LFM_STATUS_NOT_BUILT, "the CUDA merge kernel is not available in this build");
}
}  // namespace lfm::merge
