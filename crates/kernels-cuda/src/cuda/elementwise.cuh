// SwiGLU and rotate-half RoPE: elementwise, grid-stride.
#pragma once
#include "common.cuh"

// out = silu(g) * u
template <class T> __device__ void swiglu_fwd(const T* g, const T* u, T* out, size_t n) {
    typedef typename AccOf<T>::type A;
    FOR_EACH(i, n) {
        const A gv = to_acc(g[i]);
        out[i] = Store<T>::of(gv * sigmoid_(gv) * to_acc(u[i]));
    }
}

// out[i] = d g = dy * u * s * (1 + g * (1 - s)), out[n + i] = d u = dy * g * s, s = sigmoid(g)
template <class T> __device__ void swiglu_bwd(const T* g, const T* u, const T* dy, T* out, size_t n) {
    typedef typename AccOf<T>::type A;
    FOR_EACH(i, n) {
        const A gv = to_acc(g[i]), uv = to_acc(u[i]), d = to_acc(dy[i]);
        const A s = sigmoid_(gv);
        out[i] = Store<T>::of(d * uv * s * (A(1) + gv * (A(1) - s)));
        out[n + i] = Store<T>::of(d * gv * s);
    }
}

// x: [B, H, T, dh] rows; cos, sin: [B, T, dh/2]. One thread per (row, j < dh/2):
// out1 = x1 cos - x2 sin, out2 = x2 cos + x1 sin. Backward is the same with -sin.
template <class T>
__device__ void rope(const T* x, const T* cos, const T* sin, T* out, size_t rows, unsigned h,
                     unsigned t, unsigned dh) {
    typedef typename AccOf<T>::type A;
    const unsigned half = dh / 2;
    FOR_EACH(i, rows * half) {
        const size_t r = i / half;
        const unsigned j = (unsigned)(i % half);
        const size_t bi = r / ((size_t)h * t), ti = r % t;
        const size_t tab = (bi * t + ti) * half + j;
        const A c = to_acc(cos[tab]), s = to_acc(sin[tab]);
        const A x1 = to_acc(x[r * dh + j]), x2 = to_acc(x[r * dh + half + j]);
        out[r * dh + j] = Store<T>::of(x1 * c - x2 * s);
        out[r * dh + half + j] = Store<T>::of(x2 * c + x1 * s);
    }
}

#define ELEMENTWISE_ENTRIES(T, S)                                                                \
    extern "C" __global__ void swiglu_fwd_##S(const T* g, const T* u, T* out, size_t n) {         \
        swiglu_fwd<T>(g, u, out, n);                                                             \
    }                                                                                            \
    extern "C" __global__ void swiglu_bwd_##S(const T* g, const T* u, const T* dy, T* out,        \
                                              size_t n) {                                        \
        swiglu_bwd<T>(g, u, dy, out, n);                                                         \
    }                                                                                            \
    extern "C" __global__ void rope_##S(const T* x, const T* cos, const T* sin, T* out,           \
                                        size_t rows, unsigned h, unsigned t, unsigned dh) {      \
        rope<T>(x, cos, sin, out, rows, h, t, dh);                                               \
    }
FOR_TYPES(ELEMENTWISE_ENTRIES)
