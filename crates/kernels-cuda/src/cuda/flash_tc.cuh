// Attention forward on tensor cores (bf16 products, f32 sums): the kernel of flash.cuh's
// forward for mixed precision, where products are bf16 anyway (as PyTorch's autocast runs
// attention). Q, K, V are rounded to bf16 as they enter shared memory, scores and the softmax
// stay f32, the probabilities are rounded to bf16 for P V, as flash-attention does. Same
// layout, mask and outputs as flash_fwd (flash.cuh), head sizes 64 and 128.
//
// A block takes 64 query rows (32 at head size 128), 16 a warp; key tiles of as many keys. Each warp keeps its Q rows and its
// output as wmma fragments; the output is rescaled through shared memory when the row maxima
// grow (a fragment's element layout is the hardware's own).
#pragma once
#include "flash.cuh"

#ifndef PREFTUNE_EMULATE
#include <mma.h>
#endif

// Tile sizes by head size: 64 query rows a block (4 warps of 16) and key tiles of 64 at head
// size 64; 32 and 32 (2 warps) at 128, so that shared memory stays under 48 KB.
template <int DH> struct TcShape {
    static const int BR = DH <= 64 ? 64 : 32;  // query rows a block: forward and dQ
    static const int BC = BR;                  // keys a tile (forward), a block (dK/dV)
    static const int THREADS = BR / 16 * 32;
};

typedef nvcuda::wmma::fragment<nvcuda::wmma::matrix_a, 16, 16, 16, bf16, nvcuda::wmma::row_major>
    FragA;
typedef nvcuda::wmma::fragment<nvcuda::wmma::matrix_b, 16, 16, 16, bf16, nvcuda::wmma::col_major>
    FragBt;  // a row-major [n, k] tile read as the [k, n] operand: K for Q K^T
typedef nvcuda::wmma::fragment<nvcuda::wmma::matrix_b, 16, 16, 16, bf16, nvcuda::wmma::row_major>
    FragB;
typedef nvcuda::wmma::fragment<nvcuda::wmma::accumulator, 16, 16, 16, float> FragC;

__device__ __forceinline__ bf16 to_bf16(float x) { return __float2bfloat16(x); }
__device__ __forceinline__ bf16 to_bf16(bf16 x) { return x; }

template <class T, int DH>
__device__ void flash_fwd_tc(const T* q, const T* k, const T* v, const T* mask, T* out, float* lse,
                             unsigned R, unsigned t, unsigned tk, unsigned groups, double scale_) {
    using namespace nvcuda;
    const int TC_BR = TcShape<DH>::BR, TC_BC = TcShape<DH>::BC, TC_DH = DH;
    static_assert(TcShape<DH>::BC <= DH, "P is kept in Q's tile");
    __shared__ __align__(32) bf16 qp[TcShape<DH>::BR][DH];  // Q, then each warp's P
    __shared__ __align__(32) bf16 ks[TcShape<DH>::BC][DH];
    __shared__ __align__(32) bf16 vs[TcShape<DH>::BC][DH];
    __shared__ __align__(32) float st[TcShape<DH>::BR][DH];  // scores, then the output
    __shared__ float m_s[TcShape<DH>::BR], l_s[TcShape<DH>::BR], c_s[TcShape<DH>::BR];
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
            wmma::store_matrix_sync(&st[warp * 16][nb * 16], sf, TC_DH, wmma::mem_row_major);
        }
        __syncwarp();
        // Lane l starts its 32 columns l further on, so that the 32 lanes (on 16 rows) touch 32
        // banks at each step instead of one.
        float mx = -INFINITY;
        for (unsigned j = 0; j < TC_BC / 2; ++j) {
            const unsigned c = c0 + (j + lane) % (TC_BC / 2);
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
        for (unsigned j = 0; j < TC_BC / 2; ++j) {
            const unsigned c = c0 + (j + lane) % (TC_BC / 2);
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
            wmma::store_matrix_sync(&st[warp * 16][nb * 16], of[nb], TC_DH, wmma::mem_row_major);
        __syncwarp();
        for (unsigned i = lane; i < 16 * TC_DH; i += 32) {
            const unsigned r = warp * 16 + i / TC_DH;
            st[r][i % TC_DH] *= c_s[r];
        }
        __syncwarp();
        for (int nb = 0; nb < TC_DH / 16; ++nb)
            wmma::load_matrix_sync(of[nb], &st[warp * 16][nb * 16], TC_DH, wmma::mem_row_major);
        // O += P V
        for (int nb = 0; nb < TC_DH / 16; ++nb) {
            for (int kb = 0; kb < TC_BC / 16; ++kb) {
                FragA pf;
                FragB vf;
                wmma::load_matrix_sync(pf, &qp[warp * 16][kb * 16], TC_DH);
                wmma::load_matrix_sync(vf, &vs[kb * 16][nb * 16], TC_DH);
                wmma::mma_sync(of[nb], pf, vf, of[nb]);
            }
        }
    }
    for (int nb = 0; nb < TC_DH / 16; ++nb)
        wmma::store_matrix_sync(&st[warp * 16][nb * 16], of[nb], TC_DH, wmma::mem_row_major);
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

// bf16 wmma needs sm_80 or newer: a build for older GPUs (CUDA_COMPUTE_CAP < 80) leaves these
// entry points out, and the model does not pick them there (cuda_kernels::tensor_cores_available).
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
#define FLASH_TC_ENTRIES(T, S, DH)                                                               \
    extern "C" __global__ void flash_fwd_tc_##S##_d##DH(const T* q, const T* k, const T* v,       \
                                                        const T* mask, T* out, float* lse,       \
                                                        unsigned R, unsigned t, unsigned tk,     \
                                                        unsigned groups, double scale) {         \
        flash_fwd_tc<T, DH>(q, k, v, mask, out, lse, R, t, tk, groups, scale);                   \
    }
