// sc_drift_*: the fused drift kernel (kernels/drift_kernel.cu through kernels/drift_launch.cu) on
// the caller's CUDA stream, the per-sample sums copied to pinned memory, one event to wait on.
#include <cuda_runtime.h>

#include <cstring>
#include <memory>
#include <mutex>
#include <string>
#include <unordered_set>

#include "common.hpp"
#include "drift_launch.cu"

using sencache::Error;
using sencache::guarded;

struct sc_drift {
    int32_t max_samples = 0;
    int64_t per_sample = 0;
    int blocks = 0;  // partials per sample: the most any dtype needs
    int device = 0;
    float* partials = nullptr;
    float* sums = nullptr;
    float* pinned = nullptr;
    cudaEvent_t done = nullptr;
    int32_t launched = -1;  // samples of the last launch; -1: none to wait for

    ~sc_drift() {
        int current = 0;
        if (cudaGetDevice(&current) == cudaSuccess && current != device) cudaSetDevice(device);
        if (done) cudaEventDestroy(done);
        cudaFree(partials);
        cudaFree(sums);
        cudaFreeHost(pinned);
        if (current != device) cudaSetDevice(current);
    }
};

namespace {

std::mutex live_mutex;
std::unordered_set<const void*> live;

void cuda(cudaError_t rc, const char* what) {
    if (rc != cudaSuccess) throw Error(SC_ERR_CUDA, std::string(what) + ": " + cudaGetErrorString(rc));
}

}  // namespace

extern "C" int sc_drift_available(void) { return 1; }

extern "C" sc_status sc_drift_create(int32_t max_samples, int64_t per_sample, sc_drift** out) {
    return guarded([&] {
        SC_REQUIRE(out != nullptr, SC_ERR_INVALID_ARGUMENT, "out is NULL");
        *out = nullptr;
        SC_REQUIRE(max_samples > 0 && max_samples <= 65535 && per_sample > 0, SC_ERR_INVALID_ARGUMENT,
                   "max_samples must be in [1, 65535] and per_sample > 0");
        auto d = std::make_unique<sc_drift>();
        cuda(cudaGetDevice(&d->device), "cudaGetDevice");
        d->max_samples = max_samples;
        d->per_sample = per_sample;
        d->blocks = sencache_drift_blocks_per_sample(per_sample, SENCACHE_FP32);  // fp32: most blocks
        cuda(cudaMalloc(&d->partials, sizeof(float) * max_samples * d->blocks), "cudaMalloc");
        cuda(cudaMalloc(&d->sums, sizeof(float) * max_samples), "cudaMalloc");
        cuda(cudaMallocHost(&d->pinned, sizeof(float) * max_samples), "cudaMallocHost");
        cuda(cudaEventCreateWithFlags(&d->done, cudaEventDisableTiming), "cudaEventCreate");
        *out = d.release();
        std::lock_guard<std::mutex> lock(live_mutex);
        live.insert(*out);
        return SC_OK;
    });
}

extern "C" sc_status sc_drift_launch(sc_drift* drift, const void* x, const void* anchor, int32_t samples,
                                     sc_dtype dtype, void* cuda_stream) {
    return guarded([&] {
        SC_REQUIRE(drift != nullptr && x != nullptr && anchor != nullptr, SC_ERR_INVALID_ARGUMENT,
                   "drift, x or anchor is NULL");
        SC_REQUIRE(samples > 0 && samples <= drift->max_samples, SC_ERR_BUFFER_SIZE,
                   "samples must be in [1, " + std::to_string(drift->max_samples) + "]");
        SC_REQUIRE(dtype == SC_FP32 || dtype == SC_FP16 || dtype == SC_BF16, SC_ERR_INVALID_ARGUMENT,
                   "dtype must be SC_FP32, SC_FP16 or SC_BF16");
        auto stream = static_cast<cudaStream_t>(cuda_stream);
        cuda(sencache_drift_sumsq(x, anchor, drift->partials, drift->sums, samples, drift->per_sample,
                                  static_cast<sencache_dtype>(dtype), stream), "drift kernel launch");
        cuda(cudaMemcpyAsync(drift->pinned, drift->sums, sizeof(float) * samples, cudaMemcpyDeviceToHost, stream),
             "cudaMemcpyAsync");
        cuda(cudaEventRecord(drift->done, stream), "cudaEventRecord");
        drift->launched = samples;
        return SC_OK;
    });
}

extern "C" sc_status sc_drift_wait(sc_drift* drift, float* sums_out, int32_t samples) {
    return guarded([&] {
        SC_REQUIRE(drift != nullptr && sums_out != nullptr, SC_ERR_INVALID_ARGUMENT, "drift or sums_out is NULL");
        SC_REQUIRE(drift->launched >= 0, SC_ERR_STATE, "nothing launched to wait for");
        SC_REQUIRE(samples == drift->launched, SC_ERR_BUFFER_SIZE,
                   "samples " + std::to_string(samples) + " but the launch was for " + std::to_string(drift->launched));
        cuda(cudaEventSynchronize(drift->done), "cudaEventSynchronize");
        std::memcpy(sums_out, drift->pinned, sizeof(float) * samples);
        return SC_OK;
    });
}

extern "C" void sc_drift_destroy(sc_drift* drift) {
    if (drift == nullptr) return;
    {
        std::lock_guard<std::mutex> lock(live_mutex);
        if (live.erase(drift) == 0) return;
    }
    delete drift;
}
