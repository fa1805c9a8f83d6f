// Attention in tiles (flash-attention style), forward and backward, on CUDA cores in f32 (f64
// for f64): softmax(scale * Q K^T + mask) V without storing scores or probabilities. Forward
// keeps each query row's log-sum-exp; backward recomputes the probabilities from it, in two
// kernels that need no atomics: one per query row for dQ (which also writes D = rowsum(dO * O)),
// one per key for dK and dV.
//
// Layout (grouped-query attention without copies, as the model stacks it): q, out, dout are
// [BG, R, DH] with BG = batch * groups and R = rep * t (a group's `rep` query heads stacked along
// time); k, v, dk, dv are [BG, TK, DH]. `mask` (nullable) is additive, [batch, t, TK]: query row r
// of group bg reads mask row r % t of batch bg / groups. The head size DH is a template
// parameter (32, 64, 96, 128), so per-thread rows live in registers.
#pragma once
#include "common.cuh"

#define FLASH_BR 64  // query rows a block (one a thread): forward and dQ
#define FLASH_BC 32  // keys a shared tile: forward and dQ
#define FLASH_BK 32  // keys a block (one a thread): dK and dV

// Padding of the dK/dV kernel's key rows in shared memory: there each thread reads its own row,
// so unpadded rows of DH values would put every lane's element d in one bank (32-way conflicts).
// With rows 4 bytes longer, lane i's element sits i words further on.
template <class T> struct FlashPad {
    static const int value = sizeof(T) >= 4 ? 1 : 4 / (int)sizeof(T);
};
// Query rows a shared tile in the dK/dV kernel (shared memory stays under 48 KB up to f64 at 64).
template <int DH> struct FlashBq {
    static const int value = 512 / DH < 4 ? 4 : 512 / DH;
};

__device__ __forceinline__ unsigned umin_(unsigned a, unsigned b) { return a < b ? a : b; }

// The additive mask's row for query row r of group bg, or null.
template <class T>
__device__ __forceinline__ const T* mask_row(const T* mask, size_t bg, unsigned groups, unsigned r,
                                             unsigned t, unsigned tk) {
    return mask ? mask + ((bg / groups) * t + r % t) * (size_t)tk : nullptr;
}

// Copies rows [row0, row0 + n) of a [., DH] tensor into a shared tile of rows W >= DH wide,
// all threads together.
template <class T, int DH, int W>
__device__ __forceinline__ void load_tile(T (*tile)[W], const T* src, size_t row0, unsigned n) {
    const T* s = src + row0 * DH;
    for (unsigned i = threadIdx.x; i < n * DH; i += blockDim.x) tile[i / DH][i % DH] = s[i];
}

template <class T, int DH>
__device__ void flash_fwd(const T* q, const T* k, const T* v, const T* mask, T* out,
                          typename AccOf<T>::type* lse, unsigned R, unsigned t, unsigned tk,
                          unsigned groups, double scale_) {
    typedef typename AccOf<T>::type A;
    __shared__ T ks[FLASH_BC][DH];
    __shared__ T vs[FLASH_BC][DH];
    const A scale = A(scale_);
    const size_t bg = blockIdx.y;
    const unsigned r = blockIdx.x * FLASH_BR + threadIdx.x;
    const bool live = r < R;
    const size_t row = bg * R + (live ? r : 0);
    const T* mrow = mask_row(mask, bg, groups, live ? r : 0, t, tk);
    A qr[DH], o[DH];
    for (int d = 0; d < DH; ++d) {
        qr[d] = to_acc(q[row * DH + d]);
        o[d] = A(0);
    }
    A m = neg_inf<A>(), l = A(0);
    for (unsigned k0 = 0; k0 < tk; k0 += FLASH_BC) {
        const unsigned n = umin_(FLASH_BC, tk - k0);
        __syncthreads();  // the previous tile is no longer read
        load_tile<T, DH>(ks, k, bg * tk + k0, n);
        load_tile<T, DH>(vs, v, bg * tk + k0, n);
        __syncthreads();
        if (!live) continue;
        A s[FLASH_BC];
        A mt = m;
        for (unsigned j = 0; j < n; ++j) {
            A dot = A(0);
            for (int d = 0; d < DH; ++d) dot += qr[d] * to_acc(ks[j][d]);
            A x = dot * scale;
            if (mrow) x += to_acc(mrow[k0 + j]);
            s[j] = x;
            mt = max_(mt, x);
        }
        // Nothing seen yet (m = -inf): nothing to rescale. A tile of -inf scores so far
        // (mt = -inf) adds nothing; exp(-inf - -inf) would be NaN.
        const A corr = m == neg_inf<A>() ? A(0) : exp_(m - mt);
        l *= corr;
        for (int d = 0; d < DH; ++d) o[d] *= corr;
        for (unsigned j = 0; j < n; ++j) {
            const A p = mt == neg_inf<A>() ? A(0) : exp_(s[j] - mt);
            l += p;
            for (int d = 0; d < DH; ++d) o[d] += p * to_acc(vs[j][d]);
        }
        m = mt;
    }
    if (live) {
        const A inv = A(1) / l;
        for (int d = 0; d < DH; ++d) out[row * DH + d] = Store<T>::of(o[d] * inv);
        lse[row] = m + log_(l);
    }
}

