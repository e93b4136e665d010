// Fused per-sample drift reduction for SenCache: sum over each sample of (x - anchor)^2.
//
// Layout: `x` and `anchor` are [samples, per_sample] contiguous, in fp32, fp16 or bf16.
// Pass 1 (drift_partial_<dtype>): grid (blocks_per_sample, samples); each block walks its sample
// with a grid-stride loop over 16-byte vectors (4 fp32 or 8 half values; the elements past the
// last whole vector, or all of them if the sample is not 16-byte aligned, one by one with the same
// grid stride), accumulates in fp32,
// reduces with warp shuffles then shared memory, and writes one partial per block.
// Pass 2 (drift_finish): one warp per sample sums its partials in a fixed order.
// The grid shape depends only on the sizes, never on timing, so the result is deterministic.
//
// No headers: NVRTC compiles this as is. fp16 converts with PTX cvt, bf16 by a shift.

#define SENCACHE_THREADS 256

typedef unsigned short u16;
typedef long long i64;

struct __align__(16) vec16 { unsigned int w[4]; };

__device__ __forceinline__ float half_to_float(u16 h) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
}

__device__ __forceinline__ float bf16_to_float(u16 h) {
    return __uint_as_float(((unsigned int)h) << 16);
}

__device__ __forceinline__ float lane_sum(float v) {
    for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_down_sync(0xffffffffu, v, offset);
    return v;
}

__device__ __forceinline__ float block_sum(float v) {
    __shared__ float warp_sums[SENCACHE_THREADS / 32];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    v = lane_sum(v);
    if (lane == 0) warp_sums[warp] = v;
    __syncthreads();
    v = (threadIdx.x < SENCACHE_THREADS / 32) ? warp_sums[threadIdx.x] : 0.0f;
    if (warp == 0) v = lane_sum(v);
    return v;
}

// Squared difference of one 16-byte vector, per dtype.
__device__ __forceinline__ float sq_f32(const vec16& a, const vec16& b) {
    float s = 0.0f;
    for (int k = 0; k < 4; ++k) {
        const float d = __uint_as_float(a.w[k]) - __uint_as_float(b.w[k]);
        s = fmaf(d, d, s);
    }
    return s;
}

template <bool BF16>
__device__ __forceinline__ float sq_16bit(const vec16& a, const vec16& b) {
    float s = 0.0f;
    for (int k = 0; k < 4; ++k) {
        const u16 alo = (u16)(a.w[k] & 0xffffu), ahi = (u16)(a.w[k] >> 16);
        const u16 blo = (u16)(b.w[k] & 0xffffu), bhi = (u16)(b.w[k] >> 16);
        const float d0 = BF16 ? bf16_to_float(alo) - bf16_to_float(blo) : half_to_float(alo) - half_to_float(blo);
        const float d1 = BF16 ? bf16_to_float(ahi) - bf16_to_float(bhi) : half_to_float(ahi) - half_to_float(bhi);
        s = fmaf(d0, d0, s);
        s = fmaf(d1, d1, s);
    }
    return s;
}

template <typename Scalar, int PER_VEC, int KIND>
__device__ void drift_partial(const Scalar* __restrict__ x, const Scalar* __restrict__ anchor,
                              float* __restrict__ partials, i64 per_sample) {
    const int sample = blockIdx.y;
    const Scalar* xs = x + (i64)sample * per_sample;
    const Scalar* as = anchor + (i64)sample * per_sample;
    // 16-byte loads when the sample starts on a 16-byte boundary; the rest element by element.
    const bool aligned = ((reinterpret_cast<unsigned long long>(xs) | reinterpret_cast<unsigned long long>(as)) & 15ull) == 0;
    const i64 vectors = aligned ? per_sample / PER_VEC : 0;
    const i64 stride = (i64)gridDim.x * SENCACHE_THREADS;
    const i64 first = (i64)blockIdx.x * SENCACHE_THREADS + threadIdx.x;
    const vec16* xv = reinterpret_cast<const vec16*>(xs);
    const vec16* av = reinterpret_cast<const vec16*>(as);
    float acc = 0.0f;
    for (i64 i = first; i < vectors; i += stride) {
        const vec16 a = xv[i];
        const vec16 b = av[i];
        acc += KIND == 0 ? sq_f32(a, b) : sq_16bit<KIND == 2>(a, b);
    }
    for (i64 i = vectors * PER_VEC + first; i < per_sample; i += stride) {
        float a, b;
        if (KIND == 0) { a = (float)xs[i]; b = (float)as[i]; }
        else if (KIND == 1) { a = half_to_float((u16)xs[i]); b = half_to_float((u16)as[i]); }
        else { a = bf16_to_float((u16)xs[i]); b = bf16_to_float((u16)as[i]); }
        const float d = a - b;
        acc = fmaf(d, d, acc);
    }
    const float total = block_sum(acc);
    if (threadIdx.x == 0) partials[(i64)sample * gridDim.x + blockIdx.x] = total;
}

extern "C" __global__ void __launch_bounds__(SENCACHE_THREADS)
drift_partial_f32(const float* x, const float* anchor, float* partials, i64 per_sample) {
    drift_partial<float, 4, 0>(x, anchor, partials, per_sample);
}

extern "C" __global__ void __launch_bounds__(SENCACHE_THREADS)
drift_partial_f16(const u16* x, const u16* anchor, float* partials, i64 per_sample) {
    drift_partial<u16, 8, 1>(x, anchor, partials, per_sample);
}

extern "C" __global__ void __launch_bounds__(SENCACHE_THREADS)
drift_partial_bf16(const u16* x, const u16* anchor, float* partials, i64 per_sample) {
    drift_partial<u16, 8, 2>(x, anchor, partials, per_sample);
}

// One warp per sample: lanes take partials lane, lane + 32, ... then a shuffle tree. Fixed order.
extern "C" __global__ void drift_finish(const float* partials, float* out, int blocks_per_sample, int samples) {
    const int sample = blockIdx.x;
    if (sample >= samples) return;
    float acc = 0.0f;
    for (int i = threadIdx.x; i < blocks_per_sample; i += 32) acc += partials[(i64)sample * blocks_per_sample + i];
    acc = lane_sum(acc);
    if (threadIdx.x == 0) out[sample] = acc;
}
