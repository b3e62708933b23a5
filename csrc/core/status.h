// Errors inside the core: thrown as lfm::Error, turned into an lfm_status at the
// C ABI by lfm::guard(). Nothing throws across the ABI.
#pragma once
#include <sstream>
#include <stdexcept>
#include <string>
#include <utility>

#include "lfm/lfm.h"

namespace lfm {

class Error : public std::runtime_error {
public:
    Error(lfm_status status, const std::string& msg) : std::runtime_error(msg), status_(status) {}
    lfm_status status() const { return status_; }

private:
    lfm_status status_;
};

template <typename... Args>
std::string cat(Args&&... args) {
    std::ostringstream os;
    (os << ... << std::forward<Args>(args));
    return os.str();
}

template <typename... Args>
[[noreturn]] void fail(lfm_status status, Args&&... args) {
    throw Error(status, cat(std::forward<Args>(args)...));
}

// For a CUDA launcher called in a build without CUDA.
[[noreturn]] inline void fail_no_cuda(const char* op) {
    fail(LFM_STATUS_NOT_BUILT, "the CUDA ", op, " kernel is not in this build of lfm_engine "
         "(it was built without nvcc; rebuild with the CUDA toolkit and -DLFM_ENABLE_CUDA=ON)");
}

void set_last_error(const std::string& msg);
void clear_last_error();

void check_simd_env();  // core/cpu_features.h: an unusable LFM_SIMD is an error

// Run fn(); map every exception to a status and record its message. `where`
// names the entry point so the message says where it failed.
template <typename Fn>
lfm_status guard_unchecked(const char* where, Fn&& fn) noexcept {
    try {
        fn();
        clear_last_error();
        return LFM_STATUS_OK;
    } catch (const Error& e) {
        set_last_error(cat(where, ": ", e.what()));
        return e.status();
    } catch (const std::bad_alloc&) {
        set_last_error(cat(where, ": out of memory"));
        return LFM_STATUS_OUT_OF_MEMORY;
    } catch (const std::exception& e) {
        set_last_error(cat(where, ": internal error: ", e.what()));
        return LFM_STATUS_INTERNAL;
    } catch (...) {
        set_last_error(cat(where, ": internal error (unknown exception)"));
        return LFM_STATUS_INTERNAL;
    }
}

// guard_unchecked() after checking that the LFM_SIMD environment variable is usable, so
// every entry point reports a bad LFM_SIMD instead of silently running another level.
template <typename Fn>
lfm_status guard(const char* where, Fn&& fn) noexcept {
    return guard_unchecked(where, [&] {
        check_simd_env();
        fn();
    });
}

}  // namespace lfm