// dQ = scale * sum_j dS_ij k_j with dS = P * (dP - D), dP = dO V^T, D = rowsum(dO * O).
// Writes D for the dK/dV kernel, which runs after this one.
template <class T, int DH>
__device__ void flash_bwd_dq(const T* q, const T* k, const T* v, const T* mask, const T* out,
                             const T* dout, const typename AccOf<T>::type* lse,
                             typename AccOf<T>::type* dsum, T* dq, unsigned R, unsigned t,
                             unsigned tk, unsigned groups, double scale_) {
    typedef typename AccOf<T>::type A;
    __shared__ T ks[FLASH_BC][DH];
    __shared__ T vs[FLASH_BC][DH];
    const A scale = A(scale_);
    const size_t bg = blockIdx.y;
    const unsigned r = blockIdx.x * FLASH_BR + threadIdx.x;
    const bool live = r < R;
    const size_t row = bg * R + (live ? r : 0);
    const T* mrow = mask_row(mask, bg, groups, live ? r : 0, t, tk);
    A qr[DH], dor[DH], acc[DH];
    A D = A(0);
    for (int d = 0; d < DH; ++d) {
        qr[d] = to_acc(q[row * DH + d]);
        dor[d] = to_acc(dout[row * DH + d]);
        D += dor[d] * to_acc(out[row * DH + d]);
        acc[d] = A(0);
    }
    const A L = lse[row];
    for (unsigned k0 = 0; k0 < tk; k0 += FLASH_BC) {
        const unsigned n = umin_(FLASH_BC, tk - k0);
        __syncthreads();
        load_tile<T, DH>(ks, k, bg * tk + k0, n);
        load_tile<T, DH>(vs, v, bg * tk + k0, n);
        __syncthreads();
        if (!live) continue;
        for (unsigned j = 0; j < n; ++j) {
            A dot = A(0), dp = A(0);
            for (int d = 0; d < DH; ++d) {
                dot += qr[d] * to_acc(ks[j][d]);
                dp += dor[d] * to_acc(vs[j][d]);
            }
            A x = dot * scale;
            if (mrow) x += to_acc(mrow[k0 + j]);
            const A ds = exp_(x - L) * (dp - D);
            for (int d = 0; d < DH; ++d) acc[d] += ds * to_acc(ks[j][d]);
        }
    }
    if (live) {
        for (int d = 0; d < DH; ++d) dq[row * DH + d] = Store<T>::of(acc[d] * scale);
        dsum[row] = D;
    }
}

