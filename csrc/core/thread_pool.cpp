#include "core/thread_pool.h"

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdlib>
#include <exception>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "core/status.h"

#ifdef LFM_HAVE_OPENMP
#include <omp.h>
#endif
#include <pthread.h>

namespace lfm {
namespace {

int env_threads() {
    const char* s = std::getenv("LFM_NUM_THREADS");
    if (s && *s) {
        int v = std::atoi(s);
        if (v >= 1) return std::min(v, kMaxThreads);
    }
    unsigned hc = std::thread::hardware_concurrency();
    return hc ? std::min(static_cast<int>(hc), kMaxThreads) : 1;
}

std::atomic<int> g_num_threads{0};

class Pool {
public:
    static Pool& get() {
        static Pool* pool = new Pool();  // leaked on purpose: no join at static destruction
        return *pool;
    }

    void run(int64_t n_tasks, int workers, const std::function<void(int64_t, int)>& fn) {
        std::lock_guard<std::mutex> job_lock(job_mutex_);  // one job at a time
        ensure_threads(workers - 1);
        {
            std::lock_guard<std::mutex> lk(m_);
            fn_ = &fn;
            n_tasks_ = n_tasks;
            next_.store(0);
            active_helpers_ = workers - 1;
            running_ = 0;
            open_ = true;
            error_ = nullptr;
            ++generation_;
        }
        cv_.notify_all();
        work(0);
        // Every task is taken. Helpers that have not woken up yet stay out of this job
        // (open_ = false), so the caller waits only for those still running a task: a
        // small job never waits for a thread's wake-up latency (tens of microseconds on a
        // busy or virtualised machine), it just runs on fewer workers.
        std::unique_lock<std::mutex> lk(m_);
        open_ = false;
        done_cv_.wait(lk, [&] { return running_ == 0; });
        fn_ = nullptr;
        if (error_) std::rethrow_exception(error_);
    }

private:
    void ensure_threads(int n) {
        while (static_cast<int>(threads_.size()) < n) {
            int slot = static_cast<int>(threads_.size()) + 1;
            threads_.emplace_back([this, slot] { loop(slot); });
            threads_.back().detach();
        }
    }

    void loop(int slot) {
        uint64_t seen = 0;
        for (;;) {
            {
                std::unique_lock<std::mutex> lk(m_);
                cv_.wait(lk, [&] { return generation_ != seen; });
                seen = generation_;
                if (slot > active_helpers_ || !open_) continue;  // not needed, or the job is done
                ++running_;
            }
            work(slot);
            std::lock_guard<std::mutex> lk(m_);
            if (--running_ == 0) done_cv_.notify_all();
        }
    }

    void work(int slot) {
        for (;;) {
            int64_t t = next_.fetch_add(1);
            if (t >= n_tasks_) return;
            try {
                (*fn_)(t, slot);
            } catch (...) {
                std::lock_guard<std::mutex> lk(m_);
                if (!error_) error_ = std::current_exception();
                next_.store(n_tasks_);  // stop handing out work
            }
        }
    }

