// Host launcher of the drift kernel for C++ consumers; the same blocking as kernels/host_reference.py.
#include "sencache_drift.h"
#include "drift_kernel.cu"

static const long long kMaxBlocksPerSample = 1024;
static const long long kVectorsPerThread = 2;

extern "C" int sencache_drift_blocks_per_sample(long long per_sample, sencache_dtype dtype) {
    const long long per_vec = dtype == SENCACHE_FP32 ? 4 : 8;
    const long long vectors = per_sample / per_vec;
    const long long per_block = SENCACHE_THREADS * kVectorsPerThread;
    long long blocks = (vectors + per_block - 1) / per_block;
    if (blocks < 1) blocks = 1;
    if (blocks > kMaxBlocksPerSample) blocks = kMaxBlocksPerSample;
    return (int)blocks;
}

extern "C" cudaError_t sencache_drift_sumsq(const void* x, const void* anchor, float* partials, float* out,
                                            int samples, long long per_sample, sencache_dtype dtype,
                                            cudaStream_t stream) {
    const int blocks = sencache_drift_blocks_per_sample(per_sample, dtype);
    const dim3 grid(blocks, samples);
    switch (dtype) {
        case SENCACHE_FP32:
            drift_partial_f32<<<grid, SENCACHE_THREADS, 0, stream>>>((const float*)x, (const float*)anchor, partials, per_sample);
            break;
        case SENCACHE_FP16:
            drift_partial_f16<<<grid, SENCACHE_THREADS, 0, stream>>>((const u16*)x, (const u16*)anchor, partials, per_sample);
            break;
        case SENCACHE_BF16:
            drift_partial_bf16<<<grid, SENCACHE_THREADS, 0, stream>>>((const u16*)x, (const u16*)anchor, partials, per_sample);
            break;
        default:
            return cudaErrorInvalidValue;
    }
    drift_finish<<<samples, 32, 0, stream>>>(partials, out, blocks, samples);
    return cudaGetLastError();
}