// dV_j = sum_i P_ij dO_i, dK_j = scale * sum_i dS_ij q_i, over every query row of the group
// (all `rep` heads that share this KV head), one key a thread.
template <class T, int DH>
__device__ void flash_bwd_dkdv(const T* q, const T* k, const T* v, const T* mask, const T* dout,
                               const typename AccOf<T>::type* lse,
                               const typename AccOf<T>::type* dsum, T* dk, T* dv, unsigned R,
                               unsigned t, unsigned tk, unsigned groups, double scale_) {
    typedef typename AccOf<T>::type A;
    const int BQ = FlashBq<DH>::value;
    __shared__ T kt[FLASH_BK][DH + FlashPad<T>::value];
    __shared__ T vt[FLASH_BK][DH + FlashPad<T>::value];
    __shared__ T qs[FlashBq<DH>::value][DH];
    __shared__ T dos[FlashBq<DH>::value][DH];
    __shared__ A ls[FlashBq<DH>::value];
    __shared__ A Ds[FlashBq<DH>::value];
    const A scale = A(scale_);
    const size_t bg = blockIdx.y;
    const unsigned key0 = blockIdx.x * FLASH_BK;
    const unsigned j = key0 + threadIdx.x;
    const bool live = j < tk;
    load_tile<T, DH>(kt, k, bg * tk + key0, umin_(FLASH_BK, tk - key0));
    load_tile<T, DH>(vt, v, bg * tk + key0, umin_(FLASH_BK, tk - key0));
    const unsigned me = threadIdx.x;
    A gk[DH], gv[DH];
    for (int d = 0; d < DH; ++d) gk[d] = gv[d] = A(0);
    for (unsigned r0 = 0; r0 < R; r0 += BQ) {
        const unsigned n = umin_(BQ, R - r0);
        __syncthreads();  // also orders the key tile's load before its first use
        load_tile<T, DH>(qs, q, bg * R + r0, n);
        load_tile<T, DH>(dos, dout, bg * R + r0, n);
        for (unsigned i = threadIdx.x; i < n; i += blockDim.x) {
            ls[i] = lse[bg * R + r0 + i];
            Ds[i] = dsum[bg * R + r0 + i];
        }
        __syncthreads();
        if (!live) continue;
        for (unsigned i = 0; i < n; ++i) {
            A dot = A(0), dp = A(0);
            for (int d = 0; d < DH; ++d) {
                dot += to_acc(qs[i][d]) * to_acc(kt[me][d]);
                dp += to_acc(dos[i][d]) * to_acc(vt[me][d]);
            }
            A x = dot * scale;
            const T* mrow = mask_row(mask, bg, groups, r0 + i, t, tk);
            if (mrow) x += to_acc(mrow[j]);
            const A p = exp_(x - ls[i]);
            const A ds = p * (dp - Ds[i]);
            for (int d = 0; d < DH; ++d) {
                gv[d] += p * to_acc(dos[i][d]);
                gk[d] += ds * to_acc(qs[i][d]);
            }
        }
    }
    if (live) {
        for (int d = 0; d < DH; ++d) {
            dk[(bg * tk + j) * DH + d] = Store<T>::of(gk[d] * scale);
            dv[(bg * tk + j) * DH + d] = Store<T>::of(gv[d]);
        }
    }
}

#define FLASH_ENTRIES(T, S, DH)                                                                  \
    extern "C" __global__ void flash_fwd_##S##_d##DH(const T* q, const T* k, const T* v,          \
                                                     const T* mask, T* out, AccOf<T>::type* lse,  \
                                                     unsigned R, unsigned t, unsigned tk,         \
                                                     unsigned groups, double scale) {             \
        flash_fwd<T, DH>(q, k, v, mask, out, lse, R, t, tk, groups, scale);                      \
    }                                                                                            \
    extern "C" __global__ void flash_bwd_dq_##S##_d##DH(                                          \
        const T* q, const T* k, const T* v, const T* mask, const T* out, const T* dout,          \
        const AccOf<T>::type* lse, AccOf<T>::type* dsum, T* dq, unsigned R, unsigned t,          \
        unsigned tk, unsigned groups, double scale) {                                            \
        flash_bwd_dq<T, DH>(q, k, v, mask, out, dout, lse, dsum, dq, R, t, tk, groups, scale);   \
    }                                                                                            \
    extern "C" __global__ void flash_bwd_dkdv_##S##_d##DH(                                        \
        const T* q, const T* k, const T* v, const T* mask, const T* dout,                        \
        const AccOf<T>::type* lse, const AccOf<T>::type* dsum, T* dk, T* dv, unsigned R,         \
        unsigned t, unsigned tk, unsigned groups, double scale) {                                \
        flash_bwd_dkdv<T, DH>(q, k, v, mask, dout, lse, dsum, dk, dv, R, t, tk, groups, scale);  \
    }

#define FLASH_HALF_AND_SINGLE(T, S) \
    FLASH_ENTRIES(T, S, 32) FLASH_ENTRIES(T, S, 64) FLASH_ENTRIES(T, S, 96) FLASH_ENTRIES(T, S, 128)
FLASH_HALF_AND_SINGLE(float, f32)
FLASH_HALF_AND_SINGLE(bf16, bf16)
FLASH_ENTRIES(double, f64, 32)
FLASH_ENTRIES(double, f64, 64)
