// DELLA's keep decisions for one row without sorting all of it (docs/spec/merge.md,
// della_magprune).
//
// The spec keeps element j of a row iff draw(j) < thr[rank(j)], rank by (|delta| bits,
// column) ascending and thr nondecreasing in the rank (merge_plan.h, della_thresholds).
// A histogram of the row's |delta| bits over 1024 bins gives every element a rank range
// [first rank of its bin, last rank of its bin]; thr at the two ends decides almost every
// element (thr[first] > draw: kept whatever the rank; thr[last] <= draw: dropped). Only
// the bins where some draw falls between the two ends are ranked exactly (their members
// sorted by (value, column), or taken in column order when their values are all equal,
// as in tie-heavy bf16 deltas, or, when only a few draws are undecided, each of those
// members' rank counted among the bin's members). Same decisions as a full sort.
#pragma once
#include <cstdint>
#include <vector>

namespace lfm::merge {

struct DellaRowScratch {
    std::vector<uint16_t> bin;     // [cols] bin of each element
    std::vector<uint32_t> cnt;     // [bins] elements per bin
    std::vector<uint32_t> first;   // [bins] rank of the bin's first element
    std::vector<uint32_t> tlo, thi;  // [bins] thr at the bin's first and last rank (< 2^32)
    std::vector<uint8_t> unsure;     // [cols] the draw lies between its bin's two thresholds
    std::vector<uint32_t> straddle;  // [bins] members whose draw lies between the bin's two thresholds
    std::vector<uint32_t> ulist;     // the columns of those members, ascending
    std::vector<uint32_t> mem, fill;  // [cols] columns grouped by bin; [bins] scatter cursors
    std::vector<uint32_t> mval;       // [cols] the value of mem's column
    std::vector<uint64_t> keys;       // (value << 32 | column) of one bin being ranked
};

// The decisions themselves: LoopTable::della_keep_row (merge_cpu_loops.h), compiled per
// SIMD level like the other inner loops.

}  // namespace lfm::merge
