// Log-softmax + gather over the vocabulary, for rows of logits `z` (one block per row), and its
// backward. Logits are scaled by `inv_temp` first. Nothing of size [rows, V] is written by the
// forward pass; backward writes d z for the rows it is given (the caller goes in chunks).
#pragma once
#include "common.cuh"

// Per row: logp = z[label] * it - lse, lse = log(sum exp(z * it)), hit = (label is the first
// argmax), mean = mean(z * it). One pass over the row (an online max and sum per thread).
template <class T>
__device__ void lse_gather(const T* z, const unsigned* labels, typename AccOf<T>::type* logp,
                           typename AccOf<T>::type* lse_out, unsigned char* hit,
                           typename AccOf<T>::type* mean, unsigned v, double inv_temp) {
    typedef typename AccOf<T>::type A;
    const size_t row = blockIdx.x;
    const T* zr = z + row * v;
    const A it = A(inv_temp);
    A m = neg_inf<A>(), s = 0, sum = 0;
    unsigned arg = 0xffffffffu;
    for (unsigned i = threadIdx.x; i < v; i += blockDim.x) {
        const A x = to_acc(zr[i]) * it;
        sum += x;
        if (x > m) {
            s = s * exp_(m - x) + A(1);
            m = x;
            arg = i;
        } else if (x > neg_inf<A>()) {  // a -inf logit adds nothing (and -inf - -inf is NaN)
            s += exp_(x - m);
        }
    }
    const A mx = block_max(m);
    // a thread that saw no value (v < blockDim.x) has m = -inf and s = 0
    const A scaled = m == neg_inf<A>() ? A(0) : s * exp_(m - mx);
    const A total = block_sum(scaled);
    sum = block_sum(sum);
    const unsigned first = block_min_u32(m == mx ? arg : 0xffffffffu);
    if (threadIdx.x == 0) {
        const unsigned label = labels[row];
        const A l = mx + log_(total);
        lse_out[row] = l;
        logp[row] = label < v ? to_acc(zr[label]) * it - l : A(NAN);
        hit[row] = first == label ? 1 : 0;
        mean[row] = sum / A(v);
    }
}

// dz[r, j] = g[r] * it * ([j == label[r]] - exp(z[r, j] * it - lse[r]))
template <class T>
__device__ void lse_gather_bwd(const T* z, const unsigned* labels,
                               const typename AccOf<T>::type* g,
                               const typename AccOf<T>::type* lse, T* dz, size_t rows,
                               unsigned v, double inv_temp) {
    typedef typename AccOf<T>::type A;
    const A it = A(inv_temp);
    FOR_EACH(i, rows * v) {
        const size_t r = i / v;
        const unsigned j = (unsigned)(i % v);
        const A p = exp_(to_acc(z[i]) * it - lse[r]);
        dz[i] = Store<T>::of(g[r] * it * ((j == labels[r] ? A(1) : A(0)) - p));
    }
}

#define LOGSOFTMAX_ENTRIES(T, S)                                                                 \
    extern "C" __global__ void lse_gather_##S(const T* z, const unsigned* labels,                 \
                                              AccOf<T>::type* logp, AccOf<T>::type* lse,          \
                                              unsigned char* hit, AccOf<T>::type* mean,           \
                                              unsigned v, double inv_temp) {                     \
        lse_gather<T>(z, labels, logp, lse, hit, mean, v, inv_temp);                             \
    }                                                                                            \
    extern "C" __global__ void lse_gather_bwd_##S(const T* z, const unsigned* labels,             \
                                                  const AccOf<T>::type* g,                       \
                                                  const AccOf<T>::type* lse, T* dz, size_t rows, \
                                                  unsigned v, double inv_temp) {                 \
        lse_gather_bwd<T>(z, labels, g, lse, dz, rows, v, inv_temp);                             \
    }
FOR_TYPES(LOGSOFTMAX_ENTRIES)
