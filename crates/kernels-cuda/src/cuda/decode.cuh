// Attention for decoding steps (one new position a row), outside autograd: the sampling loops'
// passes need no backward. softmax(scale * q K^T + mask) V for the R query heads of each KV
// group (its `rep` heads), which read the group's keys and values once between them. The keys
// are split in chunks over the grid's x axis so that a small batch still fills the GPU
// (flash-decoding): block (s, bg) folds keys [s * chunk, (s + 1) * chunk) into a partial softmax
// state per query head (largest score m, sum l, output o not yet divided by l), and
// `flash_decode_combine` merges each row's partials into the output.
//
// Layout: q and out are [BG, R, DH] (BG = batch * groups). Group bg's key j is the DH elements at
// k + bg * kv_stride + j * DH (a KV cache buffer read in place: kv_stride is its capacity * DH);
// the first tk keys count, or, when `limit` is set, the keys j <= limit[0] among them (a
// fixed-shape decoding step's written positions). `mask` (nullable) is additive, [batch, tk].
// Partials are f32: part_o [BG * R, splits, DH], part_ml [BG * R, splits, 2] (m, l).
//
// A warp takes one key at a time, its lanes DH / 32 elements each; the block's warps take
// consecutive keys and merge their states at the end. Every warp runs the same number of
// iterations (a key past the chunk scores -inf), since warp shuffles are collective.
#pragma once
#include "common.cuh"

#define DECODE_WARPS 4  // warps a block (keys folded at once)
#define DECODE_RMAX 8   // query heads a KV group, at most

template <class T, int DH>
__device__ void flash_decode(const T* q, const T* k, const T* v, const T* mask,
                             const unsigned* limit, float* part_o, float* part_ml, unsigned R,
                             unsigned tk, unsigned groups, unsigned long long kv_stride,
                             unsigned chunk, double scale_) {
    const int E = DH / 32;
    const unsigned lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const size_t bg = blockIdx.y;
    const unsigned s = blockIdx.x, splits = gridDim.x;
    unsigned n = tk;
    if (limit && limit[0] < n) n = limit[0] + 1;
    const unsigned j0 = s * chunk;
    const unsigned j1 = j0 + chunk < n ? j0 + chunk : n;
    const unsigned span = j1 > j0 ? j1 - j0 : 0;
    const unsigned iters = (span + DECODE_WARPS - 1) / DECODE_WARPS;
    const T* mrow = mask ? mask + (bg / groups) * (size_t)tk : nullptr;
    const T* kb = k + bg * kv_stride;
    const T* vb = v + bg * kv_stride;
    const float scale = (float)scale_;
    const float ninf = neg_inf<float>();
    float qr[DECODE_RMAX][E], o[DECODE_RMAX][E], m[DECODE_RMAX], l[DECODE_RMAX];
UNROLL
    for (int r = 0; r < DECODE_RMAX; ++r) {
        m[r] = ninf;
        l[r] = 0.f;
UNROLL
        for (int e = 0; e < E; ++e) {
            o[r][e] = 0.f;
            qr[r][e] = r < (int)R ? to_acc(q[(bg * R + r) * DH + lane * E + e]) : 0.f;
        }
    }
    for (unsigned it = 0; it < iters; ++it) {
        const unsigned j = j0 + it * DECODE_WARPS + warp;
        const bool live = j < j1;
        float kr[E], vr[E];
UNROLL
        for (int e = 0; e < E; ++e) {
            kr[e] = live ? to_acc(kb[(size_t)j * DH + lane * E + e]) : 0.f;
            vr[e] = live ? to_acc(vb[(size_t)j * DH + lane * E + e]) : 0.f;
        }
        const float add = live && mrow ? to_acc(mrow[j]) : 0.f;
UNROLL
        for (int r = 0; r < DECODE_RMAX; ++r) {
            if (r >= (int)R) break;  // the same for the whole block
            float dot = 0.f;
UNROLL
            for (int e = 0; e < E; ++e) dot += qr[r][e] * kr[e];
            dot = warp_sum(dot);
            if (!live) continue;
            const float x = dot * scale + add;
            const float mt = max_(m[r], x);
            // Nothing seen yet: nothing to rescale. Scores of -inf so far add nothing
            // (exp(-inf - -inf) would be NaN).
            const float corr = m[r] == ninf ? 0.f : exp_(m[r] - mt);
            const float p = mt == ninf ? 0.f : exp_(x - mt);
            l[r] = l[r] * corr + p;
UNROLL
            for (int e = 0; e < E; ++e) o[r][e] = o[r][e] * corr + p * vr[e];
            m[r] = mt;
        }
    }
    __shared__ float sm_m[DECODE_WARPS][DECODE_RMAX];
    __shared__ float sm_l[DECODE_WARPS][DECODE_RMAX];
    __shared__ float sm_o[DECODE_WARPS][DECODE_RMAX][DH];
UNROLL
    for (int r = 0; r < DECODE_RMAX; ++r) {
        if (lane == 0) {
            sm_m[warp][r] = m[r];
            sm_l[warp][r] = l[r];
        }
UNROLL
        for (int e = 0; e < E; ++e) sm_o[warp][r][lane * E + e] = o[r][e];
    }
    __syncthreads();
    for (unsigned i = threadIdx.x; i < R * DH; i += blockDim.x) {
        const unsigned r = i / DH, d = i % DH;
        float M = ninf;
        for (int w = 0; w < DECODE_WARPS; ++w) M = max_(M, sm_m[w][r]);
        float L = 0.f, O = 0.f;
        for (int w = 0; w < DECODE_WARPS; ++w) {
            if (sm_m[w][r] == ninf) continue;
            const float c = exp_(sm_m[w][r] - M);
            L += sm_l[w][r] * c;
            O += sm_o[w][r][d] * c;
        }
        const size_t part = (bg * R + r) * splits + s;
        part_o[part * DH + d] = O;
        if (d == 0) {
            part_ml[part * 2] = M;
            part_ml[part * 2 + 1] = L;
        }
    }
}

