// The thread-local last error and the names of statuses.
#include "common.hpp"

namespace {
thread_local std::string last_error;
}

namespace sencache {

sc_status fail(sc_status status, const std::string& message) {
    try {
        last_error = message;
    } catch (...) {
        // Out of memory while copying the message: the status still says what happened.
    }
    return status;
}

void clear_error() { last_error.clear(); }

}  // namespace sencache

extern "C" const char* sc_last_error(void) { return last_error.c_str(); }

extern "C" int sc_abi_version(void) { return SC_ABI_VERSION; }

extern "C" const char* sc_status_name(sc_status status) {
    switch (status) {
        case SC_OK: return "SC_OK";
        case SC_ERR_INVALID_ARGUMENT: return "SC_ERR_INVALID_ARGUMENT";
        case SC_ERR_BUFFER_SIZE: return "SC_ERR_BUFFER_SIZE";
        case SC_ERR_NOT_FOUND: return "SC_ERR_NOT_FOUND";
        case SC_ERR_CORRUPT: return "SC_ERR_CORRUPT";
        case SC_ERR_UNKNOWN_ID: return "SC_ERR_UNKNOWN_ID";
        case SC_ERR_STATE: return "SC_ERR_STATE";
        case SC_ERR_PYTHON: return "SC_ERR_PYTHON";
        case SC_ERR_CUDA: return "SC_ERR_CUDA";
        case SC_ERR_UNSUPPORTED: return "SC_ERR_UNSUPPORTED";
        case SC_ERR_INTERNAL: return "SC_ERR_INTERNAL";
    }
    return "SC_ERR_UNKNOWN_STATUS";
}
