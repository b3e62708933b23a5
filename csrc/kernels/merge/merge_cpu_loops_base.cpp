// The baseline x86-64 (or, off x86-64, the only) build of the CPU merge inner loops.
#define LFM_LOOPS_ISA base
#include "kernels/merge/merge_cpu_loops_body.inc"
