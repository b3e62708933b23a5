// Multi-LoRA batched ops (docs/spec/lora.md): torch-free launchers shared by the C ABI.
//
// LoraArgs is the validated form of an lfm_lora_shrink / expand / apply call; the C ABI
// (csrc/capi/lora.cpp) builds it once with resolve_lora_args, so every backend sees the
// same checks. Pointers are device pointers for CUDA views, host pointers otherwise.
#pragma once
#include <cstdint>
#include <vector>

#include "core/status.h"
#include "lfm/lfm.h"

namespace lfm::lora {

enum class Op { Shrink, Expand, Apply };

struct Slice {
    const void* A = nullptr;   // [n_slots, R, H_in] (shrink, apply)
    lfm_dtype a_dt = LFM_DTYPE_F32;
    const void* B = nullptr;   // [n_slots, H_out, R] (expand, apply)
    lfm_dtype b_dt = LFM_DTYPE_F32;
    const int32_t* ranks = nullptr;  // [n_slots]
    const float* scales = nullptr;   // [n_slots] (expand, apply)
    int64_t R = 0;             // R_max of this slice's tables
    int64_t H_out = 0;         // expand, apply
    int64_t off = 0;           // first column in y
};

struct LoraArgs {
    Op op = Op::Apply;
    const char* name = "lora";
    lfm_device_type device = LFM_DEVICE_CPU;
    int32_t device_id = 0;
    int64_t T = 0, H_in = 0, n_slots = 0;
    const void* x = nullptr;   // [T, H_in], row stride x_ld (shrink, apply)
    lfm_dtype x_dt = LFM_DTYPE_F32;
    int64_t x_ld = 0;
    float* u = nullptr;        // [n_slices, T, u_R] contiguous fp32 (shrink: out, expand: in)
    int64_t u_R = 0;
    void* y = nullptr;         // [T, H_y], row stride y_ld (expand, apply)
    lfm_dtype y_dt = LFM_DTYPE_F32;
    int64_t y_ld = 0, H_y = 0;
    bool segments = false;                // which slot map (pointers may be null when empty)
    const int32_t* token_slot = nullptr;  // [T], or
    const int32_t* seg_start = nullptr;   // [S+1] and
    const int32_t* seg_slot = nullptr;    // [S]
    int64_t S = 0;
    std::vector<Slice> slices;
    bool check_values = true;
    int n_threads = 0;
};

LoraArgs resolve_lora_args(Op op, const lfm_tensor* in, const lfm_lora_slice* slices, int32_t n_slices,
                           const lfm_tensor* token_slot, const lfm_tensor* seg_start, const lfm_tensor* seg_slot,
                           const lfm_tensor* out, const lfm_lora_options* opts);

// Value checks on host copies of the slot map, ranks and scales (throws lfm::Error).
// ranks[i] / scales[i] belong to slice i (scales may be null for shrink).
void check_lora_values(const LoraArgs& a, const int32_t* token_slot, const int32_t* seg_start,
                       const int32_t* seg_slot, const std::vector<const int32_t*>& ranks,
                       const std::vector<const float*>& scales);

void lora_cpu(const LoraArgs& a);
#ifdef LFM_HAVE_CUDA
void lora_cuda(const LoraArgs& a, void* stream);
#else
[[noreturn]] inline void lora_cuda(const LoraArgs& a, void*) { fail_no_cuda(a.name); }
#endif

}  // namespace lfm::lora
