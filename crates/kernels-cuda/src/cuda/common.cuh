// Shared pieces of preftune's CUDA kernels: element types, conversions, block reductions.
//
// Every kernel computes in `Acc<T>` (f32 for f32 and bf16, f64 for f64) and reads and writes `T`.
// The same sources compile with nvcc (to PTX) and, with `PREFTUNE_EMULATE`, with a host C++
// compiler against `emu/emu.h`, which runs them on CPU threads for the tests.
#pragma once

#ifdef PREFTUNE_EMULATE
#include "emu/emu.h"
#else
#include <cuda_bf16.h>
#include <stdint.h>
#endif

typedef __nv_bfloat16 bf16;

// A loop nvcc unrolls, so arrays indexed by its counter stay in registers (the host compiler of
// the emulator ignores it).
#ifdef PREFTUNE_EMULATE
#define UNROLL
#else
#define UNROLL _Pragma("unroll")
#endif

template <class T> struct AccOf { typedef float type; };
template <> struct AccOf<double> { typedef double type; };

__device__ __forceinline__ float to_acc(float x) { return x; }
__device__ __forceinline__ double to_acc(double x) { return x; }
__device__ __forceinline__ float to_acc(bf16 x) { return __bfloat162float(x); }

template <class T> struct Store;
template <> struct Store<float> {
    __device__ __forceinline__ static float of(float x) { return x; }
};
template <> struct Store<double> {
    __device__ __forceinline__ static double of(double x) { return x; }
};
template <> struct Store<bf16> {
    __device__ __forceinline__ static bf16 of(float x) { return __float2bfloat16(x); }
};

// `x` rounded to `T` and read back (what storing it and reading it again gives).
template <class T, class A> __device__ __forceinline__ A round_to(A x) {
    return to_acc(Store<T>::of(x));
}

__device__ __forceinline__ float exp_(float x) { return expf(x); }
__device__ __forceinline__ double exp_(double x) { return exp(x); }
__device__ __forceinline__ float log_(float x) { return logf(x); }
__device__ __forceinline__ double log_(double x) { return log(x); }
__device__ __forceinline__ float sqrt_(float x) { return sqrtf(x); }
__device__ __forceinline__ double sqrt_(double x) { return sqrt(x); }
__device__ __forceinline__ float max_(float a, float b) { return fmaxf(a, b); }
__device__ __forceinline__ double max_(double a, double b) { return fmax(a, b); }

template <class A> __device__ __forceinline__ A neg_inf();
template <> __device__ __forceinline__ float neg_inf<float>() { return -INFINITY; }
template <> __device__ __forceinline__ double neg_inf<double>() { return -(double)INFINITY; }

template <class A> __device__ __forceinline__ A sigmoid_(A x) { return A(1) / (A(1) + exp_(-x)); }

// Reductions over a block whose size is a multiple of 32 (at most 1024). Every thread of the
// block must call them (they synchronise), and every thread gets the result.
template <class A> __device__ __forceinline__ A warp_sum(A v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

template <class A> __device__ __forceinline__ A warp_max(A v) {
    for (int o = 16; o > 0; o >>= 1) v = max_(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

__device__ __forceinline__ unsigned warp_min_u32(unsigned v) {
    for (int o = 16; o > 0; o >>= 1) {
        unsigned w = __shfl_xor_sync(0xffffffffu, v, o);
        v = w < v ? w : v;
    }
    return v;
}

template <class A> __device__ A block_sum(A v) {
    __shared__ A part[32];
    const unsigned lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    v = warp_sum(v);
    __syncthreads();  // a previous call may still be reading `part`
    if (lane == 0) part[warp] = v;
    __syncthreads();
    return warp_sum(lane < warps ? part[lane] : A(0));
}

template <class A> __device__ A block_max(A v) {
    __shared__ A part[32];
    const unsigned lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    v = warp_max(v);
    __syncthreads();
    if (lane == 0) part[warp] = v;
    __syncthreads();
    return warp_max(lane < warps ? part[lane] : neg_inf<A>());
}

__device__ unsigned block_min_u32(unsigned v) {
    __shared__ unsigned part[32];
    const unsigned lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    v = warp_min_u32(v);
    __syncthreads();
    if (lane == 0) part[warp] = v;
    __syncthreads();
    return warp_min_u32(lane < warps ? part[lane] : 0xffffffffu);
}

// Grid-stride loop over `n` elements.
#define FOR_EACH(i, n)                                                                           \
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < (n);                      \
         i += (size_t)gridDim.x * blockDim.x)

// One `extern "C"` entry point per element type: NAME_f32, NAME_bf16, NAME_f64.
#define FOR_TYPES(M) M(float, f32) M(bf16, bf16) M(double, f64)
