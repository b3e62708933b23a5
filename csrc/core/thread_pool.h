// A persistent worker pool for the CPU kernels.
//
// parallel_for(n_tasks, max_workers, fn) calls fn(task, slot) once for every task in
// [0, n_tasks); `slot` in [0, workers) identifies the worker so kernels can keep
// per-worker scratch. Tasks are taken dynamically, so kernels must make results
// independent of which worker ran which task (they reduce per task, in task order).
// The first exception thrown by fn is re-thrown in the caller after all workers stop.
// Workers: OpenMP threads when built with OpenMP (LFM_THREAD_POOL=own picks the own pool).
#pragma once
#include <cstdint>
#include <functional>

namespace lfm {

// Worker counts are bounded: per-worker scratch is sized by them, so a count from
// input (2^31 - 1, say) must be an error, not a 17 GB allocation.
constexpr int kMaxThreads = 1024;

int get_num_threads();           // LFM_NUM_THREADS (clamped to 1..kMaxThreads), else hardware concurrency
void set_num_threads(int n);     // 1 <= n <= kMaxThreads
// A per-call n_threads option: 0 (library default) .. kMaxThreads, else lfm::Error.
void check_n_threads(int n);
// How many worker slots parallel_for will use for these arguments (for sizing scratch).
int plan_workers(int64_t n_tasks, int max_workers);
void parallel_for(int64_t n_tasks, int max_workers, const std::function<void(int64_t, int)>& fn);
// parallel_for over items laid out one after another in memory (blocks of a stream): the
// tasks are contiguous runs of items (about kRunsPerWorker per worker), and fn(item, slot)
// is called for each item of a run in order. Items handed out one by one give each worker
// every other few KiB of every stream, and the hardware prefetchers (which stop at each
// 4 KiB page) restart on every item. Slots are < plan_workers(n_items, max_workers).
constexpr int64_t kRunsPerWorker = 8;
void parallel_for_runs(int64_t n_items, int max_workers, const std::function<void(int64_t, int)>& fn);
// Which workers run parallel_for: "openmp" (the default when built with OpenMP: the process's
// libgomp team, shared with torch), "own" (a pool of condition-variable threads;
// LFM_THREAD_POOL=own, or no OpenMP), "serial" (in a forked child).
const char* thread_pool_name();

}  // namespace lfm
