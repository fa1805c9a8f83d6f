// Just enough of CUDA to run preftune's kernels on CPU threads, for the tests: a block's threads
// are real threads meeting at a barrier for __syncthreads; warp shuffles exchange through a
// per-block buffer between two barriers, so every thread of the block must call them together
// (the kernels' reductions do). Blocks run one after another, so `__shared__` can be `static`.
// This checks indexing, reductions and maths, not speed, memory coalescing or warp-level
// divergence rules.
#pragma once
#include <climits>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>

struct dim3 {
    unsigned x, y, z;
};

namespace emu {
extern thread_local dim3 thread_idx;
extern thread_local dim3 block_idx;
extern dim3 block_dim;
extern dim3 grid_dim;
void sync();
double* slots();
}  // namespace emu

#define threadIdx (emu::thread_idx)
#define blockIdx (emu::block_idx)
#define blockDim (emu::block_dim)
#define gridDim (emu::grid_dim)
#define __global__
#define __device__
#define __forceinline__ inline
#define __shared__ static

inline void __syncthreads() { emu::sync(); }

template <class T> inline T __shfl_xor_sync(unsigned, T v, int lane_mask) {
    double* s = emu::slots();
    const unsigned i = threadIdx.x;
    s[i] = (double)v;
    emu::sync();
    const T r = (T)s[i ^ (unsigned)lane_mask];
    emu::sync();
    return r;
}

inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }

struct __nv_bfloat16 {
    uint16_t bits;
};

inline float __bfloat162float(__nv_bfloat16 h) {
    const uint32_t u = (uint32_t)h.bits << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}

// Round to nearest even, as CUDA's __float2bfloat16.
inline __nv_bfloat16 __float2bfloat16(float f) {
    uint32_t u;
    std::memcpy(&u, &f, 4);
    if (std::isnan(f)) return __nv_bfloat16{0x7fc0};
    u += 0x7fffu + ((u >> 16) & 1u);
    return __nv_bfloat16{(uint16_t)(u >> 16)};
}
