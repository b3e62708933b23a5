#include "core/thread_pool.h"

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdlib>
#include <exception>
#include <mutex>
#include <thread>
#include <vector>

#include "core/status.h"

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
            pending_ = workers - 1;
            error_ = nullptr;
            ++generation_;
        }
        cv_.notify_all();
        work(0);
        std::unique_lock<std::mutex> lk(m_);
        done_cv_.wait(lk, [&] { return pending_ == 0; });
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
                if (slot > active_helpers_) continue;  // not needed for this job
            }
            work(slot);
            std::lock_guard<std::mutex> lk(m_);
            if (--pending_ == 0) done_cv_.notify_all();
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
    int pending_ = 0;
    uint64_t generation_ = 0;
    std::exception_ptr error_;
};

}  // namespace

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
    if (w == 1) {
        for (int64_t t = 0; t < n_tasks; ++t) fn(t, 0);
        return;
    }
    Pool::get().run(n_tasks, w, fn);
}

}  // namespace lfm
