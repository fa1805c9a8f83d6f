// Attention forward on tensor cores (bf16 products, f32 sums): the kernel of flash.cuh's
// forward for mixed precision, where products are bf16 anyway (as PyTorch's autocast runs
// attention). Q, K, V are rounded to bf16 as they enter shared memory, scores and the softmax
// stay f32, the probabilities are rounded to bf16 for P V, as flash-attention does. Same
// layout, mask and outputs as flash_fwd (flash.cuh), head size 64.
//
// A block takes 64 query rows, 16 a warp; key tiles of 64. Each warp keeps its Q rows and its
// output as wmma fragments; the output is rescaled through shared memory when the row maxima
// grow (a fragment's element layout is the hardware's own).
#pragma once
#include "flash.cuh"

#ifndef PREFTUNE_EMULATE
#include <mma.h>
#endif

#define TC_BR 64  // query rows a block (4 warps of 16)
#define TC_BC 64  // keys a tile
#define TC_DH 64  // head size

typedef nvcuda::wmma::fragment<nvcuda::wmma::matrix_a, 16, 16, 16, bf16, nvcuda::wmma::row_major>
    FragA;
typedef nvcuda::wmma::fragment<nvcuda::wmma::matrix_b, 16, 16, 16, bf16, nvcuda::wmma::col_major>
    FragBt;  // a row-major [n, k] tile read as the [k, n] operand: K for Q K^T
typedef nvcuda::wmma::fragment<nvcuda::wmma::matrix_b, 16, 16, 16, bf16, nvcuda::wmma::row_major>
    FragB;
typedef nvcuda::wmma::fragment<nvcuda::wmma::accumulator, 16, 16, 16, float> FragC;

__device__ __forceinline__ bf16 to_bf16(float x) { return __float2bfloat16(x); }
__device__ __forceinline__ bf16 to_bf16(bf16 x) { return x; }