FLASH_TC_ENTRIES(float, f32, 64)
FLASH_TC_ENTRIES(bf16, bf16, 64)
FLASH_TC_ENTRIES(float, f32, 128)
FLASH_TC_ENTRIES(bf16, bf16, 128)
#endif

// Backward on tensor cores, in two kernels as on CUDA cores (flash.cuh): dQ a query block at a
// time (writing D = rowsum(dO * O) first), then dK and dV a key block at a time. Probabilities
// are recomputed in f32 from bf16 products and each row's log-sum-exp; every product takes
// bf16 operands (dS and P rounded, as flash-attention does) and sums in f32.

#define TC_BK 32  // dQ kernel: keys a tile
#define TC_BQ 32  // dK/dV kernel: query rows a tile

// Rows [row0, row0 + n) of a [., TC_DH] tensor as bf16 into a shared tile of `rows` rows
// (zeros past n), all threads together.
template <class T, int DH>
__device__ __forceinline__ void load_bf16_tile(bf16 (*tile)[DH], unsigned rows, const T* src,
                                               size_t row0, unsigned n) {
    for (unsigned i = threadIdx.x; i < rows * DH; i += blockDim.x) {
        const unsigned r = i / DH, d = i % DH;
        tile[r][d] = r < n ? to_bf16(src[(row0 + r) * DH + d]) : __float2bfloat16(0.0f);
    }
}

