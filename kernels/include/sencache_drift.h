/* SenCache drift reduction: C interface for C++ consumers (build with kernels/CMakeLists.txt).
 *
 * For each of `samples` contiguous samples of `per_sample` elements, out[s] = sum (x - anchor)^2,
 * accumulated in fp32 and deterministic.
 * `partials` is device scratch of samples * sencache_drift_blocks_per_sample(...) floats.
 */
#ifndef SENCACHE_DRIFT_H
#define SENCACHE_DRIFT_H

#include <cuda_runtime.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef enum { SENCACHE_FP32 = 0, SENCACHE_FP16 = 1, SENCACHE_BF16 = 2 } sencache_dtype;

int sencache_drift_blocks_per_sample(long long per_sample, sencache_dtype dtype);

cudaError_t sencache_drift_sumsq(const void* x, const void* anchor, float* partials, float* out, int samples, long long per_sample, sencache_dtype dtype,
                                 cudaStream_t stream);

#ifdef __cplusplus
}
#endif

#endif