// out row = sum_s o_s e^(m_s - M) / sum_s l_s e^(m_s - M), M the largest m_s; one block a row.
template <class T>
__device__ void flash_decode_combine(const float* part_o, const float* part_ml, T* out,
                                     unsigned splits, unsigned dh) {
    const size_t row = blockIdx.x;
    const float ninf = neg_inf<float>();
    float M = ninf;
    for (unsigned s = 0; s < splits; ++s) M = max_(M, part_ml[(row * splits + s) * 2]);
    for (unsigned d = threadIdx.x; d < dh; d += blockDim.x) {
        float L = 0.f, O = 0.f;
        for (unsigned s = 0; s < splits; ++s) {
            const float ms = part_ml[(row * splits + s) * 2];
            if (ms == ninf) continue;
            const float c = exp_(ms - M);
            L += part_ml[(row * splits + s) * 2 + 1] * c;
            O += part_o[(row * splits + s) * dh + d] * c;
        }
        out[row * dh + d] = Store<T>::of(O / L);
    }
}

#define DECODE_ENTRIES(T, S, DH)                                                                 \
    extern "C" __global__ void flash_decode_##S##_d##DH(                                         \
        const T* q, const T* k, const T* v, const T* mask, const unsigned* limit, float* part_o, \
        float* part_ml, unsigned R, unsigned tk, unsigned groups, unsigned long long kv_stride,  \
        unsigned chunk, double scale) {                                                          \
        flash_decode<T, DH>(q, k, v, mask, limit, part_o, part_ml, R, tk, groups, kv_stride,     \
                            chunk, scale);                                                       \
    }

#define DECODE_TYPE(T, S)                                                                        \
    DECODE_ENTRIES(T, S, 32)                                                                     \
    DECODE_ENTRIES(T, S, 64)                                                                     \
    DECODE_ENTRIES(T, S, 96)                                                                     \
    DECODE_ENTRIES(T, S, 128)                                                                    \
    extern "C" __global__ void flash_decode_combine_##S(const float* part_o,                     \
                                                        const float* part_ml, T* out,            \
                                                        unsigned splits, unsigned dh) {          \
        flash_decode_combine<T>(part_o, part_ml, out, splits, dh);                               \
    }
DECODE_TYPE(float, f32)
DECODE_TYPE(bf16, bf16)