template <class T, int DH>
__device__ void flash_bwd_dq_tc(const T* q, const T* k, const T* v, const T* mask, const T* out,
                                const T* dout, const float* lse, float* dsum, T* dq, unsigned R,
                                unsigned t, unsigned tk, unsigned groups, double scale_) {
    using namespace nvcuda;
    const int TC_BR = TcShape<DH>::BR, TC_DH = DH;
    __shared__ __align__(32) bf16 qd[2][TcShape<DH>::BR][DH];  // Q and dO; at the end, dQ as f32
    __shared__ __align__(32) bf16 ks[TC_BK][DH];
    __shared__ __align__(32) bf16 vs[TC_BK][DH];
    __shared__ __align__(32) float sp[TcShape<DH>::BR][TC_BK];  // scores, then probabilities
    __shared__ __align__(32) float dp[TcShape<DH>::BR][TC_BK];  // dP
    __shared__ __align__(32) bf16 ds[TcShape<DH>::BR][TC_BK];   // scale * dS
    __shared__ float lse_s[TcShape<DH>::BR], d_s[TcShape<DH>::BR];
    const float scale = (float)scale_;
    const size_t bg = blockIdx.y;
    const unsigned r0 = blockIdx.x * TC_BR;
    const unsigned warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const unsigned nr = umin_(TC_BR, R - r0);
    load_bf16_tile(qd[0], TC_BR, q, bg * R + r0, nr);
    load_bf16_tile(qd[1], TC_BR, dout, bg * R + r0, nr);
    // D = rowsum(dO * O) in f32 from the inputs as given, two lanes a row.
    {
        const unsigned row = warp * 16 + lane / 2, d0 = (lane % 2) * (TC_DH / 2);
        float s = 0.0f;
        if (row < nr) {
            const size_t base = (bg * R + r0 + row) * TC_DH;
            for (unsigned d = d0; d < d0 + TC_DH / 2; ++d) s += to_acc(dout[base + d]) * to_acc(out[base + d]);
        }
        s += __shfl_xor_sync(0xffffffffu, s, 1);
        if (lane % 2 == 0) {
            d_s[row] = s;
            lse_s[row] = row < nr ? lse[bg * R + r0 + row] : 0.0f;
            if (row < nr) dsum[bg * R + r0 + row] = s;
        }
    }
    __syncthreads();
    FragA qf[TC_DH / 16], gf[TC_DH / 16];
    for (int kk = 0; kk < TC_DH / 16; ++kk) {
        wmma::load_matrix_sync(qf[kk], &qd[0][warp * 16][kk * 16], TC_DH);
        wmma::load_matrix_sync(gf[kk], &qd[1][warp * 16][kk * 16], TC_DH);
    }
    FragC acc[TC_DH / 16];
    for (int nb = 0; nb < TC_DH / 16; ++nb) wmma::fill_fragment(acc[nb], 0.0f);
    const unsigned row = warp * 16 + lane / 2, c0 = (lane % 2) * (TC_BK / 2);
    const bool live = row < nr;
    const T* mrow = live ? mask_row(mask, bg, groups, r0 + row, t, tk) : nullptr;
    for (unsigned k0 = 0; k0 < tk; k0 += TC_BK) {
        const unsigned n = umin_(TC_BK, tk - k0);
        __syncthreads();
        load_bf16_tile(ks, TC_BK, k, bg * tk + k0, n);
        load_bf16_tile(vs, TC_BK, v, bg * tk + k0, n);
        __syncthreads();
        for (int nb = 0; nb < TC_BK / 16; ++nb) {
            FragC sf, pf;
            wmma::fill_fragment(sf, 0.0f);
            wmma::fill_fragment(pf, 0.0f);
            for (int kk = 0; kk < TC_DH / 16; ++kk) {
                FragBt kf, vf;
                wmma::load_matrix_sync(kf, &ks[nb * 16][kk * 16], TC_DH);
                wmma::load_matrix_sync(vf, &vs[nb * 16][kk * 16], TC_DH);
                wmma::mma_sync(sf, qf[kk], kf, sf);
                wmma::mma_sync(pf, gf[kk], vf, pf);
            }
            wmma::store_matrix_sync(&sp[warp * 16][nb * 16], sf, TC_BK, wmma::mem_row_major);
            wmma::store_matrix_sync(&dp[warp * 16][nb * 16], pf, TC_BK, wmma::mem_row_major);
        }
        __syncwarp();
        for (unsigned j = 0; j < TC_BK / 2; ++j) {  // staggered as in the forward pass
            const unsigned c = c0 + (j + lane / 2) % (TC_BK / 2);
            float g = 0.0f;
            if (live && c < n) {
                float x = sp[row][c] * scale;
                if (mrow) x += to_acc(mrow[k0 + c]);
                const float p = expf(x - lse_s[row]);
                g = p * (dp[row][c] - d_s[row]) * scale;
            }
            ds[row][c] = __float2bfloat16(g);
        }
        __syncwarp();
        for (int nb = 0; nb < TC_DH / 16; ++nb) {
            for (int kb = 0; kb < TC_BK / 16; ++kb) {
                FragA af;
                FragB kf;
                wmma::load_matrix_sync(af, &ds[warp * 16][kb * 16], TC_BK);
                wmma::load_matrix_sync(kf, &ks[kb * 16][nb * 16], TC_DH);
                wmma::mma_sync(acc[nb], af, kf, acc[nb]);
            }
        }
    }
    __syncthreads();  // every warp is done with Q and dO: their space stages dQ
    float(*stage)[DH] = reinterpret_cast<float(*)[DH]>(&qd[0][0][0]);
    for (int nb = 0; nb < TC_DH / 16; ++nb)
        wmma::store_matrix_sync(&stage[warp * 16][nb * 16], acc[nb], TC_DH, wmma::mem_row_major);
    __syncwarp();
    for (unsigned i = lane; i < 16 * TC_DH; i += 32) {
        const unsigned r = warp * 16 + i / TC_DH, d = i % TC_DH;
        if (r < nr) dq[(bg * R + r0 + r) * TC_DH + d] = Store<T>::of(stage[r][d]);
    }
}

