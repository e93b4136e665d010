// sc_drift_* on a device: fp32, fp16 and bf16 batches against a host sum, and
// bad arguments. Exits 77 (ctest: skipped) when no CUDA device is present.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdio>
#include <cstring>
#include <vector>

#include "sencache.h"

static int failures = 0;

template <typename T>
static T convert(float v);
template <> float convert<float>(float v) { return v; }
template <> __half convert<__half>(float v) { return __float2half(v); }
template <> __nv_bfloat16 convert<__nv_bfloat16>(float v) { return __float2bfloat16(v); }
static float back(float v) { return v; }
static float back(__half v) { return __half2float(v); }
static float back(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
static void run(sc_dtype dtype, const char* name, int samples, long long per_sample, cudaStream_t stream) {
    std::vector<T> x(samples * per_sample), anchor(samples * per_sample);
    std::vector<double> want(samples, 0.0);
    for (long long i = 0; i < samples * per_sample; ++i) {
        x[i] = convert<T>(std::sin(0.001f * i));
        anchor[i] = convert<T>(std::cos(0.003f * i));
        const double d = double(back(x[i])) - double(back(anchor[i]));
        want[i / per_sample] += d * d;
    }
    T *dx, *da;
    cudaMalloc(&dx, x.size() * sizeof(T));
    cudaMalloc(&da, x.size() * sizeof(T));
    cudaMemcpy(dx, x.data(), x.size() * sizeof(T), cudaMemcpyHostToDevice);
    cudaMemcpy(da, anchor.data(), x.size() * sizeof(T), cudaMemcpyHostToDevice);
    sc_drift* drift = nullptr;
    std::vector<float> sums(samples);
    if (sc_drift_create(samples, per_sample, &drift) != SC_OK ||
        sc_drift_launch(drift, dx, da, samples, dtype, stream) != SC_OK ||
        sc_drift_wait(drift, sums.data(), samples) != SC_OK) {
        std::printf("FAIL %s: %s\n", name, sc_last_error());
        ++failures;
        return;
    }
    for (int s = 0; s < samples; ++s) {
        if (std::fabs(sums[s] - want[s]) > 1e-4 * want[s] + 1e-6) {
            std::printf("FAIL %s sample %d: %g vs %g\n", name, s, sums[s], want[s]);
            ++failures;
        }
    }
    if (sc_drift_launch(drift, dx, da, samples + 1, dtype, stream) != SC_ERR_BUFFER_SIZE) ++failures;
    if (sc_drift_wait(drift, sums.data(), samples + 1) != SC_ERR_BUFFER_SIZE) ++failures;
    sc_drift_destroy(drift);
    sc_drift_destroy(drift);
    cudaFree(dx);
    cudaFree(da);
    std::printf("%s: %d samples x %lld checked\n", name, samples, per_sample);
}

int main() {
    int devices = 0;
    if (cudaGetDeviceCount(&devices) != cudaSuccess || devices == 0) {
        std::printf("no CUDA device: skipped\n");
        return 77;
    }
    cudaStream_t stream;
    cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking);
    run<float>(SC_FP32, "fp32", 3, 100003, stream);
    run<__half>(SC_FP16, "fp16", 4, 65536, stream);
    run<__nv_bfloat16>(SC_BF16, "bf16", 2, 12345, stream);
    cudaStreamDestroy(stream);
    std::printf("%s: %d failures\n", failures ? "FAILED" : "passed", failures);
    return failures ? 1 : 0;
}
