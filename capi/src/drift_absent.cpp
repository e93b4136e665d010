// sc_drift_* in a library built without CUDA: every call says so.
#include "common.hpp"

extern "C" int sc_drift_available(void) { return 0; }

extern "C" sc_status sc_drift_create(int32_t, int64_t, sc_drift** out) {
    if (out) *out = nullptr;
    return sencache::fail(SC_ERR_UNSUPPORTED, "this libsencache_policy was built without CUDA (no nvcc at build time)");
}

extern "C" sc_status sc_drift_launch(sc_drift*, const void*, const void*, int32_t, sc_dtype, void*) {
    return sencache::fail(SC_ERR_UNSUPPORTED, "this libsencache_policy was built without CUDA (no nvcc at build time)");
}

extern "C" sc_status sc_drift_wait(sc_drift*, float*, int32_t) {
    return sencache::fail(SC_ERR_UNSUPPORTED, "this libsencache_policy was built without CUDA (no nvcc at build time)");
}

extern "C" void sc_drift_destroy(sc_drift*) {}