// This warp's 16 rows of `f` (rows past n skipped) to dst, through the warp's rows of `stage`.
template <class T, int TC_DH>
__device__ __forceinline__ void write_key_rows(nvcuda::wmma::fragment<nvcuda::wmma::accumulator, 16, 16, 16, float> (&f)[TC_DH / 16],
                                               float (*stage)[TC_DH], T* dst, unsigned n) {
    using namespace nvcuda;
    const unsigned warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    for (int nb = 0; nb < TC_DH / 16; ++nb)
        wmma::store_matrix_sync(&stage[warp * 16][nb * 16], f[nb], TC_DH, wmma::mem_row_major);
    __syncwarp();
    for (unsigned i = lane; i < 16 * TC_DH; i += 32) {
        const unsigned r = warp * 16 + i / TC_DH, d = i % TC_DH;
        if (r < n) dst[r * TC_DH + d] = Store<T>::of(stage[r][d]);
    }
    __syncwarp();  // the stage's rows take the next result
}

template <class T, int DH>
__device__ void flash_bwd_dkdv_tc(const T* q, const T* k, const T* v, const T* mask,
                                  const T* dout, const float* lse, const float* dsum, T* dk, T* dv,
                                  unsigned R, unsigned t, unsigned tk, unsigned groups,
                                  double scale_) {
    using namespace nvcuda;
    const int TC_BC = TcShape<DH>::BC, TC_DH = DH;
    __shared__ __align__(32) bf16 kv[2][TcShape<DH>::BC][DH];  // K and V; then dK or dV as f32
    __shared__ __align__(32) bf16 qs[TC_BQ][DH];
    __shared__ __align__(32) bf16 gs[TC_BQ][DH];                // dO
    __shared__ __align__(32) float sp[TcShape<DH>::BC][TC_BQ];  // S^T, then P^T
    __shared__ __align__(32) float dp[TcShape<DH>::BC][TC_BQ];  // dP^T
    __shared__ __align__(32) bf16 pt[TcShape<DH>::BC][TC_BQ];   // P^T, then scale * dS^T
    __shared__ float lse_s[TC_BQ], d_s[TC_BQ];
    const float scale = (float)scale_;
    const size_t bg = blockIdx.y;
    const unsigned key0 = blockIdx.x * TC_BC;
    const unsigned warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const unsigned nk = umin_(TC_BC, tk - key0);
    load_bf16_tile(kv[0], TC_BC, k, bg * tk + key0, nk);
    load_bf16_tile(kv[1], TC_BC, v, bg * tk + key0, nk);
    __syncthreads();
    FragA kf[TC_DH / 16], vf[TC_DH / 16];
    for (int kk = 0; kk < TC_DH / 16; ++kk) {
        wmma::load_matrix_sync(kf[kk], &kv[0][warp * 16][kk * 16], TC_DH);
        wmma::load_matrix_sync(vf[kk], &kv[1][warp * 16][kk * 16], TC_DH);
    }
    FragC dkf[TC_DH / 16], dvf[TC_DH / 16];
    for (int nb = 0; nb < TC_DH / 16; ++nb) {
        wmma::fill_fragment(dkf[nb], 0.0f);
        wmma::fill_fragment(dvf[nb], 0.0f);
    }
    // This warp's keys: 16 rows of S^T; two lanes a key row, TC_BQ / 2 query columns each.
    const unsigned key = warp * 16 + lane / 2, c0 = (lane % 2) * (TC_BQ / 2);
    const bool live = key < nk;
    for (unsigned q0 = 0; q0 < R; q0 += TC_BQ) {
        const unsigned n = umin_(TC_BQ, R - q0);
        __syncthreads();
        load_bf16_tile(qs, TC_BQ, q, bg * R + q0, n);
        load_bf16_tile(gs, TC_BQ, dout, bg * R + q0, n);
        for (unsigned i = threadIdx.x; i < TC_BQ; i += blockDim.x) {
            lse_s[i] = i < n ? lse[bg * R + q0 + i] : 0.0f;
            d_s[i] = i < n ? dsum[bg * R + q0 + i] : 0.0f;
        }
        __syncthreads();
        // S^T = K Q^T and dP^T = V dO^T for this warp's 16 keys.
        for (int nb = 0; nb < TC_BQ / 16; ++nb) {
            FragC sf, pf;
            wmma::fill_fragment(sf, 0.0f);
            wmma::fill_fragment(pf, 0.0f);
            for (int kk = 0; kk < TC_DH / 16; ++kk) {
                FragBt qt, gt;
                wmma::load_matrix_sync(qt, &qs[nb * 16][kk * 16], TC_DH);
                wmma::load_matrix_sync(gt, &gs[nb * 16][kk * 16], TC_DH);
                wmma::mma_sync(sf, kf[kk], qt, sf);
                wmma::mma_sync(pf, vf[kk], gt, pf);
            }
            wmma::store_matrix_sync(&sp[warp * 16][nb * 16], sf, TC_BQ, wmma::mem_row_major);
            wmma::store_matrix_sync(&dp[warp * 16][nb * 16], pf, TC_BQ, wmma::mem_row_major);
        }
        __syncwarp();
        for (unsigned j = 0; j < TC_BQ / 2; ++j) {  // staggered as in the forward pass
            const unsigned c = c0 + (j + lane / 2) % (TC_BQ / 2);
            float p = 0.0f;
            if (live && c < n) {
                float x = sp[key][c] * scale;
                const T* mrow = mask_row(mask, bg, groups, q0 + c, t, tk);
                if (mrow) x += to_acc(mrow[key0 + key]);
                p = expf(x - lse_s[c]);
            }
            sp[key][c] = p;
            pt[key][c] = __float2bfloat16(p);
        }
        __syncwarp();
        // dV += P^T dO
        for (int nb = 0; nb < TC_DH / 16; ++nb) {
            for (int kb = 0; kb < TC_BQ / 16; ++kb) {
                FragA af;
                FragB gb;
                wmma::load_matrix_sync(af, &pt[warp * 16][kb * 16], TC_BQ);
                wmma::load_matrix_sync(gb, &gs[kb * 16][nb * 16], TC_DH);
                wmma::mma_sync(dvf[nb], af, gb, dvf[nb]);
            }
        }
        __syncwarp();  // P^T is read: its space takes dS^T
        for (unsigned j = 0; j < TC_BQ / 2; ++j) {
            const unsigned c = c0 + (j + lane / 2) % (TC_BQ / 2);
            pt[key][c] = __float2bfloat16(sp[key][c] * (dp[key][c] - d_s[c]) * scale);
        }
        __syncwarp();
        // dK += dS^T Q
        for (int nb = 0; nb < TC_DH / 16; ++nb) {
            for (int kb = 0; kb < TC_BQ / 16; ++kb) {
                FragA af;
                FragB qb;
                wmma::load_matrix_sync(af, &pt[warp * 16][kb * 16], TC_BQ);
                wmma::load_matrix_sync(qb, &qs[kb * 16][nb * 16], TC_DH);
                wmma::mma_sync(dkf[nb], af, qb, dkf[nb]);
            }
        }
    }
    __syncthreads();  // K and V are read: their space stages the results
    float(*stage)[DH] = reinterpret_cast<float(*)[DH]>(&kv[0][0][0]);
    write_key_rows(dkf, stage, dk + (bg * tk + key0) * TC_DH, nk);
    write_key_rows(dvf, stage, dv + (bg * tk + key0) * TC_DH, nk);
}