    std::mutex job_mutex_;
    std::mutex m_;
    std::condition_variable cv_, done_cv_;
    std::vector<std::thread> threads_;
    const std::function<void(int64_t, int)>* fn_ = nullptr;
    int64_t n_tasks_ = 0;
    std::atomic<int64_t> next_{0};
    int active_helpers_ = 0;
    int running_ = 0;    // helpers inside work() for the current job
    bool open_ = false;  // helpers may still join the current job
    uint64_t generation_ = 0;
    std::exception_ptr error_;
};

#ifdef LFM_HAVE_OPENMP
// parallel_for on OpenMP threads. In a process that also runs torch (which uses the same
// libgomp, loaded once per process by its soname), the kernels run on torch's own thread
// team: those threads are awake (spinning) right after a torch op, so a kernel between two
// torch ops neither waits for a sleeping worker nor fights a spinning one for the core (on
// 2 cores the own pool's worker lost half its time to torch's spinning thread: a mixed
// decode step's LoRA calls took 1.5x as long between torch matmuls as back to back).
void run_openmp(int64_t n_tasks, int workers, const std::function<void(int64_t, int)>& fn) {
    std::atomic<int64_t> next{0};
    std::exception_ptr error;
    std::mutex em;
#pragma omp parallel num_threads(workers)
    {
        const int slot = omp_get_thread_num();  // < workers (a team may be smaller, never larger)
        for (;;) {
            const int64_t t = next.fetch_add(1);
            if (t >= n_tasks) break;
            try {
                fn(t, slot);
            } catch (...) {  // exceptions must not leave an OpenMP region
                std::lock_guard<std::mutex> lk(em);
                if (!error) error = std::current_exception();
                next.store(n_tasks);
            }
        }
    }
    if (error) std::rethrow_exception(error);
}
#endif

enum class Backend { Serial, Own, OpenMP };

// A forked child has none of its parent's worker threads, and libgomp's team in a child of
// a process that used it hangs; after fork the kernels run on the calling thread.
std::atomic<bool> g_forked{false};

Backend backend() {
    static const bool fork_hook = pthread_atfork(nullptr, nullptr, [] { g_forked.store(true); }) == 0;
    (void)fork_hook;  // registered once, before the choice below (which may throw and retry)
    static const Backend chosen = [] {
        const char* s = std::getenv("LFM_THREAD_POOL");
        const std::string v = s ? s : "";
        if (v == "own") return Backend::Own;
#ifdef LFM_HAVE_OPENMP
        if (v.empty() || v == "openmp") return Backend::OpenMP;
#else
        if (v.empty()) return Backend::Own;
        if (v == "openmp") fail(LFM_STATUS_INVALID_ARGUMENT, "LFM_THREAD_POOL=openmp but this build has no OpenMP");
#endif
        // thrown from the static's initializer: every kernel call reports it until fixed
        fail(LFM_STATUS_INVALID_ARGUMENT, "LFM_THREAD_POOL must be 'openmp' or 'own', got '", v, "'");
    }();
    return g_forked.load() ? Backend::Serial : chosen;
}

}  // namespace

const char* thread_pool_name() {
    switch (backend()) {
        case Backend::OpenMP: return "openmp";
        case Backend::Own: return "own";
        default: return "serial";
    }
}

int get_num_threads() {
    int v = g_num_threads.load();
    if (v <= 0) {
        v = env_threads();
        g_num_threads.store(v);
    }
    return v;
}

void set_num_threads(int n) {
    if (n < 1 || n > kMaxThreads)
        fail(LFM_STATUS_INVALID_ARGUMENT, "number of threads must be in 1..", kMaxThreads, ", got ", n);
    g_num_threads.store(n);
}

void check_n_threads(int n) {
    if (n < 0 || n > kMaxThreads)
        fail(LFM_STATUS_INVALID_ARGUMENT, "n_threads must be in 0..", kMaxThreads, " (0 = library default), got ", n);
}

int plan_workers(int64_t n_tasks, int max_workers) {
    int w = max_workers > 0 ? max_workers : get_num_threads();
    if (n_tasks < w) w = static_cast<int>(std::max<int64_t>(n_tasks, 1));
    return std::max(w, 1);
}

void parallel_for(int64_t n_tasks, int max_workers, const std::function<void(int64_t, int)>& fn) {
    if (n_tasks <= 0) return;
    int w = plan_workers(n_tasks, max_workers);
    const Backend b = backend();
    if (w == 1 || b == Backend::Serial) {
        for (int64_t t = 0; t < n_tasks; ++t) fn(t, 0);
        return;
    }
#ifdef LFM_HAVE_OPENMP
    if (b == Backend::OpenMP) {
        run_openmp(n_tasks, w, fn);
        return;
    }
#endif
    Pool::get().run(n_tasks, w, fn);
}

void parallel_for_runs(int64_t n_items, int max_workers, const std::function<void(int64_t, int)>& fn) {
    if (n_items <= 0) return;
    const int w = plan_workers(n_items, max_workers);
    const int64_t runs = std::min<int64_t>(n_items, static_cast<int64_t>(w) * kRunsPerWorker);
    const int64_t len = (n_items + runs - 1) / runs;
    parallel_for((n_items + len - 1) / len, w, [&](int64_t t, int slot) {
        const int64_t end = std::min(n_items, (t + 1) * len);
        for (int64_t i = t * len; i < end; ++i) fn(i, slot);
    });
}

}  // namespace lfm
