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
#include <type_traits>

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

// Single operations rounded to nearest, as CUDA's intrinsics (the emulator is built without
// contraction of multiply-adds, so the plain operators round each step).
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __fsqrt_rn(float a) { return std::sqrt(a); }

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

// Warp-level matrix products (nvcuda::wmma) for the tensor-core kernels. Each thread holds the
// whole 16 x 16 tile (the hardware spreads it over the warp's lanes in an unspecified layout,
// which the kernels never rely on), computes the whole product, and only lane 0 stores it; the
// kernels call __syncwarp() before reading what a store wrote, as they must on a GPU.
inline void __syncwarp(unsigned = 0xffffffffu) { emu::sync(); }

namespace nvcuda {
namespace wmma {
struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
enum layout_t { mem_row_major, mem_col_major };

template <class Use, int M, int N, int K, class T, class Layout = void> struct fragment {
    static const int rows = std::is_same<Use, matrix_b>::value ? K : M;
    static const int cols = std::is_same<Use, matrix_a>::value ? K : N;
    static const int num_elements = rows * cols;
    float x[rows * cols];  // values as f32 (bf16 operands are exact in f32)
};

template <class Use, int M, int N, int K, class T, class L>
inline void fill_fragment(fragment<Use, M, N, K, T, L>& f, float v) {
    for (int i = 0; i < f.num_elements; ++i) f.x[i] = v;
}

inline float emu_value(float v) { return v; }
inline float emu_value(__nv_bfloat16 v) { return __bfloat162float(v); }

// Operand tiles: element (r, c) of the tile at p[r * ldm + c] (row_major) or p[c * ldm + r].
template <class Use, int M, int N, int K, class T, class L, class P>
inline void load_matrix_sync(fragment<Use, M, N, K, T, L>& f, const P* p, unsigned ldm) {
    typedef fragment<Use, M, N, K, T, L> F;
    const bool row = std::is_same<L, row_major>::value;
    for (int r = 0; r < F::rows; ++r)
        for (int c = 0; c < F::cols; ++c)
            f.x[r * F::cols + c] = emu_value(row ? p[(size_t)r * ldm + c] : p[(size_t)c * ldm + r]);
}

// Accumulator tiles name their layout when loaded and stored.
template <int M, int N, int K>
inline void load_matrix_sync(fragment<accumulator, M, N, K, float>& f, const float* p, unsigned ldm,
                             layout_t layout) {
    for (int r = 0; r < M; ++r)
        for (int c = 0; c < N; ++c)
            f.x[r * N + c] = layout == mem_row_major ? p[(size_t)r * ldm + c] : p[(size_t)c * ldm + r];
}

template <int M, int N, int K>
inline void store_matrix_sync(float* p, const fragment<accumulator, M, N, K, float>& f, unsigned ldm,
                              layout_t layout) {
    if (threadIdx.x % 32 != 0) return;
    for (int r = 0; r < M; ++r)
        for (int c = 0; c < N; ++c)
            (layout == mem_row_major ? p[(size_t)r * ldm + c] : p[(size_t)c * ldm + r]) = f.x[r * N + c];
}

// d = a b + c, summed in f32 in k order.
template <int M, int N, int K, class T, class LA, class LB>
inline void mma_sync(fragment<accumulator, M, N, K, float>& d, const fragment<matrix_a, M, N, K, T, LA>& a,
                     const fragment<matrix_b, M, N, K, T, LB>& b,
                     const fragment<accumulator, M, N, K, float>& c) {
    float out[M * N];
    for (int m = 0; m < M; ++m)
        for (int n = 0; n < N; ++n) {
            float s = c.x[m * N + n];
            for (int k = 0; k < K; ++k) s = std::fma(a.x[m * K + k], b.x[k * N + n], s);
            out[m * N + n] = s;
        }
    for (int i = 0; i < M * N; ++i) d.x[i] = out[i];
}
}  // namespace wmma
}  // namespace nvcuda

#define __align__(n) __attribute__((aligned(n)))