template <class T>
__device__ void flash_fwd_tc(const T* q, const T* k, const T* v, const T* mask, T* out, float* lse,
                             unsigned R, unsigned t, unsigned tk, unsigned groups, double scale_) {
    using namespace nvcuda;
    __shared__ __align__(32) bf16 qp[TC_BR][TC_DH];  // Q, then each warp's P (TC_BC == TC_DH)
    __shared__ __align__(32) bf16 ks[TC_BC][TC_DH];
    __shared__ __align__(32) bf16 vs[TC_BC][TC_DH];
    __shared__ __align__(32) float st[TC_BR][TC_BC];  // scores, then the output being rescaled
    __shared__ float m_s[TC_BR], l_s[TC_BR], c_s[TC_BR];
    const float scale = (float)scale_;
    const size_t bg = blockIdx.y;
    const unsigned r0 = blockIdx.x * TC_BR;
    const unsigned warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    for (unsigned i = threadIdx.x; i < TC_BR * TC_DH; i += blockDim.x) {
        const unsigned r = i / TC_DH, d = i % TC_DH;
        qp[r][d] = r0 + r < R ? to_bf16(q[(bg * R + r0 + r) * TC_DH + d]) : __float2bfloat16(0.0f);
    }
    if (threadIdx.x < TC_BR) {
        m_s[threadIdx.x] = -INFINITY;
        l_s[threadIdx.x] = 0.0f;
    }
    __syncthreads();
    FragA qf[TC_DH / 16];
    for (int kk = 0; kk < TC_DH / 16; ++kk) wmma::load_matrix_sync(qf[kk], &qp[warp * 16][kk * 16], TC_DH);
    FragC of[TC_DH / 16];
    for (int nb = 0; nb < TC_DH / 16; ++nb) wmma::fill_fragment(of[nb], 0.0f);
    // Softmax rows: two lanes a row, 32 columns each.
    const unsigned row = warp * 16 + lane / 2, c0 = (lane % 2) * (TC_BC / 2);
    const bool live = r0 + row < R;
    const T* mrow = live ? mask_row(mask, bg, groups, r0 + row, t, tk) : nullptr;
    for (unsigned k0 = 0; k0 < tk; k0 += TC_BC) {
        const unsigned n = umin_(TC_BC, tk - k0);
        __syncthreads();  // every warp is done with the previous K, V (and Q, the first time)
        for (unsigned i = threadIdx.x; i < TC_BC * TC_DH; i += blockDim.x) {
            const unsigned j = i / TC_DH, d = i % TC_DH;
            const bool in = j < n;
            ks[j][d] = in ? to_bf16(k[(bg * tk + k0 + j) * TC_DH + d]) : __float2bfloat16(0.0f);
            vs[j][d] = in ? to_bf16(v[(bg * tk + k0 + j) * TC_DH + d]) : __float2bfloat16(0.0f);
        }
        __syncthreads();
        // S = Q K^T for this warp's 16 rows.
        for (int nb = 0; nb < TC_BC / 16; ++nb) {
            FragC sf;
            wmma::fill_fragment(sf, 0.0f);
            for (int kk = 0; kk < TC_DH / 16; ++kk) {
                FragBt kf;
                wmma::load_matrix_sync(kf, &ks[nb * 16][kk * 16], TC_DH);
                wmma::mma_sync(sf, qf[kk], kf, sf);
            }
            wmma::store_matrix_sync(&st[warp * 16][nb * 16], sf, TC_BC, wmma::mem_row_major);
        }
        __syncwarp();
        float mx = -INFINITY;
        for (unsigned c = c0; c < c0 + TC_BC / 2; ++c) {
            float x = -INFINITY;
            if (c < n) {
                x = st[row][c] * scale;
                if (mrow) x += to_acc(mrow[k0 + c]);
            }
            st[row][c] = x;
            mx = fmaxf(mx, x);
        }
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
        const float m_old = m_s[row];
        const float mt = fmaxf(m_old, mx);
        const float corr = m_old == -INFINITY ? 0.0f : expf(m_old - mt);
        float sum = 0.0f;
        for (unsigned c = c0; c < c0 + TC_BC / 2; ++c) {
            const float p = mt == -INFINITY ? 0.0f : expf(st[row][c] - mt);
            qp[row][c] = __float2bfloat16(p);
            sum += p;
        }
        sum += __shfl_xor_sync(0xffffffffu, sum, 1);
        __syncwarp();  // both lanes of a row have read m_s
        if (lane % 2 == 0) {
            m_s[row] = mt;
            l_s[row] = l_s[row] * corr + sum;
            c_s[row] = corr;
        }
        // O *= corr, row by row, through shared memory.
        for (int nb = 0; nb < TC_DH / 16; ++nb)
            wmma::store_matrix_sync(&st[warp * 16][nb * 16], of[nb], TC_BC, wmma::mem_row_major);
        __syncwarp();
        for (unsigned i = lane; i < 16 * TC_DH; i += 32) {
            const unsigned r = warp * 16 + i / TC_DH;
            st[r][i % TC_DH] *= c_s[r];
        }
        __syncwarp();
        for (int nb = 0; nb < TC_DH / 16; ++nb)
            wmma::load_matrix_sync(of[nb], &st[warp * 16][nb * 16], TC_BC, wmma::mem_row_major);
        // O += P V
        for (int nb = 0; nb < TC_DH / 16; ++nb) {
            for (int kb = 0; kb < TC_BC / 16; ++kb) {
                FragA pf;
                FragB vf;
                wmma::load_matrix_sync(pf, &qp[warp * 16][kb * 16], TC_BC);
                wmma::load_matrix_sync(vf, &vs[kb * 16][nb * 16], TC_DH);
                wmma::mma_sync(of[nb], pf, vf, of[nb]);
            }
        }
    }
    for (int nb = 0; nb < TC_DH / 16; ++nb)
        wmma::store_matrix_sync(&st[warp * 16][nb * 16], of[nb], TC_BC, wmma::mem_row_major);
    __syncwarp();
    for (unsigned i = lane; i < 16 * TC_DH; i += 32) {
        const unsigned r = warp * 16 + i / TC_DH, d = i % TC_DH;
        if (r0 + r < R) out[(bg * R + r0 + r) * TC_DH + d] = Store<T>::of(st[r][d] / l_s[r]);
    }
    if (lane < 16) {
        const unsigned r = warp * 16 + lane;
        if (r0 + r < R) lse[bg * R + r0 + r] = m_s[r] + logf(l_s[r]);
    }
}

#define FLASH_TC_ENTRIES(T, S)                                                                   \
    extern "C" __global__ void flash_fwd_tc_##S##_d64(const T* q, const T* k, const T* v,         \
                                                      const T* mask, T* out, float* lse,         \
                                                      unsigned R, unsigned t, unsigned tk,       \
                                                      unsigned groups, double scale) {           \
        flash_fwd_tc<T>(q, k, v, mask, out, lse, R, t, tk, groups, scale);                       \
    }
FLASH_TC_ENTRIES(float, f32)
FLASH_TC_ENTRIES(bf16, bf16)
