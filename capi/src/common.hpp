// Shared by both libraries: the thread-local error message and the guard that turns every C++
// failure into a status, so nothing but a status crosses the ABI.
#pragma once

#include <exception>
#include <new>
#include <stdexcept>
#include <string>

#include "sencache.h"

namespace sencache {

// A failure carrying its status; thrown inside the library only, caught at the ABI.
struct Error : std::runtime_error {
    sc_status status;
    Error(sc_status s, const std::string& message) : std::runtime_error(message), status(s) {}
};

// Record `message` as this thread's last error and return `status`.
SC_API sc_status fail(sc_status status, const std::string& message);
// Clear this thread's last error (a call that succeeds leaves "").
SC_API void clear_error();

// Run `body` (returning sc_status); exceptions become statuses with their message.
template <typename F>
sc_status guarded(F&& body) noexcept {
    try {
        clear_error();
        return body();
    } catch (const Error& e) {
        return fail(e.status, e.what());
    } catch (const std::bad_alloc&) {
        return fail(SC_ERR_INTERNAL, "out of memory");
    } catch (const std::exception& e) {
        return fail(SC_ERR_INTERNAL, std::string("internal error: ") + e.what());
    } catch (...) {
        return fail(SC_ERR_INTERNAL, "internal error: unknown exception");
    }
}

#define SC_REQUIRE(cond, status, message) \
    do {                                  \
        if (!(cond)) throw ::sencache::Error((status), (message)); \
    } while (0)

}  // namespace sencache
