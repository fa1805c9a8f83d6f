// RMSNorm forward and backward, one block per row (rows of `d` values).
#pragma once
#include "common.cuh"

// y = round(x * inv) * w with inv = 1 / sqrt(mean(x^2) + eps), as transformers' LlamaRMSNorm
// (normalise in f32, cast back to the input's type, then scale).
template <class T> __device__ void rmsnorm_fwd(const T* x, const T* w, T* y, unsigned d, double eps) {
    typedef typename AccOf<T>::type A;
    const size_t row = blockIdx.x;
    const T* xr = x + row * d;
    T* yr = y + row * d;
    A ss = 0;
    for (unsigned i = threadIdx.x; i < d; i += blockDim.x) {
        A v = to_acc(xr[i]);
        ss += v * v;
    }
    ss = block_sum(ss);
    const A inv = A(1) / sqrt_(ss / A(d) + A(eps));
    for (unsigned i = threadIdx.x; i < d; i += blockDim.x) {
        yr[i] = Store<T>::of(round_to<T>(to_acc(xr[i]) * inv) * to_acc(w[i]));
    }
}

// With n = x * inv and g = dy * w: dx = inv * (g - n * mean(g * n)). Block b also adds
// dy * n of its rows to dw_part[b * d ..]: column j belongs to one thread, so no atomics, and the
// partial sums are reduced in a fixed order by `col_sum` (the result does not vary between runs).
template <class T>
__device__ void rmsnorm_bwd(const T* x, const T* w, const T* dy, T* dx,
                            typename AccOf<T>::type* dw_part, unsigned rows, unsigned d,
                            double eps) {
    typedef typename AccOf<T>::type A;
    A* dwb = dw_part + (size_t)blockIdx.x * d;
    for (unsigned i = threadIdx.x; i < d; i += blockDim.x) dwb[i] = A(0);
    for (size_t row = blockIdx.x; row < rows; row += gridDim.x) {
        const T* xr = x + row * d;
        const T* gr = dy + row * d;
        A ss = 0, dot = 0;
        for (unsigned i = threadIdx.x; i < d; i += blockDim.x) {
            A v = to_acc(xr[i]);
            ss += v * v;
            dot += to_acc(gr[i]) * to_acc(w[i]) * v;
        }
        ss = block_sum(ss);
        dot = block_sum(dot);
        const A inv = A(1) / sqrt_(ss / A(d) + A(eps));
        // mean(g * n) = inv * mean(g * x)
        const A mean = dot * inv / A(d);
        for (unsigned i = threadIdx.x; i < d; i += blockDim.x) {
            const A v = to_acc(xr[i]), g = to_acc(gr[i]);
            dx[row * d + i] = Store<T>::of(inv * (g * to_acc(w[i]) - v * inv * mean));
            dwb[i] += g * v * inv;
        }
    }
}

// out[j] = sum over p < parts of part[p * d + j], in order.
template <class T>
__device__ void col_sum(const typename AccOf<T>::type* part, T* out, unsigned parts, unsigned d) {
    typedef typename AccOf<T>::type A;
    FOR_EACH(j, (size_t)d) {
        A s = 0;
        for (unsigned p = 0; p < parts; ++p) s += part[(size_t)p * d + j];
        out[j] = Store<T>::of(s);
    }
}

#define NORM_ENTRIES(T, S)                                                                       \
    extern "C" __global__ void rmsnorm_fwd_##S(const T* x, const T* w, T* y, unsigned d,           \
                                               double eps) {                                     \
        rmsnorm_fwd<T>(x, w, y, d, eps);                                                         \
    }                                                                                            \
    extern "C" __global__ void rmsnorm_bwd_##S(const T* x, const T* w, const T* dy, T* dx,        \
                                               AccOf<T>::type* dw_part, unsigned rows,           \
                                               unsigned d, double eps) {                         \
        rmsnorm_bwd<T>(x, w, dy, dx, dw_part, rows, d, eps);                                     \
    }                                                                                            \
    extern "C" __global__ void col_sum_##S(const AccOf<T>::type* part, T* out, unsigned parts,    \
                                           unsigned d) {                                         \
        col_sum<T>(part, out, parts, d);                                                         \
    }
FOR_TYPES(NORM_ENTRIES)
