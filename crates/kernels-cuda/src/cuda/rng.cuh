// Counter-based random numbers: the same bits as preftune-kernels' `rng` module (SplitMix64's
// output function over key + (i + 1) * increment), so a mask drawn here equals the CPU's.
#pragma once
#include "common.cuh"

__device__ __forceinline__ unsigned long long splitmix_mix(unsigned long long z) {
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

// out[i] = x[i] * 0 where value i of the stream `key` is below p, else x[i] * keep (inverted
// dropout, in the accumulator type; NaN stays NaN). Its own backward: dx = dropout(dy).
template <class T>
__device__ void dropout(const T* x, T* out, size_t n, unsigned long long key, float p, float keep) {
    typedef typename AccOf<T>::type A;
    FOR_EACH(i, n) {
        const unsigned long long h =
            splitmix_mix(key + ((unsigned long long)i + 1ull) * 0x9E3779B97F4A7C15ull);
        const float u = (float)(h >> 40) * (1.0f / 16777216.0f);
        out[i] = Store<T>::of(to_acc(x[i]) * (u < p ? A(0) : A(keep)));
    }
}

#define RNG_ENTRIES(T, S)                                                                        \
    extern "C" __global__ void dropout_##S(const T* x, T* out, size_t n, unsigned long long key, \
                                           float p, float keep) {                                \
        dropout<T>(x, out, n, key, p, keep);                                                     \
    }
FOR_TYPES(RNG_ENTRIES)