#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
#define FLASH_TC_BWD_ENTRIES(T, S, DH)                                                           \
    extern "C" __global__ void flash_bwd_dq_tc_##S##_d##DH(                                       \
        const T* q, const T* k, const T* v, const T* mask, const T* out, const T* dout,          \
        const float* lse, float* dsum, T* dq, unsigned R, unsigned t, unsigned tk,               \
        unsigned groups, double scale) {                                                         \
        flash_bwd_dq_tc<T, DH>(q, k, v, mask, out, dout, lse, dsum, dq, R, t, tk, groups, scale); \
    }                                                                                            \
    extern "C" __global__ void flash_bwd_dkdv_tc_##S##_d##DH(                                     \
        const T* q, const T* k, const T* v, const T* mask, const T* dout, const float* lse,      \
        const float* dsum, T* dk, T* dv, unsigned R, unsigned t, unsigned tk, unsigned groups,   \
        double scale) {                                                                          \
        flash_bwd_dkdv_tc<T, DH>(q, k, v, mask, dout, lse, dsum, dk, dv, R, t, tk, groups, scale); \
    }
FLASH_TC_BWD_ENTRIES(float, f32, 64)
FLASH_TC_BWD_ENTRIES(bf16, bf16, 64)
FLASH_TC_BWD_ENTRIES(float, f32, 128)
FLASH_TC_BWD_ENTRIES(bf16, bf16, 128)
#endif
